package hsm

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Test hooks that act on the token behind the Token's back, the way a
// failing device, an administrator or another process would.

// CloseAllSessions closes every session of the token's slot, the login
// session included, which logs the process out.
func CloseAllSessions(t *Token) error {
	c, err := t.mod.enter(context.Background())
	if err != nil {
		return err
	}
	defer t.mod.leave(c)
	t.mu.Lock()
	slot := t.slot
	t.mu.Unlock()
	return t.mod.ctx.CloseAllSessions(slot)
}

// FinalizeModule finalises the library without the module noticing, as if
// the process had lost it.
func FinalizeModule(t *Token) error {
	m := t.mod
	deadline := time.Now().Add(10 * time.Second)
	for {
		m.mu.Lock()
		if m.gate == nil && len(m.calls) == 0 {
			gate := make(chan struct{})
			m.gate = gate
			m.mu.Unlock()
			err := m.ctx.Finalize()
			m.mu.Lock()
			m.gate = nil
			close(gate)
			m.mu.Unlock()
			return err
		}
		m.mu.Unlock()
		if time.Now().After(deadline) {
			return errors.New("the module never became idle")
		}
		time.Sleep(time.Millisecond)
	}
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

// HangCall starts a token call that does not return until release is
// called, as a network HSM that stops answering one request would. It
// returns once the call is in progress.
func HangCall(t *Token) (release func()) {
	started, stop := make(chan struct{}), make(chan struct{})
	go t.withSession(context.Background(), func(*pkcs11.Ctx, pkcs11.SessionHandle, uint64) error {
		close(started)
		<-stop
		return nil
	})
	<-started
	return sync.OnceFunc(func() { close(stop) })
}

// Reinitialize re-initialises the token's module, as recovery from a lost
// device does.
func Reinitialize(ctx context.Context, t *Token) error {
	return t.mod.reinitialize(ctx, t.log, t.mod.generation(), false, "test")
}

// ModuleGeneration is the number of initialisations of the token's module.
func ModuleGeneration(t *Token) uint64 { return t.mod.generation() }

// ReinitPending reports whether a re-initialisation of the token's module
// has closed the gate to new calls.
func ReinitPending(t *Token) bool {
	t.mod.mu.Lock()
	defer t.mod.mu.Unlock()
	return t.mod.gate != nil
}

// Logins is how many times the Token called C_Login.
func Logins(t *Token) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.logins
}
