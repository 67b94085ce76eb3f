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
