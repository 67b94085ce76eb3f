// Package storetest is the contract every rotation.Store implementation
// must meet, as tests that each implementation's own tests run (in the
// manner of testing/fstest): compare-and-set on each record's revision,
// all-or-nothing updates, never two active keys of one algorithm in a
// domain, records that come back as written and in order, and a lock
// that excludes and names its holder. It is imported only by _test.go
// files.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
)

// Open returns two handles on one new, empty store, as two gateways (or
// two processes) would open it. Each call is a store of its own.
type Open func(t *testing.T) (a, b rotation.Store)

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

// Run runs the contract's tests against the stores open makes.
func Run(t *testing.T, open Open) {
	t.Run("CompareAndSet", func(t *testing.T) { testCompareAndSet(t, open) })
	t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, open) })
	t.Run("RaceOneTransition", func(t *testing.T) { testRace(t, open) })
	t.Run("RaceTwoActivations", func(t *testing.T) { testRaceActivations(t, open) })
	t.Run("Lock", func(t *testing.T) { testLock(t, open) })
}

func testCompareAndSet(t *testing.T, open Open) {
	s, _ := open(t)
	ctx := t.Context()
	if keys, err := s.Keys(ctx, "example.com"); err != nil || len(keys) != 0 {
		t.Fatalf("Keys of an empty store: %v %v", keys, err)
	}
	k := rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0}
	if err := s.Update(ctx, rotation.Change{Prev: 0, Key: k}); err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, rotation.Change{Prev: 0, Key: k}); !errors.Is(err, rotation.ErrConflict) {
		t.Fatalf("second create of s1: %v, want ErrConflict", err)
	}
	keys, err := s.Keys(ctx, "example.com")
	if err != nil || len(keys) != 1 || keys[0].Rev != 1 {
		t.Fatalf("keys %+v, %v; want s1 at revision 1", keys, err)
	}
	k = keys[0]
	k.State = rotation.StateActive
	if err := s.Update(ctx, rotation.Change{Prev: 1, Key: k}); err != nil {
		t.Fatal(err)
	}
	k.State = rotation.StateRetired
	if err := s.Update(ctx, rotation.Change{Prev: 1, Key: k}); !errors.Is(err, rotation.ErrConflict) {
		t.Fatalf("stale revision: %v, want ErrConflict", err)
	}
	if err := s.Update(ctx, rotation.Change{Prev: 5, Key: k}); !errors.Is(err, rotation.ErrConflict) {
		t.Fatalf("future revision: %v, want ErrConflict", err)
	}

	// A second active key of the algorithm is refused, and the whole
	// transaction with it.
	k2 := rotation.Key{Domain: "example.com", Selector: "s2", Algorithm: rotation.Ed25519, State: rotation.StateActive, CreatedAt: t0.Add(time.Hour)}
	k3 := rotation.Key{Domain: "example.com", Selector: "s3", Algorithm: rotation.RSA2048, State: rotation.StatePlanned, CreatedAt: t0.Add(time.Hour)}
	if err := s.Update(ctx, rotation.Change{Key: k3}, rotation.Change{Key: k2}); !errors.Is(err, rotation.ErrConflict) || !strings.Contains(err.Error(), "two active") {
		t.Fatalf("second active ed25519 key: %v, want ErrConflict", err)
	}
	// A stale revision in one change fails every other change too.
	k3b := k3
	k3b.Selector = "s4"
	if err := s.Update(ctx, rotation.Change{Key: k3b}, rotation.Change{Prev: 1, Key: k}); !errors.Is(err, rotation.ErrConflict) {
		t.Fatalf("update with one stale change: %v, want ErrConflict", err)
	}
	keys, _ = s.Keys(ctx, "example.com")
	if len(keys) != 1 || keys[0].Rev != 2 || keys[0].State != rotation.StateActive {
		t.Fatalf("a refused transaction wrote: %+v", keys)
	}
	// An active key of another algorithm is fine.
	k5 := rotation.Key{Domain: "example.com", Selector: "s5", Algorithm: rotation.RSA2048, State: rotation.StateActive, CreatedAt: t0.Add(2 * time.Hour)}
	if err := s.Update(ctx, rotation.Change{Key: k5}); err != nil {
		t.Fatalf("active rsa key beside an active ed25519 key: %v", err)
	}
	// With the old one retired in the same transaction, a new active key
	// of the algorithm is fine.
	old := keys[0]
	old.State = rotation.StateRetired
	if err := s.Update(ctx, rotation.Change{Prev: 2, Key: old}, rotation.Change{Key: k2}); err != nil {
		t.Fatal(err)
	}
	keys, _ = s.Keys(ctx, "example.com")
	states := map[string]string{}
	for _, k := range keys {
		states[k.Selector] = fmt.Sprintf("%s@%d", k.State, k.Rev)
	}
	if want := map[string]string{"s1": "retired@3", "s2": "active@1", "s5": "active@1"}; fmt.Sprint(states) != fmt.Sprint(want) {
		t.Fatalf("states %v, want %v", states, want)
	}
	// Another domain is another namespace.
	if keys, err := s.Keys(ctx, "other.example"); err != nil || len(keys) != 0 {
		t.Fatalf("other domain: %v %v", keys, err)
	}
	other := k2
	other.Domain = "other.example"
	if err := s.Update(ctx, rotation.Change{Key: other}); err != nil {
		t.Fatalf("active ed25519 key of another domain: %v", err)
	}
}

func testRoundTrip(t *testing.T, open Open) {
	s, b := open(t)
	ctx := t.Context()
	full := rotation.Key{
		Domain: "example.com", Selector: "rsa20261201", Algorithm: rotation.RSA3072, State: rotation.StateVisible,
		Created: true, Compromised: true, Record: "v=DKIM1; k=rsa; p=MIIB",
		Since: t0.Add(3 * time.Minute), CreatedAt: t0.Add(time.Minute), SeenEverywhere: t0.Add(2 * time.Minute),
		Wait: 90 * time.Second, ActivatedAt: t0.Add(4 * time.Minute), RetiredAt: t0.Add(5 * time.Minute),
		RevokedAt: t0.Add(6 * time.Minute), Note: "waiting for ns2",
	}
	// Written in an order that is not the listing's: by CreatedAt, then
	// selector.
	early := rotation.Key{Domain: "example.com", Selector: "zz", Algorithm: rotation.Ed25519, State: rotation.StateDestroyed, CreatedAt: t0}
	tieA := rotation.Key{Domain: "example.com", Selector: "b", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0.Add(time.Hour)}
	tieB := rotation.Key{Domain: "example.com", Selector: "a", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0.Add(time.Hour)}
	for _, k := range []rotation.Key{tieA, full, tieB, early} {
		if err := s.Update(ctx, rotation.Change{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	// The other handle sees what this one wrote.
	keys, err := b.Keys(ctx, "example.com")
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, k := range keys {
		order = append(order, k.Selector)
	}
	if got := strings.Join(order, ","); got != "zz,rsa20261201,a,b" {
		t.Fatalf("order %s, want zz,rsa20261201,a,b (CreatedAt, then selector)", got)
	}
	got := keys[1]
	want := full
	want.Rev = 1
	if !got.Since.Equal(want.Since) || !got.CreatedAt.Equal(want.CreatedAt) || !got.SeenEverywhere.Equal(want.SeenEverywhere) ||
		!got.ActivatedAt.Equal(want.ActivatedAt) || !got.RetiredAt.Equal(want.RetiredAt) || !got.RevokedAt.Equal(want.RevokedAt) {
		t.Fatalf("times changed:\n got %+v\nwant %+v", got, want)
	}
	got.Since, got.CreatedAt, got.SeenEverywhere, got.ActivatedAt, got.RetiredAt, got.RevokedAt = want.Since, want.CreatedAt, want.SeenEverywhere, want.ActivatedAt, want.RetiredAt, want.RevokedAt
	if got != want {
		t.Fatalf("record changed:\n got %+v\nwant %+v", got, want)
	}
	// Each write moves the revision by one.
	k := keys[1]
	for i := range 3 {
		k.Note = fmt.Sprint("write ", i)
		if err := b.Update(ctx, rotation.Change{Prev: k.Rev, Key: k}); err != nil {
			t.Fatal(err)
		}
		k.Rev++
	}
	keys, _ = s.Keys(ctx, "example.com")
	if keys[1].Rev != 4 || keys[1].Note != "write 2" {
		t.Fatalf("after three more writes: %+v, want revision 4", keys[1])
	}
}

// racers is how many writers race one transition.
const racers = 6

// testRace: writers on both handles race the same transition from the
// same revision: exactly one wins, every other gets ErrConflict, and the
// record moved once.
func testRace(t *testing.T, open Open) {
	a, b := open(t)
	ctx := t.Context()
	k := rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePublished, CreatedAt: t0}
	if err := a.Update(ctx, rotation.Change{Key: k}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, racers)
	for i := range racers {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			k := k
			k.State = rotation.StateVisible
			k.Note = fmt.Sprint("racer ", i)
			errs[i] = s.Update(ctx, rotation.Change{Prev: 1, Key: k})
		})
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil && won >= 0:
			t.Fatalf("racers %d and %d both moved s1", won, i)
		case err == nil:
			won = i
		case !errors.Is(err, rotation.ErrConflict):
			t.Fatalf("racer %d: %v, want ErrConflict", i, err)
		}
	}
	if won < 0 {
		t.Fatal("no racer won")
	}
	keys, err := b.Keys(ctx, "example.com")
	if err != nil || len(keys) != 1 || keys[0].Rev != 2 || keys[0].Note != fmt.Sprint("racer ", won) {
		t.Fatalf("after the race: %+v %v; want racer %d's write at revision 2", keys, err, won)
	}
}

// testRaceActivations: writers activate different visible keys of one
// algorithm at once (each retiring nothing): exactly one may succeed.
func testRaceActivations(t *testing.T, open Open) {
	a, b := open(t)
	ctx := t.Context()
	for i := range racers {
		k := rotation.Key{Domain: "example.com", Selector: fmt.Sprint("s", i), Algorithm: rotation.RSA2048, State: rotation.StateVisible, CreatedAt: t0}
		if err := a.Update(ctx, rotation.Change{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, racers)
	for i := range racers {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			k := rotation.Key{Domain: "example.com", Selector: fmt.Sprint("s", i), Algorithm: rotation.RSA2048, State: rotation.StateActive, CreatedAt: t0}
			errs[i] = s.Update(ctx, rotation.Change{Prev: 1, Key: k})
		})
	}
	wg.Wait()
	wins := 0
	for i, err := range errs {
		if err == nil {
			wins++
		} else if !errors.Is(err, rotation.ErrConflict) {
			t.Fatalf("activation %d: %v, want ErrConflict", i, err)
		}
	}
	keys, _ := b.Keys(ctx, "example.com")
	active := 0
	for _, k := range keys {
		if k.State == rotation.StateActive {
			active++
		}
	}
	if wins != 1 || active != 1 {
		t.Fatalf("%d activations succeeded, %d keys active; want exactly one", wins, active)
	}
}

// testLock: the lock excludes across handles; a waiter whose deadline
// ends gets a *rotation.LockedError naming this process; released, the
// lock can be taken again; unlock twice is harmless.
func testLock(t *testing.T, open Open) {
	a, b := open(t)
	unlock, err := a.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	_, err = b.Lock(ctx)
	var le *rotation.LockedError
	if !errors.As(err, &le) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second Lock: %v, want a LockedError after the deadline", err)
	}
	host, _ := os.Hostname()
	if le.Owner == nil || le.Owner.PID != os.Getpid() || le.Owner.Host != host || le.Owner.Since.IsZero() {
		t.Fatalf("second Lock: %v (owner %+v), want the holder's pid and host", err, le.Owner)
	}

	got := make(chan error, 1)
	go func() {
		u, err := b.Lock(t.Context())
		if err == nil {
			err = u()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("second Lock returned while the first holds it: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatalf("second unlock: %v", err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("second Lock still waiting 20s after the first was released")
	}
}
