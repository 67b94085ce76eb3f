// dkimgw's tests of its patch (PATCHES.md): Sign offers the token a
// buffer of signBufferGuess bytes at once. Run as upstream's tests are,
// against SoftHSM with a token initialised with PIN 1234 in slot 0.

package pkcs11

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"math/big"
	"testing"
)

// TestSignBufferGuess signs with the guess larger than, smaller than and
// without a guess, and checks each signature against the public key: a
// guess too small must fall back to the length query with the operation
// still active (PKCS#11 5.12), not end it or return a short signature.
func TestSignBufferGuess(t *testing.T) {
	p := setenv(t)
	session := getSession(p, t)
	defer finishSession(p, session)
	pbk, pvk := generateRSAKeyPair(t, p, session, "TestSignBufferGuess", false)
	attrs, err := p.GetAttributeValue(session, pbk, []*Attribute{NewAttribute(CKA_MODULUS, nil), NewAttribute(CKA_PUBLIC_EXPONENT, nil)})
	if err != nil {
		t.Fatal(err)
	}
	pub := &rsa.PublicKey{N: new(big.Int).SetBytes(attrs[0].Value), E: int(new(big.Int).SetBytes(attrs[1].Value).Int64())}
	digest := sha256.Sum256([]byte("dkimgw"))
	// DigestInfo of SHA-256 (RFC 8017 9.2) ahead of the digest: CKM_RSA_PKCS signs it as given.
	prefix := []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	input := append(prefix, digest[:]...)

	defer func(g int) { signBufferGuess = g }(signBufferGuess)
	for _, guess := range []int{512, 256, 255, 16, 1, 0} {
		signBufferGuess = guess
		if err := p.SignInit(session, []*Mechanism{NewMechanism(CKM_RSA_PKCS, nil)}, pvk); err != nil {
			t.Fatalf("guess %d: SignInit: %v", guess, err)
		}
		sig, err := p.Sign(session, input)
		if err != nil {
			t.Fatalf("guess %d: Sign: %v", guess, err)
		}
		if len(sig) != 256 {
			t.Fatalf("guess %d: signature of %d bytes, want 256", guess, len(sig))
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("guess %d: signature does not verify: %v", guess, err)
		}
	}
	// The operation ended with each signature: a Sign without SignInit
	// must fail, whatever the guess.
	signBufferGuess = 512
	if _, err := p.Sign(session, input); err == nil {
		t.Fatal("Sign without SignInit succeeded")
	}
}
