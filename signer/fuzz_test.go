package signer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/dkimgw/dkimgw/dnsname"
)

// FuzzSign feeds arbitrary bytes, in arbitrary chunks, through Spool and
// Sign. It must never panic, and whatever Spool accepts must sign, keep
// its bytes, verify with go-msgauth, and have the body hash go-msgauth
// computes for the same message. The seed corpus is the small messages
// of testdata/corpus and testdata/refused, plus testdata/fuzz/FuzzSign;
// plain `go test` runs all of them.
func FuzzSign(f *testing.F) {
	for _, dir := range []string{"testdata/corpus", "testdata/refused"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.eml"))
		for _, file := range files {
			b, err := os.ReadFile(file)
			if err != nil {
				f.Fatal(err)
			}
			// Large seeds make the fuzzer spend its time minimizing;
			// the corpus tests cover them.
			if len(b) <= 8<<10 {
				f.Add(b, uint8(7))
			}
		}
	}
	f.Add([]byte("From: a@example.com\r\n\r\n"), uint8(1))
	f.Add([]byte("From: a@example.com\r\rX: y\n\r\n\r\r\n"), uint8(2))

	rsaKey, edKey := testKeys(f)
	lookup := lookupTXT(rsaKey, edKey)
	f.Fuzz(func(t *testing.T, msg []byte, chunk uint8) {
		r := io.Reader(bytes.NewReader(msg))
		if chunk > 0 {
			r = &chunkReader{chunks: chunks(msg, int(chunk))}
		}
		m, err := Spool(context.Background(), r, SpoolOptions{MaxHeaderBytes: 64 << 10, MemoryLimit: 1 << 10, Dir: t.TempDir()})
		if err != nil {
			var refused *RefusedError
			if !errors.As(err, &refused) || refused.Reason == "" {
				t.Fatalf("Spool: %v", err)
			}
			return
		}
		defer m.Close()
		// The From domain signs when it can be a signing domain; one that
		// cannot (a single label, an underscore) is Sign's to refuse, and
		// the message is then signed by a domain that can.
		d := m.FromDomain()
		if _, err := dnsname.Domain(d); err != nil {
			d = "example.com"
		}
		fields, err := Sign(context.Background(), m, []Identity{{Domain: d, Selector: "ed", Key: edKey}}, Options{})
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		var out bytes.Buffer
		if _, err := WriteSigned(&out, fields, m); err != nil {
			t.Fatal(err)
		}
		normalised := out.Bytes()[len(fields[0]):]
		want := lineEnding.ReplaceAll(msg, []byte("\r\n"))
		if !bytes.HasPrefix(normalised, want) || len(bytes.Trim(normalised[len(want):], "\r\n")) != 0 {
			t.Fatalf("output is not the normalised input:\n%q\n%q", normalised, want)
		}
		for _, l := range strings.Split(strings.TrimSuffix(fields[0], "\r\n"), "\r\n") {
			if len(l) > 998 {
				t.Fatalf("DKIM-Signature line of %d octets", len(l))
			}
		}

		// go-msgauth's body hash of the same normalised message.
		s, err := dkim.NewSigner(&dkim.SignOptions{Domain: "example.com", Selector: "ed", Signer: edKey,
			BodyCanonicalization: dkim.CanonicalizationRelaxed, HeaderKeys: []string{"From"}})
		if err != nil {
			t.Fatal(err)
		}
		s.Write(normalised)
		if err := s.Close(); err != nil {
			t.Fatalf("go-msgauth cannot sign what Spool accepted: %v", err)
		}
		theirs := bhTag.FindStringSubmatch(s.Signature())
		ours := bhTag.FindStringSubmatch(fields[0])
		if theirs == nil || ours == nil || theirs[1] != ours[1] {
			t.Fatalf("body hash %v, go-msgauth's %v", ours, theirs)
		}

		verifs, err := dkim.VerifyWithOptions(&out, &dkim.VerifyOptions{LookupTXT: lookup})
		if err != nil {
			t.Fatalf("go-msgauth: %v", err)
		}
		if len(verifs) == 0 || verifs[0].Err != nil {
			t.Fatalf("go-msgauth does not verify the signature: %v\n%s", verifs[0].Err, out.Bytes())
		}
	})
}

var (
	bhTag      = regexp.MustCompile(`bh=([A-Za-z0-9+/=]+);`)
	lineEnding = regexp.MustCompile(`\r\n|\r|\n`)
)

func chunks(b []byte, n int) []string {
	var out []string
	for len(b) > n {
		out = append(out, string(b[:n]))
		b = b[n:]
	}
	return append(out, string(b))
}
