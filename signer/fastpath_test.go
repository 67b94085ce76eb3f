package signer

import (
	"bytes"
	"context"
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

// refPlainLFRun is the rule plainLFRun keeps, line by line: the whole
// lines at the start of p that have content, no two spaces in a row, no
// space at the end, and (where plainLFRun is cautious) no space first.
func refPlainLFRun(p string) int {
	n := 0
	for {
		line, _, ok := strings.Cut(p[n:], "\n")
		if !ok || line == "" || strings.Contains(line, "  ") || strings.HasPrefix(line, " ") || strings.HasSuffix(line, " ") {
			return n
		}
		n += len(line) + 1
	}
}

// TestPlainLFRun holds plainLFRun, which reads 8 bytes at a time, to the
// line-by-line rule: all short strings of a, space and LF at every
// alignment, and lines of every length around the word size. With a
// control character or a '!' it may stop sooner, never later, and only
// at a line end.
func TestPlainLFRun(t *testing.T) {
	var exact, cautious []string
	var gen func(prefix string, n int, alphabet []string, into *[]string)
	gen = func(prefix string, n int, alphabet []string, into *[]string) {
		*into = append(*into, prefix)
		if n == 0 {
			return
		}
		for _, s := range alphabet {
			gen(prefix+s, n-1, alphabet, into)
		}
	}
	gen("", 9, []string{"a", " ", "\n"}, &exact)
	gen("", 6, []string{"a", " ", "\n", "!", "\x01"}, &cautious)
	for n := 1; n < 40; n++ {
		line := strings.Repeat("x", n)
		exact = append(exact, line+"\n"+line+"\n", line+" \n", line+"  y\n", line+"\n\n", " "+line+"\n", line+" "+line+"\n"+line)
	}
	for _, c := range exact {
		for pad := range 16 { // every alignment, in both of the two-word loop's words
			p := strings.Repeat("z", pad) + "\n" + c
			if got, want := plainLFRun([]byte(p)), refPlainLFRun(p); got != want {
				t.Fatalf("plainLFRun(%q) = %d, want %d", p, got, want)
			}
		}
	}
	for _, c := range cautious {
		for pad := range 16 {
			p := strings.Repeat("z", pad) + "\n" + c
			got, most := plainLFRun([]byte(p)), refPlainLFRun(p)
			if got > most || (got > 0 && p[got-1] != '\n') {
				t.Fatalf("plainLFRun(%q) = %d: more than the %d plain bytes, or not at a line end", p, got, most)
			}
		}
	}
}

// lfBodies are bodies with LF line ends (as stored on Unix), to which
// SpoolAt's fast path applies, and the cases it must leave to the
// slower one: tabs, spaces in runs, at the end or first, empty lines
// within and at the end, controls, '!' after a space, a CR.
var lfBodies = []string{
	"plain line one\nplain line two\n",
	strings.Repeat("the quick brown fox jumps over a lazy dog while mail flows\n", 40),
	strings.Repeat("word\ttab and  two spaces \n\n plain after\nplain!\n", 30),
	"a\n\n\nb\n\n\n",
	"trailing \nno end",
	"no end at all",
	"x !y\n\x01 ctl\n \x7f\nok\n",
	strings.Repeat("short\nx\n", 100) + "a\rlone CR\n",
	strings.Repeat("a", 300) + "\n" + strings.Repeat("b ", 200) + "\n",
}

// TestSpoolAtFastPathLikeSpool: SpoolAt keeps, hashes and writes every
// LF body exactly as Spool does, whatever the size of the blocks it
// reads the source in (so that lines and the words plainLFRun reads
// straddle them), and stops at MaxMessageBytes as Spool does.
func TestSpoolAtFastPathLikeSpool(t *testing.T) {
	for _, body := range lfBodies {
		msg := "From: a@example.com\nSubject: s\n\n" + body
		for _, chunk := range []int{1, 2, 3, 7, 8, 9, 16, 17, 64, 1000, 1 << 20} {
			for _, max := range []int64{0, int64(len(msg)) / 2} {
				opts := SpoolOptions{MaxMessageBytes: max}
				spooled, serr := Spool(t.Context(), strings.NewReader(msg), opts)
				stored, aerr := spoolAt(t.Context(), strings.NewReader(msg), int64(len(msg)), opts, chunk)
				if serr != nil || aerr != nil {
					if serr == nil || aerr == nil || serr.Error() != aerr.Error() {
						t.Fatalf("body %q, blocks of %d, max %d: Spool: %v; SpoolAt: %v", body, chunk, max, serr, aerr)
					}
					continue
				}
				if !bytes.Equal(spooled.bodyHash, stored.bodyHash) || spooled.Size() != stored.Size() {
					t.Fatalf("body %q, blocks of %d: body hash or size differ from Spool's", body, chunk)
				}
				if a, b := readAll(t, spooled), readAll(t, stored); a != b {
					t.Fatalf("body %q, blocks of %d: SpoolAt's message %q, Spool's %q", body, chunk, b, a)
				}
				spooled.Close()
				stored.Close()
			}
		}
	}
}

// FuzzSpoolAtBlocks is FuzzSpoolAt with the block size fuzzed too.
func FuzzSpoolAtBlocks(f *testing.F) {
	for _, b := range lfBodies {
		f.Add("From: a@example.com\n\n"+b, uint16(7))
	}
	f.Fuzz(func(t *testing.T, msg string, chunk uint16) {
		spooled, serr := Spool(context.Background(), strings.NewReader(msg), SpoolOptions{})
		stored, aerr := spoolAt(context.Background(), strings.NewReader(msg), int64(len(msg)), SpoolOptions{}, int(chunk%2048)+1)
		if serr != nil || aerr != nil {
			if serr == nil || aerr == nil || serr.Error() != aerr.Error() {
				t.Fatalf("Spool: %v; SpoolAt: %v", serr, aerr)
			}
			return
		}
		defer spooled.Close()
		defer stored.Close()
		if !bytes.Equal(spooled.bodyHash, stored.bodyHash) {
			t.Fatal("body hashes differ")
		}
		if a, b := readAll(t, spooled), readAll(t, stored); a != b {
			t.Fatalf("SpoolAt's message %q, Spool's %q", b, a)
		}
	})
}
