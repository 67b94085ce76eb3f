package faults

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestPKCS11FaultShim checks the fault shim itself, in process, through
// the real hsm package: every fault it is told to inject reaches the
// caller as the failure a real token gives, and once it is lifted the
// token signs again. Pointed at SoftHSM itself, every "fails" step here
// would sign.
func TestPKCS11FaultShim(t *testing.T) {
	if testing.Short() {
		t.Skip("needs SoftHSM and a C compiler; not in -short")
	}
	st := testenv.SoftHSM(t)
	makeKeys(t, st)
	shim := testenv.NewPKCS11Fault(t)
	for _, kv := range shim.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	tok, err := hsm.Open(t.Context(), shim.URI(st.URI()), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	key, err := tok.Key(t.Context(), "example.com", "rsa1")
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("p11fault"))
	sign := func(timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(t.Context(), timeout)
		defer cancel()
		sig, err := key.SignContext(ctx, digest[:], crypto.SHA256)
		if err == nil {
			err = rsa.VerifyPKCS1v15(key.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig)
		}
		return err
	}
	// signsAgain: recovery re-initialises at most twice a second, so the
	// first signatures after a fault may still fail; bounded.
	signsAgain := func(what string) {
		t.Helper()
		var err error
		for range 40 {
			if err = sign(10 * time.Second); err == nil {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Fatalf("after %s the token does not sign again: %v", what, err)
	}
	if err := sign(10 * time.Second); err != nil {
		t.Fatalf("no fault: %v", err)
	}
	checkShimSessions(t, shim, tok, sign)
	// Here, in this process and before any fault: SoftHSM does not see
	// tokens created after another test initialised it in the process.
	t.Run("SlowTokenSignsInParallel", func(t *testing.T) { slowTokenSignsInParallel(t, shim, key) })
	t.Run("OneCSignPerSignature", func(t *testing.T) { oneCSignPerSignature(t, shim, sign) })

	for _, ckr := range []uint{testenv.CKRDeviceError, testenv.CKRDeviceRemoved, testenv.CKRSessionHandleInvalid} {
		before := shim.Injected("error")
		shim.Set(t, testenv.PKCS11FaultSpec{Error: ckr, ErrorOps: []string{"all"}})
		err := sign(10 * time.Second)
		if err == nil || !hsm.IsTemporary(err) {
			t.Errorf("CKR 0x%x on every call: sign = %v, want a temporary error", ckr, err)
		}
		if shim.Injected("error") == before {
			t.Errorf("CKR 0x%x: the shim logged no injected error", ckr)
		}
		shim.Set(t, testenv.PKCS11FaultSpec{})
		signsAgain("the device errors")
	}

	// C_Sign alone fails: the real operation must have been ended, or the
	// next C_SignInit on that session would fail with CKR_OPERATION_ACTIVE.
	shim.Set(t, testenv.PKCS11FaultSpec{Error: testenv.CKRDeviceError, ErrorOps: []string{"C_Sign"}})
	if err := sign(10 * time.Second); err == nil {
		t.Errorf("C_Sign failing: sign succeeded")
	}
	shim.Set(t, testenv.PKCS11FaultSpec{})
	signsAgain("failed C_Sign calls")

	shim.CloseAllSessions(t)
	signsAgain("every session was closed")
	if n := shim.Injected("close_all"); n != 1 {
		t.Errorf("the shim closed all sessions %d times, want 1", n)
	}

	shim.Set(t, testenv.PKCS11FaultSpec{Hang: 3 * time.Second})
	err = sign(500 * time.Millisecond)
	if err == nil || !hsm.IsTemporary(err) {
		t.Errorf("C_Sign hanging 3s, signing with a 500ms deadline: %v, want a temporary error", err)
	}
	if shim.Injected("hang") == 0 {
		t.Errorf("the shim logged no hang")
	}
	shim.Set(t, testenv.PKCS11FaultSpec{})
	signsAgain("the hang")
	// Close once the hung call has returned: with a call in flight the
	// module is left initialised (hsm.module.release), and with it
	// SoftHSM, loaded by the shim, with its token list as of this run's
	// C_Initialize. The next run of this test in the process (-count=2)
	// then loaded SoftHSM directly, got CKR_CRYPTOKI_ALREADY_INITIALIZED
	// and did not see its new token.
	idle := time.Now().Add(15 * time.Second)
	for tok.Stats().SessionsInUse > 0 {
		if time.Now().After(idle) {
			t.Fatalf("the call the hang left running has not returned 15s later")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The shim's count falls to 0 once the token is closed and the call
	// the hang left running (3 s) has returned. (While "all" calls fail,
	// the shim fails C_CloseSession too, so SoftHSM keeps sessions the
	// caller gave up: the count runs above the pool's until the module
	// is finalized. A real token that fails every call has lost them.)
	tok.Close()
	deadline := time.Now().Add(15 * time.Second)
	for {
		n, err := shim.Sessions()
		if err == nil && n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("15s after Close: the shim counts %d sessions open (%v), want 0", n, err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkShimSessions: the shim's own count of the sessions open in
// SoftHSM (what the soak watches) follows the token's pool as signing in
// parallel fills it: the pool's sessions and the one kept logged in.
func checkShimSessions(t *testing.T, shim *testenv.PKCS11Fault, tok *hsm.Token, sign func(time.Duration) error) {
	t.Helper()
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			for range 30 {
				if err := sign(10 * time.Second); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	n, err := shim.Sessions()
	s := tok.Stats()
	t.Logf("the shim counts %d sessions; the pool has %d idle, %d in use", n, s.SessionsIdle, s.SessionsInUse)
	if err != nil || s.SessionsIdle < 2 || n != s.SessionsIdle+s.SessionsInUse+1 {
		t.Errorf("with the pool filled: the shim counts %d sessions (%v), want the pool's %d idle + %d in use + the login session", n, err, s.SessionsIdle, s.SessionsInUse)
	}
}

// oneCSignPerSignature: a signature takes one C_Sign call, not a length
// query and then the signature (the patch to miekg/pkcs11 in
// third_party/pkcs11): behind a socket, as with a network HSM or
// p11-kit's client, each call is a round trip. The shim's 1 ms delay
// marks every C_Sign it sees ("C_Sign") and every one given a buffer
// ("C_Sign/result").
func oneCSignPerSignature(t *testing.T, shim *testenv.PKCS11Fault, sign func(time.Duration) error) {
	defer shim.Set(t, testenv.PKCS11FaultSpec{})
	for _, op := range []string{"C_Sign", "C_Sign/result"} {
		shim.Set(t, testenv.PKCS11FaultSpec{Hang: time.Millisecond, HangOps: []string{op}})
		before := shim.Injected("hang")
		const n = 3
		for range n {
			if err := sign(10 * time.Second); err != nil {
				t.Fatalf("%s delayed 1 ms: %v", op, err)
			}
		}
		if got := shim.Injected("hang") - before; got != n {
			t.Errorf("%d signatures made %d calls to %s, want %d", n, got, op, n)
		}
	}
}
