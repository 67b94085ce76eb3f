package signer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// chunkReader returns its chunks one Read at a time, so that a CR and
// its LF can arrive in different reads.
type chunkReader struct{ chunks []string }

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.chunks) > 0 && r.chunks[0] == "" {
		r.chunks = r.chunks[1:]
	}
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	return n, nil
}

func spoolString(t *testing.T, msg string, opts SpoolOptions) *Message {
	t.Helper()
	m, err := Spool(t.Context(), strings.NewReader(msg), opts)
	if err != nil {
		t.Fatalf("Spool: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func readAll(t *testing.T, m *Message) string {
	t.Helper()
	r, err := m.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const hdr = "From: a@example.com\r\n\r\n"

func TestSpoolNormalisesLineEndings(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		want   string
	}{
		{"crlf untouched", []string{hdr + "a\r\nb\r\n"}, hdr + "a\r\nb\r\n"},
		{"bare lf", []string{"From: a@example.com\n\na\nb\n"}, hdr + "a\r\nb\r\n"},
		{"lone cr", []string{"From: a@example.com\r\rx\ry\r"}, hdr + "x\r\ny\r\n"},
		{"cr lf split across reads", []string{hdr + "a\r", "\nb\r", "\n"}, hdr + "a\r\nb\r\n"},
		{"cr then lone cr across reads", []string{hdr + "a\r", "\rb\r\n"}, hdr + "a\r\n\r\nb\r\n"},
		{"cr at end of input", []string{hdr + "a\r"}, hdr + "a\r\n"},
		{"cr cr lf", []string{hdr + "a\r\r\nb\r\n"}, hdr + "a\r\n\r\nb\r\n"},
		{"lf cr", []string{hdr + "a\n\rb\r\n"}, hdr + "a\r\n\r\nb\r\n"},
		{"every byte its own read", strings.Split("From: a@example.com\n\r\nx\ry\r\nz\n", ""), hdr + "x\r\ny\r\nz\r\n"},
		{"no final line ending", []string{hdr + "last"}, hdr + "last\r\n"},
		{"no body separator", []string{"From: a@example.com"}, hdr},
		{"header only, terminated", []string{"From: a@example.com\n"}, hdr},
		{"empty body", []string{hdr}, hdr},
		{"split in header", []string{"Fr", "om: a@exa", "mple.com\r", "\n\r", "\n"}, hdr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, limit := range []int64{DefaultMemoryLimit, 1} {
				m, err := Spool(t.Context(), &chunkReader{chunks: append([]string(nil), tt.chunks...)},
					SpoolOptions{MemoryLimit: limit, Dir: t.TempDir()})
				if err != nil {
					t.Fatalf("MemoryLimit %d: %v", limit, err)
				}
				if got := readAll(t, m); got != tt.want {
					t.Errorf("MemoryLimit %d: got %q, want %q", limit, got, tt.want)
				}
				if m.Size() != int64(len(tt.want)) {
					t.Errorf("MemoryLimit %d: Size() = %d, want %d", limit, m.Size(), len(tt.want))
				}
				m.Close()
			}
		})
	}
}

func TestSpoolKeepsFieldsAsReceived(t *testing.T) {
	msg := "DKIM-Signature: v=1; d=other.example;\r\n b=abc\r\nFROM: A <A@Example.COM>\r\nSubject: one\r\n\ttwo\r\n\r\nbody\r\n"
	m := spoolString(t, msg, SpoolOptions{})
	want := []headerField{
		{"DKIM-Signature", "DKIM-Signature: v=1; d=other.example;\r\n b=abc\r\n"},
		{"FROM", "FROM: A <A@Example.COM>\r\n"},
		{"Subject", "Subject: one\r\n\ttwo\r\n"},
	}
	if len(m.fields) != len(want) {
		t.Fatalf("fields = %q, want %q", m.fields, want)
	}
	for i := range want {
		if m.fields[i] != want[i] {
			t.Errorf("field %d = %q, want %q", i, m.fields[i], want[i])
		}
	}
	if got := m.FromDomain(); got != "example.com" {
		t.Errorf("FromDomain() = %q, want example.com", got)
	}
	if got := readAll(t, m); got != msg {
		t.Errorf("message changed: %q", got)
	}
}

func TestSpoolMemoryAndFile(t *testing.T) {
	body := strings.Repeat("0123456789abcdef\r\n", 1000) // 18,000 bytes
	msg := hdr + body
	t.Run("below the limit stays in memory", func(t *testing.T) {
		dir := t.TempDir()
		m := spoolString(t, msg, SpoolOptions{Dir: dir, MemoryLimit: int64(len(msg))})
		if m.file != nil || m.mem == nil || m.OnDisk() {
			t.Fatal("message at the memory limit went to a file")
		}
		assertEmptyDir(t, dir)
	})
	t.Run("above the limit goes to a 0600 file", func(t *testing.T) {
		dir := t.TempDir()
		m := spoolString(t, msg, SpoolOptions{Dir: dir, MemoryLimit: int64(len(msg)) - 1})
		if m.file == nil || m.mem != nil || !m.OnDisk() {
			t.Fatal("message over the memory limit stayed in memory")
		}
		fi, err := m.file.Stat()
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("spool file mode = %v, want 0600", fi.Mode().Perm())
		}
		if fi.Size() != int64(len(msg)) {
			t.Errorf("spool file has %d bytes, want %d", fi.Size(), len(msg))
		}
		// Unlinked at once: nothing to leave behind even if the
		// process dies before Close.
		assertEmptyDir(t, dir)
		// Readers are independent and repeatable.
		r1, _ := m.Open()
		r2, _ := m.Open()
		b1, _ := io.ReadAll(iotest.OneByteReader(r1))
		b2, _ := io.ReadAll(r2)
		if string(b1) != msg || string(b2) != msg {
			t.Error("readers over the spool file do not return the message")
		}
		if err := m.Close(); err != nil {
			t.Fatal(err)
		}
		if err := m.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := m.Open(); err == nil {
			t.Error("Open after Close succeeded")
		}
		assertEmptyDir(t, dir)
	})
	t.Run("removed on error", func(t *testing.T) {
		dir := t.TempDir()
		failing := io.MultiReader(strings.NewReader(msg), iotest.ErrReader(errors.New("connection reset")))
		m, err := Spool(t.Context(), failing, SpoolOptions{Dir: dir, MemoryLimit: 100})
		if err == nil {
			m.Close()
			t.Fatal("Spool succeeded on a failing reader")
		}
		var refused *RefusedError
		if errors.As(err, &refused) {
			t.Errorf("read error reported as a refusal: %v", err)
		}
		assertEmptyDir(t, dir)
	})
	t.Run("unusable directory is a temporary error", func(t *testing.T) {
		_, err := Spool(t.Context(), strings.NewReader(msg), SpoolOptions{Dir: filepath.Join(t.TempDir(), "missing"), MemoryLimit: 100})
		var refused *RefusedError
		if err == nil || errors.As(err, &refused) {
			t.Fatalf("Spool into a missing directory: err = %v, want a non-refusal error", err)
		}
	})
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("left behind in the spool directory: %s", e.Name())
	}
}

func TestSpoolTooLarge(t *testing.T) {
	msg := hdr + strings.Repeat("x\n", 1000) // 2,000 input bytes, 3,000 normalised
	for _, tt := range []struct {
		limit int64
		ok    bool
	}{{int64(len(hdr)) + 3000, true}, {int64(len(hdr)) + 2999, false}} {
		r := &countingReader{r: strings.NewReader(msg + strings.Repeat("y", 1<<20))}
		m, err := Spool(t.Context(), io.LimitReader(r, int64(len(msg))), SpoolOptions{MaxMessageBytes: tt.limit})
		if tt.ok {
			if err != nil {
				t.Fatalf("limit %d: %v", tt.limit, err)
			}
			m.Close()
			continue
		}
		if !errors.Is(err, ErrTooLarge) {
			t.Fatalf("limit %d: err = %v, want ErrTooLarge", tt.limit, err)
		}
	}
	// Stops reading once the limit is passed.
	r := &countingReader{r: io.MultiReader(strings.NewReader(hdr), infiniteReader{})}
	_, err := Spool(t.Context(), r, SpoolOptions{MaxMessageBytes: 1 << 20})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if r.n > 1<<20+readChunk {
		t.Errorf("read %d bytes for a 1 MiB limit", r.n)
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

type infiniteReader struct{}

func (infiniteReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'z'
	}
	return len(p), nil
}

func TestSpoolCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := Spool(ctx, strings.NewReader(hdr), SpoolOptions{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

// TestSpoolRefuses covers the refusals that are not in testdata/refused
// (see TestRefusedCorpus): those about limits.
func TestSpoolRefuses(t *testing.T) {
	manyLines := "From: a@example.com\r\n" + strings.Repeat("X-Filler: "+strings.Repeat("f", 80)+"\r\n", 200) + "\r\n"
	tests := []struct {
		name   string
		msg    string
		opts   SpoolOptions
		reason string
	}{
		{"header section over the limit", manyLines, SpoolOptions{MaxHeaderBytes: 10_000}, "header section exceeds 10000 bytes"},
		{"header line of 999 octets", "From: a@example.com\r\nX: " + strings.Repeat("y", 996) + "\r\n\r\n", SpoolOptions{}, "line 2 of the header section exceeds 998 octets"},
		{"header line without end", "From: a@example.com\r\nX: " + strings.Repeat("y", 1<<20), SpoolOptions{}, "line 2 of the header section exceeds 998 octets"},
		{"lone CR inside a header line", "From: a@example.com\rSubject: x\r\n\r\n", SpoolOptions{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Spool(t.Context(), strings.NewReader(tt.msg), tt.opts)
			if tt.reason == "" {
				// A lone CR is a line break after normalisation, so this
				// one is accepted: two header fields.
				if err != nil {
					t.Fatal(err)
				}
				if len(m.fields) != 2 {
					t.Errorf("fields = %q", m.fields)
				}
				m.Close()
				return
			}
			var refused *RefusedError
			if !errors.As(err, &refused) {
				t.Fatalf("err = %v, want a *RefusedError", err)
			}
			if refused.Reason != tt.reason {
				t.Errorf("reason = %q, want %q", refused.Reason, tt.reason)
			}
		})
	}
	// 998 octets is allowed.
	spoolString(t, "From: a@example.com\r\nX: "+strings.Repeat("y", 995)+"\r\n\r\n", SpoolOptions{})
}

// TestRefusedCorpus checks every message in testdata/refused is refused,
// with the reason a person needs.
func TestRefusedCorpus(t *testing.T) {
	want := map[string]string{
		"binary-garbage.eml":        "line 1 of the header section contains",
		"continuation-first.eml":    "the header section starts with a continuation line",
		"control-in-header.eml":     "line 2 of the header section contains control character 0x1b",
		"empty.eml":                 "no From header field",
		"from-domain-literal.eml":   "the From domain is not a valid domain name",
		"from-group-no-address.eml": "the From field has no address",
		"from-no-domain.eml":        "cannot parse the From address",
		"from-trailing-dot.eml":     "cannot parse the From address",
		"from-two-domains.eml":      "the From field has addresses in more than one domain",
		"from-unparseable.eml":      "cannot parse the From address",
		"long-header-line.eml":      "line 2 of the header section exceeds 998 octets",
		"mbox-from-line.eml":        "line 1 of the header section is not a header field",
		"no-from.eml":               "no From header field",
		"nul-in-header.eml":         "line 2 of the header section contains a NUL byte",
		"space-before-colon.eml":    `header field "Subject" has whitespace before its colon`,
		"two-from.eml":              "more than one From header field",
	}
	files, err := filepath.Glob("testdata/refused/*.eml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(want) {
		t.Errorf("%d files in testdata/refused, %d expectations", len(files), len(want))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			reason, ok := want[filepath.Base(f)]
			if !ok {
				t.Fatal("no expected reason for this file")
			}
			dir := t.TempDir()
			m, err := Spool(t.Context(), bytes.NewReader(b), SpoolOptions{Dir: dir, MemoryLimit: 16})
			if err == nil {
				m.Close()
				t.Fatalf("accepted, with From domain %q", m.FromDomain())
			}
			var refused *RefusedError
			if !errors.As(err, &refused) {
				t.Fatalf("err = %v, want a *RefusedError", err)
			}
			if !strings.Contains(refused.Reason, reason) {
				t.Errorf("reason = %q, want it to contain %q", refused.Reason, reason)
			}
			if !strings.HasPrefix(err.Error(), "signer: message refused: ") {
				t.Errorf("Error() = %q", err)
			}
			assertEmptyDir(t, dir)
		})
	}
}

func TestFromDomain(t *testing.T) {
	tests := []struct{ from, want string }{
		{"a@example.com", "example.com"},
		{"A <A@EXAMPLE.COM>", "example.com"},
		{"\"Smith, J\" <j@sub.example.com> (work)", "sub.example.com"},
		{"=?UTF-8?B?w5xiZXI=?= <u@example.com>", "example.com"},
		{"Jürgen <jürgen@bücher.example>", "xn--bcher-kva.example"},
		{"<u@XN--BCHER-KVA.example>", "xn--bcher-kva.example"},
		{"a@example.com, b@EXAMPLE.com", "example.com"},
		{"u@_dmarc-test.example.com", "_dmarc-test.example.com"},
	}
	for _, tt := range tests {
		m, err := Spool(t.Context(), strings.NewReader("From: "+tt.from+"\r\n\r\n"), SpoolOptions{})
		if err != nil {
			t.Errorf("From: %s: %v", tt.from, err)
			continue
		}
		if got := m.FromDomain(); got != tt.want {
			t.Errorf("From: %s: FromDomain() = %q, want %q", tt.from, got, tt.want)
		}
		m.Close()
	}
}

// relaxedBodyHash runs relaxedBody over msg's body in chunks of size n.
func relaxedBodyHash(body string, n int) []byte {
	b := newRelaxedBody(sha256.New())
	for len(body) > n {
		b.Write([]byte(body[:n]))
		body = body[n:]
	}
	b.Write([]byte(body))
	return b.Sum()
}

func TestRelaxedBody(t *testing.T) {
	tests := []struct{ body, canonical string }{
		{"", ""},
		{"\r\n", ""},
		{"\r\n\r\n \r\n\t\r\n", ""},
		{"a\r\n", "a\r\n"},
		{"a", "a\r\n"},
		{"a  \t b \r\n", "a b\r\n"},
		{"  a\r\n", " a\r\n"},
		{"a\r\n\r\n\r\n", "a\r\n"},
		{"a\r\n \r\nb\r\n\r\n", "a\r\n\r\nb\r\n"},
		// RFC 6376 §3.4.6, example 1 (body part).
		{" C \r\nD \t E\r\n\r\n\r\n", " C\r\nD E\r\n"},
	}
	for _, tt := range tests {
		want := sha256.Sum256([]byte(tt.canonical))
		for _, n := range []int{1, 2, 3, 1 << 20} {
			if got := relaxedBodyHash(tt.body, n); !bytes.Equal(got, want[:]) {
				t.Errorf("body %q in chunks of %d: hash is not that of %q", tt.body, n, tt.canonical)
			}
		}
	}
}

// TestRelaxedBodyBoundedMemory shows why relaxedBody is not go-msgauth's:
// a run of blank lines costs a counter, not a buffer (go-msgauth's
// relaxedBodyCanonicalizer appends them all to crlfBuf).
func TestRelaxedBodyBoundedMemory(t *testing.T) {
	blank := bytes.Repeat([]byte("\r\n"), 32<<10)
	b := newRelaxedBody(sha256.New())
	allocs := testing.AllocsPerRun(100, func() { b.Write(blank) })
	if allocs != 0 {
		t.Errorf("Write allocates %.0f times per 64 KiB of blank lines, want 0", allocs)
	}
}

func TestRelaxedHeader(t *testing.T) {
	tests := []struct{ raw, want string }{
		// RFC 6376 §3.4.6, example 1 (header part).
		{"A: X\r\n", "a:X\r\n"},
		{"B : Y\t\r\n\tZ  \r\n", "b:Y Z\r\n"},
		{"Subject:\r\n", "subject:\r\n"},
		{"Subject:  \t \r\n", "subject:\r\n"},
		{"X-Long: a\r\n b\r\n\tc\r\n", "x-long:a b c\r\n"},
	}
	for _, tt := range tests {
		if got := relaxedHeader(tt.raw); got != tt.want {
			t.Errorf("relaxedHeader(%q) = %q, want %q", tt.raw, got, tt.want)
		}
	}
}

// TestSpoolManyContinuationLines: a header field of a quarter of a million
// continuation lines (1 MB) spools in linear time.
func TestSpoolManyContinuationLines(t *testing.T) {
	msg := "From: a@example.com\r\nSubject: x\r\n" + strings.Repeat(" x\r\n", 250_000) + "\r\nbody\r\n"
	start := time.Now()
	m := spoolString(t, msg, SpoolOptions{})
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v", d)
	}
	if len(m.fields) != 2 || len(m.fields[1].raw) != len("Subject: x\r\n")+250_000*4 {
		t.Errorf("fields not as expected: %d", len(m.fields))
	}
}

// TestErrorsHaveOnePrefix: every error says "signer: " once, however it
// was wrapped.
func TestErrorsHaveOnePrefix(t *testing.T) {
	_, err := Spool(t.Context(), strings.NewReader(hdr+strings.Repeat("x", 2000)+"\r\n"), SpoolOptions{MaxMessageBytes: 1024})
	_, refused := Spool(t.Context(), strings.NewReader("Subject: no From\r\n\r\nbody\r\n"), SpoolOptions{})
	for _, err := range []error{err, refused} {
		if err == nil {
			t.Fatal("Spool succeeded, want an error")
		}
		if n := strings.Count(err.Error(), "signer:"); n != 1 || !strings.HasPrefix(err.Error(), "signer: ") {
			t.Errorf("error %q: want exactly one leading \"signer: \"", err)
		}
	}
}
