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
