package hsm_test

import (
	"crypto"
	"crypto/sha256"
	"log/slog"
	"runtime"
	"testing"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// BenchmarkTokenSign measures signatures per second through the token:
// one goroutine, then 4 per core sharing the session pool (the shape of
// a busy gateway). ns/op of the parallel run is wall time per signature.
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
			for b.Loop() {
				if _, err := key.Sign(nil, digest[:], tc.opts); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sigs/s")
		})
		b.Run(string(tc.alg)+"/goroutines=4xCPU", func(b *testing.B) {
			b.SetParallelism(4)
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
		})
	}
}
