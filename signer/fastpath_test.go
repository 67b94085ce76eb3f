package signer

import (
	"bytes"
	"crypto/sha256"
	"io"
	"regexp"
	"strings"
	"testing"
)

// The block-wise line-ending normaliser and relaxed body hash are held to
// plain, obviously correct versions of the same rules.

// refNormalise is RFC 5321's rule as Spool applies it: CRLF stays, a bare
// LF or a lone CR becomes CRLF.
func refNormalise(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n':
			b.WriteString("\r\n")
			i++
		case s[i] == '\r' || s[i] == '\n':
			b.WriteString("\r\n")
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

var wspRun = regexp.MustCompile(`[ \t]+`)

// refRelaxedBody is RFC 6376 §3.4.4 line by line, on a normalised body.
func refRelaxedBody(body string) string {
	lines := strings.Split(body, "\r\n")
	if strings.HasSuffix(body, "\r\n") {
		lines = lines[:len(lines)-1]
	}
	for i, l := range lines {
		lines[i] = strings.TrimRight(wspRun.ReplaceAllString(l, " "), " ")
	}
	for len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) == 0 {
		return ""
	}
	return strings.Join(lines, "\r\n") + "\r\n"
}

var fastPathBodies = []string{
	"", "a", "a\r\n", "a\n", "a\r", "a\rb\r\n", "a\r\r\n", "a\r\n\r\n\r\n", "\r\n\r\nx\r\n",
	"plain line one\r\nplain line two\r\n", "two  spaces\r\n", "tab\there\r\n", "trailing \r\n",
	" leading\r\n", "mixed\nendings\r\nand\rmore\n\n", "x\r\n \r\n\t\r\ny\r\n",
	strings.Repeat("word word word word word word word word word word word word\n", 300),
	strings.Repeat("line with  double spaces \r\n\r\nplain one\r\n", 200),
}

func checkFastPath(t *testing.T, body string, chunk int) {
	t.Helper()
	msg := hdr + body
	m, err := Spool(t.Context(), &chunkReader{chunks: chunked(msg, chunk)}, SpoolOptions{})
	if err != nil {
		t.Fatalf("Spool(%q): %v", msg, err)
	}
	defer m.Close()
	r, _ := m.Open()
	got, _ := io.ReadAll(r)
	if want := refNormalise(msg); string(got) != want && !(strings.HasSuffix(want, "\r\n") == false && string(got) == want+"\r\n") {
		t.Errorf("body %q in chunks of %d: spooled %q, want %q", body, chunk, got, want)
	}
	norm := refNormalise(body)
	want := sha256.Sum256([]byte(refRelaxedBody(norm)))
	if !bytes.Equal(m.bodyHash, want[:]) {
		t.Errorf("body %q in chunks of %d: body hash is not that of %q", body, chunk, refRelaxedBody(norm))
	}
}

func chunked(s string, n int) []string {
	var out []string
	for len(s) > n {
		out = append(out, s[:n])
		s = s[n:]
	}
	return append(out, s)
}

func TestNormaliseAndBodyHashMatchReference(t *testing.T) {
	for _, body := range fastPathBodies {
		for _, n := range []int{1, 2, 3, 7, 64, 1 << 20} {
			checkFastPath(t, body, n)
		}
	}
}

func FuzzNormaliseAndBodyHash(f *testing.F) {
	for _, b := range fastPathBodies {
		f.Add(b, uint16(5))
	}
	f.Fuzz(func(t *testing.T, body string, chunk uint16) {
		checkFastPath(t, body, int(chunk%4096)+1)
	})
}

// refPlainRun is plainRun line by line: the whole lines at the start of
// p that have content, no two spaces in a row and no space at the end.
func refPlainRun(p string) int {
	n := 0
	for {
		line, _, ok := strings.Cut(p[n:], "\r\n")
		if !ok || line == "" || strings.Contains(line, "  ") || strings.HasSuffix(line, " ") {
			return n
		}
		n += len(line) + 2
	}
}

// TestPlainRun holds plainRun, which reads 8 bytes at a time, to the
// line-by-line rule: all short strings of a, space and CRLF, at every
// alignment, and lines of every length around the word size.
func TestPlainRun(t *testing.T) {
	var cases []string
	var gen func(prefix string, n int)
	gen = func(prefix string, n int) {
		cases = append(cases, prefix)
		if n == 0 {
			return
		}
		for _, s := range []string{"a", " ", "\r\n"} {
			gen(prefix+s, n-1)
		}
	}
	gen("", 9)
	for n := 1; n < 40; n++ {
		line := strings.Repeat("x", n)
		cases = append(cases, line+"\r\n"+line+"\r\n", line+" \r\n", line+"  y\r\n", line+"\r\n\r\n", " "+line+"\r\n", line+" "+line+"\r\n"+line)
	}
	for _, c := range cases {
		for pad := range 8 { // every alignment of c to the words plainRun reads
			p := strings.Repeat("z", pad) + "\r\n" + c
			want := refPlainRun(p)
			if got := plainRun([]byte(p)); got != want {
				t.Fatalf("plainRun(%q) = %d, want %d", p, got, want)
			}
		}
	}
}

// WriteSigned writes a message held in memory as its pieces are, without
// a copy buffer of its own: io.Copy through io.MultiReader allocated 32 KiB
// per message.
func TestWriteSignedFromMemoryAllocatesLittle(t *testing.T) {
	body := strings.Repeat(strings.Repeat("w", 70)+"\r\n", 3000) // 216 KB: several pieces
	m := spoolString(t, hdr+body, SpoolOptions{})
	if m.OnDisk() {
		t.Fatal("the message went to disk")
	}
	var out bytes.Buffer
	out.Grow(len(hdr) + len(body) + 1024)
	fields := []string{"DKIM-Signature: v=1; test\r\n"}
	allocs := testing.AllocsPerRun(20, func() {
		out.Reset()
		if _, err := WriteSigned(&out, fields, m); err != nil {
			t.Fatal(err)
		}
	})
	if out.String() != fields[0]+hdr+body {
		t.Fatal("WriteSigned wrote something else")
	}
	if allocs > 3 {
		t.Errorf("WriteSigned of a message in memory: %.0f allocations, want at most 3", allocs)
	}
}
