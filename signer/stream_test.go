package signer

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
)

// TestStreamSignsLikeSpool: a message pushed to a Stream in pieces of
// any size, with bare LFs, signs exactly as the same message spooled,
// and the signature verifies on the CRLF message an MTA delivers.
func TestStreamSignsLikeSpool(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	ids := []Identity{{Domain: "example.com", Selector: "rsa", Key: rsaKey}, {Domain: "example.com", Selector: "ed", Key: edKey}}
	opts := Options{Now: func() time.Time { return time.Unix(1700000000, 0) }}
	msg := "From: Joe <joe@example.com>\nTo: a@example.net\nSubject: folded\n\tsubject  line\n\nbody  line \t\n\n" + strings.Repeat("x", 70000) + "\n\n\n"
	want := signString(t, msg, ids, opts)
	for _, size := range []int{1, 7, 4096, len(msg)} {
		st := NewStream(SpoolOptions{})
		for _, c := range chunks([]byte(msg), size) {
			if _, err := st.Write([]byte(c)); err != nil {
				t.Fatalf("size %d: Write: %v", size, err)
			}
		}
		m, err := st.Finish()
		if err != nil {
			t.Fatalf("size %d: Finish: %v", size, err)
		}
		if m.FromDomain() != "example.com" {
			t.Errorf("size %d: FromDomain %q", size, m.FromDomain())
		}
		if _, err := m.Open(); err == nil {
			t.Errorf("size %d: Open of a streamed message succeeded; its bytes were never kept", size)
		}
		fields, err := Sign(context.Background(), m, ids, opts)
		if err != nil {
			t.Fatalf("size %d: Sign: %v", size, err)
		}
		got := strings.Join(fields, "") + strings.ReplaceAll(msg, "\n", "\r\n")
		if got != want {
			t.Errorf("size %d: streamed signature differs from the spooled one:\n%s\nwant\n%s", size, got[:400], want[:400])
		}
		vs, err := dkim.VerifyWithOptions(bytes.NewReader([]byte(got)), &dkim.VerifyOptions{LookupTXT: lookupTXT(rsaKey, edKey)})
		if err != nil || len(vs) != 2 {
			t.Fatalf("size %d: verify: %v, %d results", size, err, len(vs))
		}
		for _, v := range vs {
			if v.Err != nil {
				t.Errorf("size %d: %s: %v", size, v.Domain, v.Err)
			}
		}
	}
}

// TestStreamRefuses: the Spool checks apply, and the first error sticks.
func TestStreamRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, msg string
		opts      SpoolOptions
		tooLarge  bool
	}{
		{name: "no From", msg: "To: a@example.net\r\n\r\nbody\r\n"},
		{name: "two From", msg: "From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n"},
		{name: "header over limit", msg: "From: a@example.com\r\nX: " + strings.Repeat("y", 2000) + "\r\n\r\n", opts: SpoolOptions{MaxHeaderBytes: 1024}},
		{name: "message over limit", msg: "From: a@example.com\r\n\r\n" + strings.Repeat("y", 3000), opts: SpoolOptions{MaxMessageBytes: 2048}, tooLarge: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := NewStream(tc.opts)
			var werr error
			for _, c := range chunks([]byte(tc.msg), 100) {
				if _, werr = st.Write([]byte(c)); werr != nil {
					break
				}
			}
			_, err := st.Finish()
			if err == nil {
				t.Fatal("Finish succeeded")
			}
			if werr != nil && err != werr {
				t.Errorf("Finish returned %v after Write returned %v", err, werr)
			}
			if tc.tooLarge != errors.Is(err, ErrTooLarge) {
				t.Errorf("error %v; ErrTooLarge expected: %v", err, tc.tooLarge)
			}
			if _, ok := errors.AsType[*RefusedError](err); !tc.tooLarge && !ok {
				t.Errorf("error %v is not a *RefusedError", err)
			}
		})
	}
}
