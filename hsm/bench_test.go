package hsm_test

import (
	"crypto"
	"crypto/sha256"
	"log/slog"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// BenchmarkTokenSign measures signatures per second through the token:
// one goroutine, then 4 per core sharing the session pool (the shape of
// a busy gateway). ns/op of the parallel run is wall time per signature.
// cpu-µs/sig is the process's CPU time per signature (SoftHSM runs inside
// the process): what one signature costs the gateway, to set against its
// CPU per relayed message and against `openssl speed` on the same key type.
func BenchmarkTokenSign(b *testing.B) {
	st := testenv.SoftHSM(b)
	tok, err := hsm.Open(b.Context(), st.URI(), hsm.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	digest := sha256.Sum256([]byte("header data"))
	for _, tc := range []struct {
		alg  hsm.Algorithm
		opts crypto.SignerOpts
	}{{hsm.RSA2048, crypto.SHA256}, {hsm.Ed25519, crypto.Hash(0)}} {
		key, err := tok.GenerateKey(b.Context(), "example.com", "bench-"+string(tc.alg), tc.alg)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(string(tc.alg)+"/goroutines=1", func(b *testing.B) {
			cpu0 := processCPU(b)
			for b.Loop() {
				if _, err := key.Sign(nil, digest[:], tc.opts); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/sig")
		})
		b.Run(string(tc.alg)+"/goroutines=4xCPU", func(b *testing.B) {
			b.SetParallelism(4)
			cpu0 := processCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := key.Sign(nil, digest[:], tc.opts); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
			b.ReportMetric(float64(4*runtime.GOMAXPROCS(0)), "goroutines")
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/sig")
		})
	}
}

// BenchmarkTokenSignP11Kit is BenchmarkTokenSign's RSA-2048 rows with the
// token in another process: SoftHSM behind a p11-kit server, reached
// through p11-kit's client module over a Unix socket, as a network HSM
// is. cpu-µs/sig is then the gateway's side only (the client's calls and
// the socket); the token's RSA runs in the server's process.
func BenchmarkTokenSignP11Kit(b *testing.B) {
	srv := testenv.StartP11Kit(b)
	b.Setenv(testenv.P11KitAddressEnv, srv.Address())
	tok, err := hsm.Open(b.Context(), srv.URI(), hsm.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	digest := sha256.Sum256([]byte("header data"))
	key, err := tok.GenerateKey(b.Context(), "example.com", "bench-p11kit", hsm.RSA2048)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("rsa-2048/goroutines=1", func(b *testing.B) {
		cpu0 := processCPU(b)
		for b.Loop() {
			if _, err := key.Sign(nil, digest[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
		b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/sig")
	})
}

// processCPU is the user and system time the process has used so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
