package rotation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/signer"
	"github.com/emersion/go-msgauth/dkim"
)

// recordValue renders pub as a DKIM key record (RFC 6376 §3.6.1; RFC 8463
// §4.2 for Ed25519), the same text hsm.TXTRecord renders.
func recordValue(pub crypto.PublicKey) (string, error) {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return "", fmt.Errorf("rotation: encode RSA public key: %w", err)
		}
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		if len(pub) != ed25519.PublicKeySize {
			return "", fmt.Errorf("rotation: Ed25519 public key has %d bytes", len(pub))
		}
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(pub), nil
	}
	return "", fmt.Errorf("rotation: no DKIM record for public key type %T", pub)
}

// probe signs a small message with key, as the relay would, and verifies
// it with go-msgauth against served, the record value every
// authoritative server returned. It proves the key in the key store and
// the record in DNS belong together before any real mail depends on it.
func probe(ctx context.Context, domain, selector string, key crypto.Signer, served string, now time.Time) error {
	msg := "From: dkimgw key probe <postmaster@" + domain + ">\r\n" +
		"To: postmaster@" + domain + "\r\n" +
		"Subject: dkimgw probe of " + selector + "\r\n" +
		"Date: " + now.UTC().Format(time.RFC1123Z) + "\r\n" +
		"Message-ID: <probe." + selector + "@" + domain + ">\r\n" +
		"\r\n" +
		"This message tests that " + selector + "._domainkey." + domain + " verifies.\r\n"
	m, err := signer.Spool(ctx, strings.NewReader(msg), signer.SpoolOptions{})
	if err != nil {
		return fmt.Errorf("rotation: probe message: %w", err)
	}
	defer m.Close()
	fields, err := signer.Sign(ctx, m, []signer.Identity{{Domain: domain, Selector: selector, Key: key}},
		signer.Options{Now: func() time.Time { return now }})
	if err != nil {
		return fmt.Errorf("rotation: sign the probe with %s: %w", selector, err)
	}
	var buf bytes.Buffer
	if _, err := signer.WriteSigned(&buf, fields, m); err != nil {
		return fmt.Errorf("rotation: probe message: %w", err)
	}
	name := selector + "._domainkey." + domain
	vs, err := dkim.VerifyWithOptions(&buf, &dkim.VerifyOptions{
		LookupTXT: func(q string) ([]string, error) {
			if strings.TrimSuffix(strings.ToLower(q), ".") != name {
				return nil, fmt.Errorf("probe looked up %q, not %q", q, name)
			}
			return []string{served}, nil
		},
	})
	if err != nil {
		return fmt.Errorf("rotation: verify the probe: %w", err)
	}
	if len(vs) != 1 {
		return fmt.Errorf("rotation: the probe has %d signatures, want 1", len(vs))
	}
	if vs[0].Err != nil {
		return fmt.Errorf("rotation: the probe signed with %s does not verify against the record DNS serves (is the key in the key store the one published?): %w", selector, vs[0].Err)
	}
	return nil
}
