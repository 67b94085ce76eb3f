package testenv

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/emersion/go-msgauth/dkim"
)

// TestDKIMVerifiers checks the harness itself, with go-msgauth's signer
// rather than dkimgw's: each verifier must report a pass for every
// signature it supports, a failure for a tampered message, and one result
// per signature in header order.
func TestDKIMVerifiers(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	msg := "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: harness\r\n\r\nHello.\r\n"
	signed := []byte(msg)
	records := map[string]string{}
	// Signed bottom-up: the rsa signature ends up first.
	for _, k := range []struct {
		sel string
		key crypto.Signer
	}{{"ed", edKey}, {"rsa", rsaKey}} {
		var b bytes.Buffer
		opts := &dkim.SignOptions{Domain: "example.org", Selector: k.sel, Signer: k.key,
			HeaderCanonicalization: dkim.CanonicalizationRelaxed, BodyCanonicalization: dkim.CanonicalizationRelaxed}
		if err := dkim.Sign(&b, bytes.NewReader(signed), opts); err != nil {
			t.Fatal(err)
		}
		signed = b.Bytes()
		rec, err := hsm.TXTRecord(k.key.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[hsm.RecordName("example.org", k.sel)] = rec
	}
	tampered := bytes.Replace(signed, []byte("Hello."), []byte("Hello!"), 1)

	for _, v := range DKIMVerifiers() {
		t.Run(v.Name, func(t *testing.T) {
			res := v.Verify(t, records, signed, tampered)
			for i, want := range []bool{true, false} {
				if len(res[i]) != 2 {
					t.Fatalf("message %d: %d results, want 2: %v", i, len(res[i]), res[i])
				}
				for j, sel := range []string{"rsa", "ed"} {
					r := res[i][j]
					if r.Selector != sel || r.Domain != "example.org" {
						t.Errorf("message %d result %d is for s=%s d=%s, want s=%s d=example.org", i, j, r.Selector, r.Domain, sel)
					}
					if sel == "ed" && !v.Ed25519 {
						if r.Pass {
							t.Errorf("message %d: %v passes, but %s is declared without Ed25519", i, r, v.Name)
						}
						continue
					}
					if r.Pass != want {
						t.Errorf("message %d: %v, want pass=%v", i, r, want)
					}
					if !r.Pass && strings.TrimSpace(r.Reason) == "" {
						t.Errorf("message %d: failure without a reason: %v", i, r)
					}
				}
			}
		})
	}
}

func TestParseOpenDKIM(t *testing.T) {
	out := "### INSHEADER: idx=0 hname='Authentication-Results' hvalue='DEBUG-j;\n" +
		"\tdkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=r header.b=BVUad/jb;\n" +
		"\tdkim=fail reason=\"signature verification failed\" header.d=example.com header.i=@example.com header.a=ed25519-sha256 header.s=e header.b=wBU4j3eB;\n" +
		"\tdkim-atps=neutral'\n"
	res, err := parseOpenDKIM(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []DKIMResult{
		{Domain: "example.com", Selector: "r", Algorithm: "rsa-sha256", Pass: true, Reason: `pass "2048-bit key"`},
		{Domain: "example.com", Selector: "e", Algorithm: "ed25519-sha256", Pass: false, Reason: `fail "signature verification failed"`},
	}
	if len(res) != len(want) {
		t.Fatalf("got %v, want %v", res, want)
	}
	for i := range want {
		if res[i] != want[i] {
			t.Errorf("result %d = %+v, want %+v", i, res[i], want[i])
		}
	}
	if _, err := parseOpenDKIM("opendkim: x.eml: message not signed\n"); err == nil {
		t.Error("output without Authentication-Results parsed without error")
	}
}
