package signer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSpoolFieldCountLimit: a header section of many tiny fields (a
// bomb that stays under MaxHeaderBytes) is refused once it passes
// MaxHeaderFields, instead of costing a record per field; a section of
// exactly MaxHeaderFields fields is accepted.
func TestSpoolFieldCountLimit(t *testing.T) {
	msg := func(fields int) string {
		var b strings.Builder
		b.WriteString("From: a@example.com\r\n")
		for i := 1; i < fields; i++ {
			fmt.Fprintf(&b, "X%d: y\r\n", i%10)
		}
		b.WriteString("\r\nbody\r\n")
		return b.String()
	}
	m, err := Spool(context.Background(), strings.NewReader(msg(MaxHeaderFields)), SpoolOptions{})
	if err != nil {
		t.Fatalf("%d fields: %v", MaxHeaderFields, err)
	}
	m.Close()
	for _, n := range []int{MaxHeaderFields + 1, 100000} {
		_, err := Spool(context.Background(), strings.NewReader(msg(n)), SpoolOptions{})
		var re *RefusedError
		if !errors.As(err, &re) || !strings.Contains(re.Reason, "fields") {
			t.Errorf("%d fields: got %v, want a refusal naming the field count", n, err)
		}
	}
}

// TestFromDomainRefusesMappedLookalikes: a From domain that IDNA's
// mapping changes beyond letter case (invisible characters, fullwidth
// letters, decomposed accents) is refused: a receiver that does not map
// it sees a name other than the one signed, and a person sees one that
// looks like it. Only case differences are folded.
func TestFromDomainRefusesMappedLookalikes(t *testing.T) {
	for _, d := range []string{
		"a\u200b.example",      // zero-width space, mapped away
		"a\u00ad.example",      // soft hyphen, mapped away
		"\uff41.example",       // fullwidth a, mapped to a
		"bu\u0308cher.example", // u and a combining diaeresis, mapped to ü
	} {
		_, err := Spool(t.Context(), strings.NewReader("From: x@"+d+"\r\n\r\n"), SpoolOptions{})
		var re *RefusedError
		if !errors.As(err, &re) {
			t.Errorf("From domain %q: got %v, want a refusal", d, err)
		}
		if Aligned(d, "a.example") || Aligned(d, "bücher.example") {
			t.Errorf("Aligned(%q, ...) is true", d)
		}
	}
	for d, want := range map[string]string{"BÜCHER.example": "xn--bcher-kva.example", "bücher.example": "xn--bcher-kva.example"} {
		m, err := Spool(t.Context(), strings.NewReader("From: x@"+d+"\r\n\r\n"), SpoolOptions{})
		if err != nil {
			t.Errorf("From domain %q: %v", d, err)
			continue
		}
		if m.FromDomain() != want {
			t.Errorf("From domain %q: FromDomain() = %q, want %q", d, m.FromDomain(), want)
		}
		m.Close()
	}
}

// TestCleanSpoolDir: only regular files named as Spool names them are
// removed; a missing directory is an error that names the spool dir.
func TestCleanSpoolDir(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"dkimgw-spool-1", "dkimgw-spool-2345678901", "dkimgw-spool-", "dkimgw-spool-1.tmp", "other"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "dkimgw-spool-3"), 0o700); err != nil {
		t.Fatal(err)
	}
	// A file Spool is writing right now is already unlinked: a
	// concurrent Spool is not disturbed.
	m, err := Spool(t.Context(), strings.NewReader("From: a@example.com\r\n\r\n"+strings.Repeat("x\r\n", 1000)), SpoolOptions{Dir: dir, MemoryLimit: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	removed, err := CleanSpoolDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(removed, " "); got != "dkimgw-spool-1 dkimgw-spool-2345678901" {
		t.Errorf("removed %q", got)
	}
	var left []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if got := strings.Join(left, " "); got != "dkimgw-spool- dkimgw-spool-1.tmp dkimgw-spool-3 other" {
		t.Errorf("left %q", got)
	}
	r, err := m.Open()
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(r); len(b) != 23+3000 {
		t.Errorf("the spooled message reads back %d bytes", len(b))
	}
	if _, err := CleanSpoolDir(filepath.Join(dir, "missing")); err == nil || !strings.HasPrefix(err.Error(), "signer: read spool dir") {
		t.Errorf("missing dir: %v", err)
	}
}
