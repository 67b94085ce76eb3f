package rotation

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestBoltCompareAndSet(t *testing.T) {
	b, err := OpenBolt(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	k := Key{Domain: "example.com", Selector: "s1", Algorithm: Ed25519, State: StatePlanned, CreatedAt: t0}
	if err := b.Update(ctx, Change{Prev: 0, Key: k}); err != nil {
		t.Fatal(err)
	}
	if err := b.Update(ctx, Change{Prev: 0, Key: k}); !errors.Is(err, ErrConflict) {
		t.Fatalf("second create of s1: %v, want ErrConflict", err)
	}
	keys, err := b.Keys(ctx, "example.com")
	if err != nil || len(keys) != 1 || keys[0].Rev != 1 {
		t.Fatalf("keys %+v, %v; want s1 at revision 1", keys, err)
	}
	k = keys[0]
	k.State = StateActive
	if err := b.Update(ctx, Change{Prev: 1, Key: k}); err != nil {
		t.Fatal(err)
	}
	k.State = StateRetired
	if err := b.Update(ctx, Change{Prev: 1, Key: k}); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale revision: %v, want ErrConflict", err)
	}

	// A second active key of the algorithm is refused, and the whole
	// transaction with it.
	k2 := Key{Domain: "example.com", Selector: "s2", Algorithm: Ed25519, State: StateActive, CreatedAt: t0.Add(time.Hour)}
	k3 := Key{Domain: "example.com", Selector: "s3", Algorithm: RSA2048, State: StatePlanned, CreatedAt: t0.Add(time.Hour)}
	if err := b.Update(ctx, Change{Key: k3}, Change{Key: k2}); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "two active") {
		t.Fatalf("second active ed25519 key: %v, want ErrConflict", err)
	}
	keys, _ = b.Keys(ctx, "example.com")
	if len(keys) != 1 {
		t.Fatalf("a refused transaction wrote %+v", keys)
	}
	// With the old one retired in the same transaction, it is fine.
	old := keys[0]
	old.State = StateRetired
	if err := b.Update(ctx, Change{Prev: 2, Key: old}, Change{Key: k2}); err != nil {
		t.Fatal(err)
	}
	// Another domain, and a domain with no records.
	if keys, err := b.Keys(ctx, "other.example"); err != nil || len(keys) != 0 {
		t.Fatalf("other domain: %v %v", keys, err)
	}
}

func TestBoltKeysWithoutFile(t *testing.T) {
	b, err := OpenBolt(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if keys, err := b.Keys(t.Context(), "example.com"); err != nil || len(keys) != 0 {
		t.Fatalf("Keys before any write: %v %v", keys, err)
	}
}

// TestTwoReconcilersOneStore: two stores on one file, as two reconcilers
// would open it. The second waits for the first; with a deadline, it says
// who holds the lock.
func TestTwoReconcilersOneStore(t *testing.T) {
	dir := t.TempDir()
	a, _ := OpenBolt(dir)
	b, _ := OpenBolt(dir)
	unlock, err := a.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err = b.Lock(ctx)
	var le *LockedError
	if !errors.As(err, &le) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second Lock: %v, want a LockedError after the deadline", err)
	}
	host, _ := os.Hostname()
	if le.Owner == nil || le.Owner.PID != os.Getpid() || le.Owner.Host != host || !strings.Contains(err.Error(), "locked by pid") {
		t.Fatalf("second Lock: %v (owner %+v), want the holder's pid and host", err, le.Owner)
	}
	// Writes without the lock wait too.
	ctx2, cancel2 := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel2()
	if err := b.Update(ctx2, Change{Key: Key{Domain: "example.com", Selector: "x"}}); !errors.As(err, &le) {
		t.Fatalf("Update while locked: %v, want a LockedError", err)
	}

	// A waiter with time goes on as soon as the holder is done.
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
	case <-time.After(150 * time.Millisecond):
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second Lock still waiting 10s after the first was released")
	}
}

// TestTwoReconcilersOneBolt: goroutines sharing one Bolt also take turns.
func TestTwoReconcilersOneBolt(t *testing.T) {
	b, _ := OpenBolt(t.TempDir())
	var mu sync.Mutex
	inside := 0
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			u, err := b.Lock(t.Context())
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			inside++
			if inside > 1 {
				t.Error("two holders at once")
			}
			mu.Unlock()
			time.Sleep(10 * time.Millisecond)
			mu.Lock()
			inside--
			mu.Unlock()
			if err := u(); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

// TestLockAcrossProcesses: a child process holds the lock; this one waits
// and names it.
func TestLockAcrossProcesses(t *testing.T) {
	if dir := os.Getenv("ROTATION_HOLD_LOCK"); dir != "" {
		b, _ := OpenBolt(dir)
		u, err := b.Lock(context.Background())
		if err != nil {
			os.Exit(3)
		}
		os.Stdout.WriteString("locked\n")
		buf := make([]byte, 1)
		os.Stdin.Read(buf) // until the parent closes stdin
		u()
		os.Exit(0)
	}
	dir := t.TempDir()
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestLockAcrossProcesses$")
	cmd.Env = append(os.Environ(), "ROTATION_HOLD_LOCK="+dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	line := make([]byte, 7)
	if _, err := stdout.Read(line); err != nil || string(line) != "locked\n" {
		t.Fatalf("child: %q %v", line, err)
	}
	b, _ := OpenBolt(dir)
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err := b.Lock(ctx)
	var le *LockedError
	if !errors.As(err, &le) || le.Owner == nil || le.Owner.PID != cmd.Process.Pid {
		t.Fatalf("Lock held by child %d: %v", cmd.Process.Pid, err)
	}
	stdin.Close()
	u, err := b.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	u()
}

// TestBoltDomains lists the domains with records, and none without a
// file.
func TestBoltDomains(t *testing.T) {
	b, err := OpenBolt(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if ds, err := b.Domains(ctx); err != nil || len(ds) != 0 {
		t.Fatalf("Domains without a file: %q, %v", ds, err)
	}
	for _, d := range []string{"example.org", "example.com"} {
		if err := b.Update(ctx, Change{Key: Key{Domain: d, Selector: "s1", Algorithm: Ed25519, State: StatePlanned}}); err != nil {
			t.Fatal(err)
		}
	}
	if ds, err := b.Domains(ctx); err != nil || strings.Join(ds, ",") != "example.com,example.org" {
		t.Fatalf("Domains = %q, %v; want example.com,example.org", ds, err)
	}
}
