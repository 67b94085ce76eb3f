package hsm

import (
	"context"

	"github.com/miekg/pkcs11"
)

// Test hooks that act on the token behind the Token's back, the way a
// failing device, an administrator or another process would.

// CloseAllSessions closes every session of the token's slot, the login
// session included, which logs the process out.
func CloseAllSessions(t *Token) error {
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	t.mu.Lock()
	slot := t.slot
	t.mu.Unlock()
	return t.mod.ctx.CloseAllSessions(slot)
}

// FinalizeModule finalises the library without the module noticing, as if
// the process had lost it.
func FinalizeModule(t *Token) error {
	t.mod.mu.Lock()
	defer t.mod.mu.Unlock()
	return t.mod.ctx.Finalize()
}

// WithRawSession runs fn on one of the token's sessions.
func WithRawSession(t *Token, fn func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error) error {
	_, err := t.withSession(context.Background(), func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		return fn(c, s)
	})
	return err
}

// DropMechanism makes the Token believe the token lacks mech.
func DropMechanism(t *Token, mech uint) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.mechs, mech)
}

// HoldSessions takes n pool slots until release is called.
func HoldSessions(t *Token, n int) (release func()) {
	for range n {
		t.sem <- struct{}{}
	}
	return func() {
		for range n {
			<-t.sem
		}
	}
}

// PoolSize is the session pool's capacity.
func PoolSize(t *Token) int { return cap(t.sem) }

// WithPrivateHandle runs fn on a session with the key's private-key handle
// in that session's connection.
func WithPrivateHandle(k *Key, fn func(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle) error) error {
	_, err := k.token.withSession(context.Background(), func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error {
		h, err := k.handleFor(c, s, epoch)
		if err != nil {
			return err
		}
		return fn(c, s, h)
	})
	return err
}

const (
	CKKECEdwards           = ckkECEdwards
	CKMECEdwardsKeyPairGen = ckmECEdwardsKeyPairGen
	CKMEdDSA               = ckmEdDSA
)
