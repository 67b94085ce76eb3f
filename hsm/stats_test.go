package hsm_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"os"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
)

// TestStats checks the pool gauges and the error and re-initialisation
// counters that /metrics reads, on a real token.
func TestStats(t *testing.T) {
	// Not parallel: another test's token re-initialises the module too.
	tok, _, _ := openToken(t, "&max-sessions=1")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	if s := tok.Stats(); s.SessionsInUse != 0 || s.SessionsIdle != 1 || s.SessionsWaiting != 0 {
		t.Fatalf("after one signature: %+v, want 0 in use, 1 idle, 0 waiting", s)
	}

	release := hsm.HoldSessions(tok, 1)
	done := make(chan error, 1)
	go func() {
		digest := sha256.Sum256([]byte("x"))
		_, err := key.SignContext(t.Context(), digest[:], crypto.Hash(0))
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for tok.Stats().SessionsWaiting != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if s := tok.Stats(); s.SessionsWaiting != 1 || s.SessionsInUse != 1 {
		t.Fatalf("with the only session held: %+v, want 1 in use and 1 waiting", s)
	}
	release()
	if err := <-done; err != nil {
		t.Fatalf("sign after the session was released: %v", err)
	}
	if s := tok.Stats(); s.SessionsWaiting != 0 {
		t.Fatalf("after the wait: %+v, want 0 waiting", s)
	}

	before := tok.Stats()
	if err := hsm.FinalizeModule(tok); err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	after := tok.Stats()
	if after.Reinitializations <= before.Reinitializations {
		t.Errorf("re-initialisations %d -> %d after the module was finalised behind the token's back", before.Reinitializations, after.Reinitializations)
	}
	for name, n := range after.Errors {
		if name == "" || n == 0 {
			t.Errorf("error count %q = %d", name, n)
		}
	}
	if after.Errors["CKR_CRYPTOKI_NOT_INITIALIZED"] == 0 {
		t.Errorf("errors = %v, want CKR_CRYPTOKI_NOT_INITIALIZED counted", after.Errors)
	}
}

// TestCheck: the readiness probe fails, temporarily, while the token's
// files are gone, and passes again once they are back, with no signature
// made in between.
func TestCheck(t *testing.T) {
	t.Parallel()
	tok, st, _ := openToken(t, "")
	if _, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519); err != nil {
		t.Fatal(err)
	}
	if err := tok.Check(t.Context()); err != nil {
		t.Fatalf("Check on a healthy token: %v", err)
	}
	dir := st.Dir()
	aside := t.TempDir()
	copyFiles(t, dir, aside)
	removeToken(t, dir)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	err := tok.Check(ctx)
	if err == nil || !hsm.IsTemporary(err) {
		t.Fatalf("Check with the token gone = %v, want a temporary error", err)
	}
	onePrefix(t, err)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyFiles(t, aside, dir)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = tok.Check(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Check did not pass after the token came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
