package hsm_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/dkimgw/dkimgw/hsm"
)

func TestRecords(t *testing.T) {
	t.Parallel()
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tt := range []struct {
		name string
		pub  any
		k    string
	}{{"rsa", &rsaKey.PublicKey, "rsa"}, {"ed25519", edPub, "ed25519"}} {
		t.Run(tt.name, func(t *testing.T) {
			value, err := hsm.TXTRecord(tt.pub)
			if err != nil {
				t.Fatal(err)
			}
			prefix := "v=DKIM1; k=" + tt.k + "; p="
			if !strings.HasPrefix(value, prefix) {
				t.Fatalf("record %q does not start with %q", value, prefix)
			}
			raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(value, prefix))
			if err != nil {
				t.Fatal(err)
			}
			switch pub := tt.pub.(type) {
			case *rsa.PublicKey:
				got, err := x509.ParsePKIXPublicKey(raw)
				if err != nil || !pub.Equal(got) {
					t.Fatalf("p= is not the key's SubjectPublicKeyInfo (%v)", err)
				}
			case ed25519.PublicKey:
				if !pub.Equal(ed25519.PublicKey(raw)) {
					t.Fatal("p= is not the raw 32-byte Ed25519 key")
				}
			}

			// The zone-file line parses as a TXT record whose strings are
			// at most 255 bytes and join to the value.
			line, err := hsm.ZoneLine("Example.com", "s1", 0, tt.pub)
			if err != nil {
				t.Fatal(err)
			}
			rr, err := dns.NewRR(line)
			if err != nil {
				t.Fatalf("zone line %q does not parse: %v", line, err)
			}
			txt, ok := rr.(*dns.TXT)
			if !ok || txt.Hdr.Name != "s1._domainkey.example.com." || txt.Hdr.Ttl != hsm.DefaultRecordTTL {
				t.Fatalf("parsed %v", rr)
			}
			for _, s := range txt.Txt {
				if len(s) > 255 {
					t.Errorf("character-string of %d bytes", len(s))
				}
			}
			if strings.Join(txt.Txt, "") != value {
				t.Error("the strings of the zone line do not join to the record value")
			}
		})
	}
	if _, err := hsm.TXTRecord("not a key"); err == nil {
		t.Error("TXTRecord accepted a string")
	}
}

func TestParseAlgorithm(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]hsm.Algorithm{"rsa-2048": hsm.RSA2048, "RSA-4096": hsm.RSA4096, " ed25519 ": hsm.Ed25519, "rsa-3072": hsm.RSA3072} {
		if got, err := hsm.ParseAlgorithm(in); err != nil || got != want {
			t.Errorf("ParseAlgorithm(%q) = %q, %v", in, got, err)
		}
	}
	for in, want := range map[string]error{"rsa-1024": hsm.ErrWeakKey, "rsa-512": hsm.ErrWeakKey, "rsa-8192": hsm.ErrUnknownAlgorithm, "ecdsa": hsm.ErrUnknownAlgorithm, "": hsm.ErrUnknownAlgorithm} {
		if _, err := hsm.ParseAlgorithm(in); err == nil || !errorsIs(err, want) {
			t.Errorf("ParseAlgorithm(%q) error = %v, want %v", in, err, want)
		}
	}
}
