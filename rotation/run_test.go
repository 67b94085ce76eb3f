package rotation

import (
	"context"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestRunRecoversPanics: a pass that panics is logged and the loop goes
// on at the next tick; Run returns when its context ends.
func TestRunRecoversPanics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		pol := testPolicy()
		pol.Algorithms = []Algorithm{Ed25519}
		e := newEnv(t, pol)
		e.ks.panicKeys = true
		var mu sync.Mutex
		var errs []error
		var reps []Report
		e.r.after = func(r Report, err error) {
			mu.Lock()
			errs, reps = append(errs, err), append(reps, r)
			mu.Unlock()
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { e.r.Run(ctx, time.Minute); close(done) }()
		synctest.Wait()
		time.Sleep(time.Minute)
		synctest.Wait()
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		if len(errs) != 2 || errs[0] == nil || errs[1] != nil {
			t.Fatalf("passes: errors %v, want a recovered panic and then a good pass", errs)
		}
		if len(reps[1].Actions) == 0 {
			t.Fatal("the pass after the panic did nothing")
		}
		if !strings.Contains(e.logs.String(), "rotation pass panicked") {
			t.Fatalf("panic not logged:\n%s", e.logs.String())
		}
	})
}

// TestRunBoundsEachPass: a pass stuck on a hung key store ends at
// PassTimeout, and the next tick's pass goes ahead.
func TestRunBoundsEachPass(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		pol := testPolicy()
		pol.Algorithms = []Algorithm{Ed25519}
		e := newEnv(t, pol)
		e.ks.hangKeys = true
		e.r.timeout = time.Hour // the per-call bound is not what ends it
		e.r.passMax = 2 * time.Minute
		var mu sync.Mutex
		var errs []error
		e.r.after = func(r Report, err error) {
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { e.r.Run(ctx, 5*time.Minute); close(done) }()
		time.Sleep(3 * time.Minute)
		synctest.Wait()
		mu.Lock()
		n := len(errs)
		mu.Unlock()
		if n != 1 {
			t.Fatalf("%d passes ended within 3 minutes, want the hung one ended at PassTimeout", n)
		}
		time.Sleep(3 * time.Minute)
		synctest.Wait()
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		if len(errs) != 2 || errs[0] == nil || errs[1] != nil {
			t.Fatalf("passes: errors %v, want the hung pass cut short, then a good pass", errs)
		}
	})
}
