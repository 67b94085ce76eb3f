package signer

import (
	"context"
	"errors"
	"fmt"
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
