package signer_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"io"
	"testing"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/signer"
)

// BenchmarkTokenSign signs a 4 KiB message with SoftHSM keys through
// Spool, Sign and WriteSigned ("message"), next to the raw token
// signature alone ("raw"): the ratio is what everything but the token
// costs. "parallel" runs one goroutine per core.
func BenchmarkTokenSign(b *testing.B) {
	keys := tokenKeys(b, "shop.example.com")["shop.example.com"]
	msg := signer.BenchMessage(4096)
	digest := sha256.Sum256(msg)
	for _, k := range []struct {
		name string
		key  crypto.Signer
		opts crypto.SignerOpts
	}{{"rsa2048", keys.rsa, crypto.SHA256}, {"ed25519", keys.ed, crypto.Hash(0)}} {
		ids := []signer.Identity{{Domain: "shop.example.com", Selector: "s", Key: k.key}}
		signMessage := func(b *testing.B) {
			m, err := signer.Spool(context.Background(), bytes.NewReader(msg), signer.SpoolOptions{})
			if err != nil {
				b.Fatal(err)
			}
			fields, err := signer.Sign(context.Background(), m, ids, signer.Options{})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := signer.WriteSigned(io.Discard, fields, m); err != nil {
				b.Fatal(err)
			}
			m.Close()
		}
		raw := func(b *testing.B) {
			if _, err := k.key.(*hsm.Key).SignContext(context.Background(), digest[:], k.opts); err != nil {
				b.Fatal(err)
			}
		}
		for _, op := range []struct {
			name string
			fn   func(*testing.B)
		}{{"message", signMessage}, {"raw", raw}} {
			b.Run(k.name+"/"+op.name, func(b *testing.B) {
				for b.Loop() {
					op.fn(b)
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
			})
			b.Run(k.name+"/"+op.name+"/parallel", func(b *testing.B) {
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						op.fn(b)
					}
				})
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
			})
		}
	}
}
