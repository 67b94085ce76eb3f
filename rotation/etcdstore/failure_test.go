package etcdstore_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/testenv"
)

// step moves s1 one lifecycle state on (planned -> generated -> ...),
// reading first, as a reconciler pass does: under the lock, Keys, then
// Update at the revision read.
func step(ctx context.Context, s *etcdstore.Store, lockWait time.Duration) error {
	lctx, cancel := context.WithTimeout(ctx, lockWait)
	defer cancel()
	unlock, err := s.Lock(lctx)
	if err != nil {
		return err
	}
	defer unlock()
	keys, err := s.Keys(ctx, "example.com")
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return s.Update(ctx, rotation.Change{Key: rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0}})
	}
	k := keys[0]
	k.Note = time.Now().String()
	return s.Update(ctx, rotation.Change{Prev: k.Rev, Key: k})
}

// eventually retries f until it succeeds, for at most within.
func eventually(t *testing.T, within time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestMemberLoss: with one member killed, then (that one back) the etcd
// leader killed, the store keeps working on the two left: reads, writes,
// the lock. Right after the leader's death a call may fail while the two
// elect a new leader (about a second); after that, every call succeeds.
func TestMemberLoss(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	s := open(t, c.Endpoints(), p)
	ctx := t.Context()
	// Another gateway watches throughout: it must see the last write.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	seen := make(chan uint64, 100)
	watcher := open(t, c.Endpoints(), p)
	go func() {
		for ev := range watcher.Watch(wctx) {
			for _, k := range ev.Keys {
				select {
				case seen <- k.Rev:
				default:
				}
			}
		}
	}()
	for range 3 {
		if err := step(ctx, s, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	lead, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	follower := (lead + 1) % 3
	c.Kill(follower)
	eventually(t, 15*time.Second, "a pass after a follower's death", func() error { return step(ctx, s, 5*time.Second) })
	for range 3 {
		if err := step(ctx, s, 5*time.Second); err != nil {
			t.Fatalf("with %s down: %v", c.Members[follower].Name, err)
		}
	}
	c.Restart(follower)

	lead, err = c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Kill(lead)
	eventually(t, 15*time.Second, "a pass after the etcd leader's death", func() error { return step(ctx, s, 5*time.Second) })
	for range 3 {
		if err := step(ctx, s, 5*time.Second); err != nil {
			t.Fatalf("with the leader %s down: %v", c.Members[lead].Name, err)
		}
	}
	keys, err := s.Keys(ctx, "example.com")
	if err != nil || len(keys) != 1 || keys[0].Rev < 8 {
		t.Fatalf("after the passes: %+v %v", keys, err)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case rev := <-seen:
			if rev == keys[0].Rev {
				return
			}
		case <-timeout:
			t.Fatalf("the watcher did not see revision %d of s1", keys[0].Rev)
		}
	}
}

// TestAllDown: with every member down, each call fails within the call
// timeout with a temporary *UnavailableError that says what to check;
// the leader's leadership ends within the lease TTL; when the members
// come back, the store, the lock, the election and the watch work again.
func TestAllDown(t *testing.T) {
	c := testenv.StartEtcd(t)
	const callTimeout = 2 * time.Second
	p := newPrefix(t)
	s := open(t, c.Endpoints(), p, func(o *etcdstore.Options) { o.CallTimeout = callTimeout; o.DialTimeout = callTimeout })
	writer := open(t, c.Endpoints(), p)
	ctx := t.Context()
	if err := step(ctx, s, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	el := s.NewElection()
	if err := el.Campaign(ctx); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := s.Watch(wctx)
	if ev := next(t, events, 10*time.Second); !ev.Full || len(ev.Keys) != 1 {
		t.Fatalf("first watch event %+v", ev)
	}

	lostAfter := make(chan time.Duration, 1)
	down := time.Now()
	go func() {
		<-el.Done()
		lostAfter <- time.Since(down)
	}()
	c.StopAll()
	calls := map[string]func() error{
		"Keys": func() error { _, err := s.Keys(ctx, "example.com"); return err },
		"Update": func() error {
			return s.Update(ctx, rotation.Change{Key: rotation.Key{Domain: "example.com", Selector: "s2", State: rotation.StatePlanned}})
		},
		// No deadline of the caller's: the call timeout bounds it.
		"Lock":  func() error { _, err := s.Lock(ctx); return err },
		"Check": func() error { return s.Check(ctx) },
	}
	for name, call := range calls {
		start := time.Now()
		err := call()
		took := time.Since(start)
		var ue *etcdstore.UnavailableError
		if !errors.As(err, &ue) || !ue.Temporary() {
			t.Fatalf("%s with etcd down: %v, want an UnavailableError", name, err)
		}
		if !strings.Contains(err.Error(), "did not answer") || !strings.Contains(err.Error(), c.Members[0].ClientURL) {
			t.Fatalf("%s: %q does not say what to check", name, err)
		}
		if took > callTimeout+3*time.Second {
			t.Fatalf("%s took %v with etcd down; the call timeout is %v", name, took, callTimeout)
		}
		t.Logf("%s failed after %v: %v", name, took.Round(time.Millisecond), err)
	}
	select {
	case d := <-lostAfter:
		t.Logf("leadership lost %v after etcd went down (TTL %v)", d.Round(time.Millisecond), testTTL)
		if d > testTTL+5*time.Second {
			t.Fatalf("leadership lost only %v after etcd went down (TTL %v)", d, testTTL)
		}
	case <-time.After(testTTL + 10*time.Second):
		t.Fatalf("still leading %v after etcd went down (TTL %v)", time.Since(down), testTTL)
	}
	if el.IsLeader() {
		t.Fatal("IsLeader after the lease ended")
	}

	c.RestartAll()
	eventually(t, 20*time.Second, "a pass after etcd came back", func() error { return step(ctx, s, 5*time.Second) })
	if err := el.Campaign(ctx); err != nil {
		t.Fatalf("campaign after etcd came back: %v", err)
	}
	// The watch comes back too: a write by another gateway reaches it
	// (after any number of error events and a Full one).
	keys, err := writer.Keys(ctx, "example.com")
	if err != nil {
		t.Fatal(err)
	}
	k := keys[0]
	k.Note = "after the outage"
	if err := writer.Update(ctx, rotation.Change{Prev: k.Rev, Key: k}); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(20 * time.Second)
	for {
		select {
		case ev := <-events:
			for _, got := range ev.Keys {
				if got.Note == "after the outage" {
					return
				}
			}
		case <-deadline:
			t.Fatal("the watch did not deliver a write made after etcd came back")
		}
	}
}
