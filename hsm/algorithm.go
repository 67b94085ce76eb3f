package hsm

import (
	"fmt"
	"strings"
)

// Algorithm is a key type and size dkimgw generates and signs with.
type Algorithm string

// The algorithms DKIM verifiers accept (RFC 6376, RFC 8301, RFC 8463).
const (
	RSA2048 Algorithm = "rsa-2048"
	RSA3072 Algorithm = "rsa-3072"
	RSA4096 Algorithm = "rsa-4096"
	Ed25519 Algorithm = "ed25519"
)

// DefaultAlgorithm is what every verifier accepts today: Ed25519 alone is
// still ignored by many receivers, so it is for dual signing.
const DefaultAlgorithm = RSA2048

// Algorithms returns the supported algorithms, in a fresh slice: what
// ParseAlgorithm accepts cannot be changed by a caller.
func Algorithms() []Algorithm { return []Algorithm{RSA2048, RSA3072, RSA4096, Ed25519} }

// minRSABits is today's floor: RFC 8301 forbids below 1024 bits, and 1024
// is within reach of a well-funded attacker.
const minRSABits = 2048

// ParseAlgorithm parses an algorithm name such as "rsa-2048" or "ed25519".
// An RSA size below 2048 bits is ErrWeakKey.
func ParseAlgorithm(s string) (Algorithm, error) {
	a := Algorithm(strings.ToLower(strings.TrimSpace(s)))
	for _, known := range Algorithms() {
		if a == known {
			return a, nil
		}
	}
	var bits int
	if _, err := fmt.Sscanf(string(a), "rsa-%d", &bits); err == nil && bits < minRSABits {
		return "", errorf("%w: RSA keys below %d bits are refused (RFC 8301; %d bits is today's floor)", ErrWeakKey, minRSABits, minRSABits)
	}
	return "", errorf("%w %q: use one of rsa-2048, rsa-3072, rsa-4096, ed25519", ErrUnknownAlgorithm, s)
}

// IsRSA reports whether a is an RSA algorithm.
func (a Algorithm) IsRSA() bool { return strings.HasPrefix(string(a), "rsa-") }

// Bits is the key size: the RSA modulus size, or 256 for Ed25519.
func (a Algorithm) Bits() int {
	switch a {
	case RSA2048:
		return 2048
	case RSA3072:
		return 3072
	case RSA4096:
		return 4096
	case Ed25519:
		return 256
	}
	return 0
}
