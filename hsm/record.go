package hsm

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/dkimgw/dkimgw/dnsname"
)

// DefaultRecordTTL is the TTL written into zone-file lines. An hour keeps
// caches short enough that a withdrawn selector disappears within a working
// day, and long enough not to load the authoritative servers.
const DefaultRecordTTL = 3600

// RecordName is the DNS owner name of a selector's key record, without the
// trailing dot: "<selector>._domainkey.<domain>" (RFC 6376 §3.6.2.1). It is
// also the CKA_LABEL of the key's objects in the token.
func RecordName(domain, selector string) string {
	return selector + "._domainkey." + strings.TrimSuffix(strings.ToLower(domain), ".")
}

// TXTRecord renders pub as the value of a DKIM key record (RFC 6376
// §3.6.1): "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>" for RSA, and
// "v=DKIM1; k=ed25519; p=<base64 of the raw 32-byte key>" for Ed25519
// (RFC 8463 §4.2).
func TXTRecord(pub crypto.PublicKey) (string, error) {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return "", errorf("encode RSA public key: %w", err)
		}
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		if len(pub) != ed25519.PublicKeySize {
			return "", errorf("Ed25519 public key has %d bytes, want %d", len(pub), ed25519.PublicKeySize)
		}
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(pub), nil
	default:
		return "", errorf("no DKIM record for public key type %T", pub)
	}
}

// ZoneLine renders a complete zone-file line for a key record, e.g.
//
//	s1._domainkey.example.com. 3600 IN TXT "v=DKIM1; k=rsa; p=MIIB..." "..."
//
// which BIND, Knot and NSD accept as is. A ttl of 0 means DefaultRecordTTL.
func ZoneLine(domain, selector string, ttl int, pub crypto.PublicKey) (string, error) {
	value, err := TXTRecord(pub)
	if err != nil {
		return "", err
	}
	if ttl <= 0 {
		ttl = DefaultRecordTTL
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s. %d IN TXT", RecordName(domain, selector), ttl)
	for _, part := range dnsname.SplitTXT(value) {
		// Record values are base64 and "v=DKIM1; k=...; p=": no quote or
		// backslash can occur, so no escaping is needed.
		b.WriteString(` "` + part + `"`)
	}
	return b.String(), nil
}
