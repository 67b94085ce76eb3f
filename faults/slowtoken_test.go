package faults

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// slowTokenSignsInParallel: with a token that takes its time over every
// C_Sign (a network HSM), the session pool is used in parallel: eight
// signatures are inside C_Sign at once, none waiting for another to
// finish, so nothing in hsm serialises them on a lock. The shim logs each
// C_Sign as it starts its delay; all eight are logged before the first
// one returns. key's token has the default pool of 8 sessions.
func slowTokenSignsInParallel(t *testing.T, shim *testenv.PKCS11Fault, key *hsm.Key) {
	const n = hsm.DefaultMaxSessions
	digest := sha256.Sum256([]byte("slow token"))
	if _, err := key.SignContext(t.Context(), digest[:], crypto.SHA256); err != nil {
		t.Fatalf("no delay: %v", err)
	}

	const delay = 3 * time.Second
	// Only the C_Sign that returns the signature: a token that asks for
	// the length first (upstream miekg/pkcs11 did, for every signature)
	// would take two delays of 3 s, past hsm's 5 s sign timeout.
	shim.Set(t, testenv.PKCS11FaultSpec{Hang: delay, HangOps: []string{"C_Sign/result"}})
	before := shim.Injected("hang")
	var done atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			start := time.Now()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			sig, err := key.SignContext(ctx, digest[:], crypto.SHA256)
			if err != nil {
				err = fmt.Errorf("after %v: %w", time.Since(start).Round(time.Millisecond), err)
			}
			if err == nil {
				err = rsa.VerifyPKCS1v15(key.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig)
			}
			done.Add(1)
			errs <- err
		})
	}
	// Bounded: all n start their delay within it, or one has returned.
	inFlight, finished := 0, int32(0)
	for deadline := time.Now().Add(delay + 10*time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		finished = done.Load()
		if inFlight = shim.Injected("hang") - before; inFlight >= n || finished > 0 {
			break
		}
	}
	if inFlight < n || finished > 0 {
		t.Errorf("%d C_Sign calls in the token at once before the first returned (%d returned), want %d: something serialises signing", inFlight, finished, n)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("sign through the slow token: %v", err)
		}
	}
}
