package signer

import (
	"bytes"
	"context"
	"crypto"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"
)

// benchMessage returns a campaign-style message of exactly size bytes.
func benchMessage(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: \"Example Shop\" <news@shop.example.com>\r\n" +
		"To: alice@example.net\r\n" +
		"Subject: Spring sale: 30% off everything\r\n" +
		"Date: Tue, 12 Mar 2024 09:15:01 +0000\r\n" +
		"Message-ID: <20240312091501.7731.alice@shop.example.com>\r\n" +
		"MIME-Version: 1.0\r\n" +
		"List-Unsubscribe: <https://shop.example.com/u/7731/alice>, <mailto:u-7731@shop.example.com>\r\n" +
		"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n\r\n")
	line := "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
	for b.Len()+len(line) <= size-2 {
		b.WriteString(line)
	}
	b.WriteString(strings.Repeat("x", size-2-b.Len()) + "\r\n")
	return b.Bytes()
}

// BenchmarkSign measures a whole message through Spool, Sign and
// WriteSigned with in-memory keys: what the gateway does per message,
// minus SMTP.
func BenchmarkSign(b *testing.B) {
	rsaKey, edKey := testKeys(b)
	msg := benchMessage(4096)
	for _, bc := range []struct {
		name string
		keys []crypto.Signer
	}{
		{"rsa2048", []crypto.Signer{rsaKey}},
		{"ed25519", []crypto.Signer{edKey}},
		{"rsa2048+ed25519", []crypto.Signer{rsaKey, edKey}},
	} {
		b.Run(bc.name+"/4KiB", func(b *testing.B) {
			var ids []Identity
			for i, k := range bc.keys {
				ids = append(ids, Identity{Domain: "shop.example.com", Selector: fmt.Sprint("s", i), Key: k})
			}
			benchSign(b, msg, ids)
		})
	}
}

func benchSign(b *testing.B, msg []byte, ids []Identity) {
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	ctx := context.Background()
	for b.Loop() {
		m, err := Spool(ctx, bytes.NewReader(msg), SpoolOptions{})
		if err != nil {
			b.Fatal(err)
		}
		fields, err := Sign(ctx, m, ids, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := WriteSigned(io.Discard, fields, m); err != nil {
			b.Fatal(err)
		}
		m.Close()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkSpool is the streaming part alone: normalising, checking the
// header, hashing the body and storing the message.
func BenchmarkSpool(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20, 8 << 20} {
		msg := benchMessage(size)
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			dir := b.TempDir()
			for b.Loop() {
				m, err := Spool(context.Background(), bytes.NewReader(msg), SpoolOptions{Dir: dir})
				if err != nil {
					b.Fatal(err)
				}
				m.Close()
			}
		})
	}
}

// BenchmarkDualSignBody compares dual signing (two Ed25519 identities,
// so that the body dominates) of a 1 MiB message: Sign hashes the body
// once, go-msgauth once per Signer.
func BenchmarkDualSignBody(b *testing.B) {
	_, edKey := testKeys(b)
	msg := benchMessage(1 << 20)
	b.Run("signer", func(b *testing.B) {
		benchSign(b, msg, []Identity{
			{Domain: "shop.example.com", Selector: "a", Key: edKey},
			{Domain: "shop.example.com", Selector: "b", Key: edKey},
		})
	})
	b.Run("go-msgauth", func(b *testing.B) {
		b.SetBytes(int64(len(msg)))
		b.ReportAllocs()
		for b.Loop() {
			var out bytes.Buffer
			in := msg
			for _, sel := range []string{"a", "b"} {
				out.Reset()
				err := dkim.Sign(&out, bytes.NewReader(in), &dkim.SignOptions{Domain: "shop.example.com", Selector: sel, Signer: edKey,
					HeaderCanonicalization: dkim.CanonicalizationRelaxed, BodyCanonicalization: dkim.CanonicalizationRelaxed})
				if err != nil {
					b.Fatal(err)
				}
				in = out.Bytes()
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
	})
}

// BenchmarkSpoolAt is `dkimgw sign < file`'s work per byte, on 8 MiB of
// campaign text in a file, with LF line ends (as written by most tools)
// and CRLF: checking and hashing the message (SpoolAt), and writing it out
// again from the file (WriteSigned, to io.Discard).
func BenchmarkSpoolAt(b *testing.B) {
	crlfMsg := benchMessage(8 << 20)
	for name, msg := range map[string][]byte{"LF": bytes.ReplaceAll(crlfMsg, []byte("\r\n"), []byte("\n")), "CRLF": crlfMsg} {
		path := filepath.Join(b.TempDir(), "msg.eml")
		if err := os.WriteFile(path, msg, 0o600); err != nil {
			b.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		b.Run(name+"/spool", func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				m, err := SpoolAt(context.Background(), f, int64(len(msg)), SpoolOptions{})
				if err != nil {
					b.Fatal(err)
				}
				m.Close()
			}
		})
		m, err := SpoolAt(context.Background(), f, int64(len(msg)), SpoolOptions{})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(name+"/write", func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := WriteSigned(io.Discard, nil, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
