package signer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
)

// sourceCases are messages whose line endings put SpoolAt's
// normalisation to the test, also where a block of the source ends.
func sourceCases(t testing.TB) map[string]string {
	t.Helper()
	const h = "From: Joe <joe@example.com>\nTo: a@example.net\nSubject: s\n\n"
	text := strings.Repeat("the quick brown fox jumps over  the lazy dog\t\n", 4000) // 188 KB
	// A CR and its LF, or a lone CR, as the last byte of the first
	// block the source is read in.
	pad := func(end string) string {
		return h + strings.Repeat("x", sourceChunk-len(h)-1) + end
	}
	cases := map[string]string{
		"LF":                        h + text,
		"CRLF":                      strings.ReplaceAll(h+text, "\n", "\r\n"),
		"mixed":                     h + strings.ReplaceAll(text, "dog\t\n", "dog\r\n") + "a\rb\r\r\nc\n\r",
		"no final newline":          h + text + "last line",
		"ends in CR":                h + "body\r",
		"empty body":                h,
		"header only, no blank":     "From: joe@example.com\nSubject: s",
		"header ends in CR":         "From: joe@example.com\r",
		"trailing blank lines":      h + "body\n\n\n\r\n\n",
		"long lines":                h + strings.Repeat("y", 3*sourceChunk+17) + "\n" + strings.Repeat("z ", sourceChunk) + "\r\n",
		"CRLF across blocks":        pad("\r\n" + text),
		"lone CR at block end":      pad("\rnext\n"),
		"LF at block end":           pad("\n\n" + text),
		"header across blocks":      "From: joe@example.com\nX: " + strings.Repeat("v", 900) + "\n" + strings.Repeat("Y: w\n", sourceChunk/5) + "\n" + text,
		"blank line across blocks":  "From: joe@example.com\n" + strings.Repeat("Y: w\r\n", (sourceChunk-len("From: joe@example.com\n"))/6) + "X: ab\r" + "\n\r\nbody\r\n",
		"trailing WSP across block": pad(" \t \n  \n"),
	}
	for _, dir := range []string{"testdata/corpus", "testdata/refused"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.eml"))
		if err != nil || len(files) == 0 {
			t.Fatalf("no corpus in %s: %v", dir, err)
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			cases[dir+"/"+filepath.Base(f)] = string(b)
		}
	}
	return cases
}

// signMessage signs m as TestSpoolAtSignsLikeSpool needs it, and
// returns the signed message, or the error that stopped it.
func signMessage(t *testing.T, m *Message, ids []Identity) ([]byte, error) {
	t.Helper()
	fields, err := Sign(t.Context(), m, ids, Options{Now: func() time.Time { return time.Unix(1700000000, 0) }})
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	n, err := WriteSigned(&b, fields, m)
	if err != nil {
		return nil, err
	}
	if n != int64(b.Len()) {
		t.Errorf("WriteSigned returned %d, wrote %d", n, b.Len())
	}
	return b.Bytes(), nil
}

// TestSpoolAtSignsLikeSpool: a message read from where it is stored is
// checked, signed and written byte for byte as the same message spooled
// from a stream, with the same refusals; reading it through Open, in
// small pieces, gives the same bytes too; and what it writes verifies.
func TestSpoolAtSignsLikeSpool(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	ids := []Identity{{Domain: "example.com", Selector: "rsa", Key: rsaKey}, {Domain: "example.com", Selector: "ed", Key: edKey}}
	for name, msg := range sourceCases(t) {
		t.Run(name, func(t *testing.T) {
			spooled, serr := Spool(t.Context(), strings.NewReader(msg), SpoolOptions{Dir: t.TempDir()})
			stored, aerr := SpoolAt(t.Context(), strings.NewReader(msg), int64(len(msg)), SpoolOptions{})
			if serr != nil || aerr != nil {
				if serr == nil || aerr == nil || serr.Error() != aerr.Error() {
					t.Fatalf("Spool: %v; SpoolAt: %v", serr, aerr)
				}
				return // refused by both, for the same reason
			}
			defer spooled.Close()
			defer stored.Close()
			if stored.Size() != spooled.Size() || stored.FromDomain() != spooled.FromDomain() {
				t.Errorf("SpoolAt: size %d, From domain %q; Spool: %d, %q", stored.Size(), stored.FromDomain(), spooled.Size(), spooled.FromDomain())
			}
			if stored.OnDisk() {
				t.Error("SpoolAt made a spool file")
			}
			// The From domain may not be example.com: sign as it.
			ids := append([]Identity(nil), ids...)
			for i := range ids {
				ids[i].Domain = spooled.FromDomain()
			}
			want, werr := signMessage(t, spooled, ids)
			got, gerr := signMessage(t, stored, ids)
			if werr != nil || gerr != nil {
				if werr == nil || gerr == nil || werr.Error() != gerr.Error() {
					t.Fatalf("Spool's message: %v; SpoolAt's: %v", werr, gerr)
				}
				return // a From domain that cannot sign, in both
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("SpoolAt's signed message differs from Spool's (%d and %d bytes)", len(got), len(want))
			}
			// Twice through Open, once in 1000-byte reads: each reader
			// starts afresh.
			for range 2 {
				r, err := stored.Open()
				if err != nil {
					t.Fatal(err)
				}
				var b bytes.Buffer
				if _, err := io.CopyBuffer(&b, struct{ io.Reader }{r}, make([]byte, 1000)); err != nil {
					t.Fatal(err)
				}
				r.Close()
				if !bytes.HasSuffix(want, b.Bytes()) || int64(b.Len()) != stored.Size() {
					t.Fatalf("Open gives %d bytes, not the %d of the message", b.Len(), stored.Size())
				}
			}
			vs, err := dkim.VerifyWithOptions(bytes.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookupTXT(rsaKey, edKey)})
			// Ours are the first two; a message may bring its own.
			if err != nil || len(vs) < 2 {
				t.Fatalf("verify: %v, %d results", err, len(vs))
			}
			for _, v := range vs[:2] {
				if v.Err != nil {
					t.Errorf("%s: %v", v.Domain, v.Err)
				}
			}
		})
	}
}

// shrinkingSource is a source that loses its end after the first read
// that reaches past cut.
type shrinkingSource struct {
	b   []byte
	cut int64
}

func (s *shrinkingSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(s.b)) {
		return 0, io.EOF
	}
	n := copy(p, s.b[off:])
	if off+int64(n) > s.cut {
		s.b = s.b[:s.cut]
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// TestSpoolAtChangedSource: a source that ends early, when spooled or
// when written, gives ErrChanged, with one "signer: " prefix, and no
// signed message.
func TestSpoolAtChangedSource(t *testing.T) {
	msg := []byte("From: joe@example.com\n\n" + strings.Repeat("body line\n", 50000))
	_, edKey := testKeys(t)
	ids := []Identity{{Domain: "example.com", Selector: "ed", Key: edKey}}
	checkErr := func(t *testing.T, err error) {
		t.Helper()
		if !errors.Is(err, ErrChanged) {
			t.Fatalf("error %v, want ErrChanged", err)
		}
		if n := strings.Count(err.Error(), "signer:"); n != 1 {
			t.Errorf("error %q: %d prefixes", err, n)
		}
	}

	t.Run("shorter than its size", func(t *testing.T) {
		_, err := SpoolAt(t.Context(), bytes.NewReader(msg), int64(len(msg))+1, SpoolOptions{})
		checkErr(t, err)
	})
	t.Run("truncated while spooled", func(t *testing.T) {
		_, err := SpoolAt(t.Context(), &shrinkingSource{b: msg, cut: 1000}, int64(len(msg)), SpoolOptions{})
		checkErr(t, err)
	})
	t.Run("truncated before written", func(t *testing.T) {
		src := &shrinkingSource{b: msg, cut: int64(len(msg))}
		m, err := SpoolAt(t.Context(), src, int64(len(msg)), SpoolOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		src.b = src.b[:len(msg)-1]
		_, err = signMessage(t, m, ids)
		checkErr(t, err)
		r, err := m.Open()
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.ReadAll(r)
		checkErr(t, err)
	})
}

// TestSpoolAtCancelled: a cancelled context stops SpoolAt.
func TestSpoolAtCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	msg := "From: joe@example.com\n\nbody\n"
	if _, err := SpoolAt(ctx, strings.NewReader(msg), int64(len(msg)), SpoolOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

// FuzzSpoolAt: for any input, SpoolAt keeps, refuses and hashes exactly
// as Spool does.
func FuzzSpoolAt(f *testing.F) {
	for _, dir := range []string{"testdata/corpus", "testdata/refused"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.eml"))
		for _, file := range files {
			if b, err := os.ReadFile(file); err == nil && len(b) <= 8<<10 {
				f.Add(b)
			}
		}
	}
	f.Add([]byte("From: a@example.com\r\rX: y\n\r\n\r\r\n"))
	f.Add([]byte("From: a@example.com\r"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		spooled, serr := Spool(context.Background(), bytes.NewReader(msg), SpoolOptions{})
		stored, aerr := SpoolAt(context.Background(), bytes.NewReader(msg), int64(len(msg)), SpoolOptions{})
		if serr != nil || aerr != nil {
			if serr == nil || aerr == nil || serr.Error() != aerr.Error() {
				t.Fatalf("Spool: %v; SpoolAt: %v", serr, aerr)
			}
			return
		}
		if !bytes.Equal(spooled.bodyHash, stored.bodyHash) {
			t.Fatal("body hashes differ")
		}
		a, b := readAll(t, spooled), readAll(t, stored)
		if a != b {
			t.Fatalf("SpoolAt's message %q, Spool's %q", b, a)
		}
	})
}

// failingWriter takes n bytes, then fails.
type failingWriter struct{ n int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) <= w.n {
		w.n -= len(p)
		return len(p), nil
	}
	k := w.n
	w.n = 0
	return k, errors.New("disk full")
}

// TestSpoolAtWriteFails: a write error in the middle of a large message
// ends WriteSigned with that error, once prefixed, and the count of the
// bytes written.
func TestSpoolAtWriteFails(t *testing.T) {
	msg := "From: joe@example.com\n\n" + strings.Repeat("body line\n", 100000)
	m, err := SpoolAt(t.Context(), strings.NewReader(msg), int64(len(msg)), SpoolOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, limit := range []int{0, 10, 300000, int(m.Size()) - 1} {
		n, err := WriteSigned(&failingWriter{n: limit}, nil, m)
		if err == nil || !strings.Contains(err.Error(), "disk full") || strings.Count(err.Error(), "signer:") != 1 {
			t.Errorf("after %d bytes: error %v", limit, err)
		}
		if n != int64(limit) {
			t.Errorf("after %d bytes: WriteSigned reports %d", limit, n)
		}
	}
}

// TestSpoolAtAllocatesOneBodyHasher: SpoolAt hashes the body on its hash
// pipe only; it used to allocate a SHA-256 and a canonicaliser with its
// 4 KiB buffer for every message and drop them at once. What a one-line
// message costs beyond the pipe's buffers stays under two such buffers.
func TestSpoolAtAllocatesOneBodyHasher(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates for its own bookkeeping")
	}
	msg := "From: joe@example.com\r\n\r\nbody\r\n"
	spool := func() {
		m, err := SpoolAt(t.Context(), strings.NewReader(msg), int64(len(msg)), SpoolOptions{})
		if err != nil {
			t.Fatal(err)
		}
		m.Close()
	}
	spool() // anything allocated once per process
	const runs = 50
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		spool()
	}
	runtime.ReadMemStats(&after)
	extra := int64(after.TotalAlloc-before.TotalAlloc)/runs - hashPipeBuffers*hashPipeBufSize
	if limit := int64(2 * cap(newRelaxedBody(nil).out)); extra > limit {
		t.Errorf("SpoolAt allocates %d bytes beyond its hash pipe's buffers for a one-line message; want at most %d", extra, limit)
	}
}
