package hsm

import "context"

// AuditKeyLabel labels the audit key: the key that signs the audit log's
// checkpoints. It is not a DKIM key (its label is no record name), so
// Keys does not list it and Key does not find it.
const AuditKeyLabel = "dkimgw-audit"

// AuditKey returns the token's audit key, or ErrKeyNotFound when it has
// none. It is refused, like a DKIM key, when it is or was extractable or
// was not generated in the token.
func (t *Token) AuditKey(ctx context.Context) (*Key, error) {
	return t.loadKey(ctx, "", "", AuditKeyLabel)
}

// GenerateAuditKey generates the audit key in the token, with the same
// protection as DKIM keys (sensitive, non-extractable, sign-only):
// Ed25519 when the token has it (small, fast signatures), else RSA-2048.
// A token that has one already gives ErrKeyExists.
func (t *Token) GenerateAuditKey(ctx context.Context) (*Key, error) {
	alg := RSA2048
	if t.SupportsEd25519() {
		alg = Ed25519
	}
	return t.generate(ctx, "", "", AuditKeyLabel, alg)
}

// SupportsEd25519 reports whether the token can generate Ed25519 keys
// and sign with them.
func (t *Token) SupportsEd25519() bool {
	return t.checkMechanisms(Ed25519) == nil
}
