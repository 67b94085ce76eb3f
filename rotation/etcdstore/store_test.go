package etcdstore_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/rotation/storetest"
	"github.com/dkimgw/dkimgw/testenv"
)

// testTTL is the lease TTL of the tests: short, so that a killed
// holder's lease expires quickly, and long enough for a loaded machine's
// keep-alives.
const testTTL = 3 * time.Second

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

func open(t testing.TB, endpoints []string, prefix string, mod ...func(*etcdstore.Options)) *etcdstore.Store {
	t.Helper()
	opts := etcdstore.Options{
		Endpoints: endpoints,
		Prefix:    prefix,
		TTL:       testTTL,
		Logger:    slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	for _, m := range mod {
		m(&opts)
	}
	s, err := etcdstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

var prefixes = 0

// newPrefix is a prefix of its own for each store of a test that shares
// a cluster.
func newPrefix(t testing.TB) string {
	prefixes++
	return fmt.Sprintf("/t%d-%s/", prefixes, strings.ReplaceAll(t.Name(), "/", "-"))
}

// TestContract: the rotation state store contract, on a real
// three-member cluster, with two stores (two gateways) on one prefix.
func TestContract(t *testing.T) {
	c := testenv.StartEtcd(t)
	storetest.Run(t, func(t *testing.T) (rotation.Store, rotation.Store) {
		p := newPrefix(t)
		return open(t, c.Endpoints(), p), open(t, c.Endpoints(), p)
	})
}

// TestPrefixesAreSeparate: two prefixes are two stores; the invariant
// and the lock are per prefix.
func TestPrefixesAreSeparate(t *testing.T) {
	c := testenv.StartEtcd(t)
	a, b := open(t, c.Endpoints(), "/a"), open(t, c.Endpoints(), "/b/")
	ctx := t.Context()
	k := rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StateActive, CreatedAt: t0}
	for _, s := range []*etcdstore.Store{a, b} {
		if err := s.Update(ctx, rotation.Change{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	ua, err := a.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ua()
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ub, err := b.Lock(lctx)
	if err != nil {
		t.Fatalf("lock of another prefix: %v", err)
	}
	ub()
	if err := a.Update(ctx, rotation.Change{Key: rotation.Key{Domain: "a/b", Selector: "x"}}); err == nil || errors.Is(err, rotation.ErrConflict) {
		t.Fatalf("domain with a slash: %v, want a validation error", err)
	}
}

// TestWatch: a watcher's first event has every record; a transition
// made through another store reaches it within a second, with the
// store revision after it.
func TestWatch(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	gw1, gw2 := open(t, c.Endpoints(), p), open(t, c.Endpoints(), p)
	ctx := t.Context()
	k := rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StateVisible, CreatedAt: t0}
	if err := gw1.Update(ctx, rotation.Change{Key: k}); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := gw2.Watch(wctx)
	first := next(t, events, 10*time.Second)
	if !first.Full || first.Err != nil || len(first.Keys) != 1 || first.Keys[0].State != rotation.StateVisible || first.Revision == 0 {
		t.Fatalf("first event %+v, want every record", first)
	}
	k.State = rotation.StateActive
	if err := gw1.Update(ctx, rotation.Change{Prev: 1, Key: k}); err != nil {
		t.Fatal(err)
	}
	ev := next(t, events, time.Second)
	if ev.Full || ev.Err != nil || len(ev.Keys) != 1 || ev.Keys[0].State != rotation.StateActive || ev.Keys[0].Rev != 2 || ev.Revision <= first.Revision {
		t.Fatalf("after the activation: %+v (first at revision %d)", ev, first.Revision)
	}
	// One event per transaction: the activation and the retirement of
	// the predecessor come together.
	k2 := rotation.Key{Domain: "example.com", Selector: "s2", Algorithm: rotation.Ed25519, State: rotation.StateVisible, CreatedAt: t0.Add(time.Hour)}
	if err := gw1.Update(ctx, rotation.Change{Key: k2}); err != nil {
		t.Fatal(err)
	}
	next(t, events, time.Second)
	k.State, k2.State = rotation.StateRetired, rotation.StateActive
	if err := gw1.Update(ctx, rotation.Change{Prev: 2, Key: k}, rotation.Change{Prev: 1, Key: k2}); err != nil {
		t.Fatal(err)
	}
	ev = next(t, events, time.Second)
	if len(ev.Keys) != 2 {
		t.Fatalf("the switch came as %+v, want both records in one event", ev)
	}
	// A record deleted by hand (the store never deletes one): the
	// watcher is given the whole store again.
	testenv.Require(t, "etcdctl")
	etcdctl(t, c, "del", p+"keys/example.com/s1")
	ev = next(t, events, 5*time.Second)
	if !ev.Full || len(ev.Keys) != 1 || ev.Keys[0].Selector != "s2" {
		t.Fatalf("after a deletion: %+v, want a Full event with s2 alone", ev)
	}
	cancel()
	for range events {
	}
}

func next(t *testing.T, ch <-chan etcdstore.WatchEvent, within time.Duration) etcdstore.WatchEvent {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("watch closed")
		}
		return ev
	case <-time.After(within):
		t.Fatalf("no watch event within %v", within)
	}
	return etcdstore.WatchEvent{}
}

// TestFencing: a store whose lock lease ended (revoked here, as an
// expiry would) writes nothing more under it.
func TestFencing(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	s, other := open(t, c.Endpoints(), p), open(t, c.Endpoints(), p)
	ctx := t.Context()
	k := rotation.Key{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0}
	unlock, err := s.Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if err := s.Update(ctx, rotation.Change{Key: k}); err != nil {
		t.Fatalf("update under the lock: %v", err)
	}
	revokeLocks(t, c, p)
	// The other gateway takes the lock now.
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	u2, err := other.Lock(lctx)
	if err != nil {
		t.Fatal(err)
	}
	defer u2()
	k.State = rotation.StateGenerated
	if err := s.Update(ctx, rotation.Change{Prev: 1, Key: k}); !errors.Is(err, etcdstore.ErrLockLost) {
		t.Fatalf("update after the lock was lost: %v, want ErrLockLost", err)
	}
	if err := other.Update(ctx, rotation.Change{Prev: 1, Key: k}); err != nil {
		t.Fatalf("update by the new holder: %v", err)
	}
}

// revokeLocks revokes the leases of every lock holder and waiter under
// prefix, with etcdctl: what an expiry does.
func revokeLocks(t *testing.T, c *testenv.EtcdCluster, prefix string) {
	t.Helper()
	testenv.Require(t, "etcdctl")
	out := etcdctl(t, c, "get", "--prefix", "--keys-only", prefix+"lock/")
	n := 0
	for line := range strings.FieldsSeq(out) {
		i := strings.LastIndex(line, "/")
		etcdctl(t, c, "lease", "revoke", line[i+1:])
		n++
	}
	if n == 0 {
		t.Fatalf("no lock key under %s", prefix)
	}
}

func etcdctl(t *testing.T, c *testenv.EtcdCluster, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "etcdctl", append([]string{"--endpoints", strings.Join(c.Endpoints(), ","), "--command-timeout", "10s"}, args...)...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("etcdctl %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// child re-runs this test binary as a gateway process that takes the
// lock or leads, prints "ready", and then waits to be killed.
type child struct {
	cmd *exec.Cmd
}

const childEnv = "ETCDSTORE_TEST_CHILD"

func init() {
	role := os.Getenv(childEnv)
	if role == "" {
		return
	}
	s, err := etcdstore.Open(etcdstore.Options{
		Endpoints: strings.Split(os.Getenv("ETCDSTORE_TEST_ENDPOINTS"), ","),
		Prefix:    os.Getenv("ETCDSTORE_TEST_PREFIX"),
		TTL:       testTTL,
		Name:      "child",
	})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(3)
	}
	ctx := context.Background()
	switch role {
	case "lock":
		_, err = s.Lock(ctx)
	case "lead":
		err = s.NewElection().Campaign(ctx)
	}
	if err != nil {
		fmt.Println(role+":", err)
		os.Exit(3)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin) // until killed
	os.Exit(0)
}

func startChild(t *testing.T, c *testenv.EtcdCluster, prefix, role string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+role, "ETCDSTORE_TEST_ENDPOINTS="+strings.Join(c.Endpoints(), ","), "ETCDSTORE_TEST_PREFIX="+prefix)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := &child{cmd: cmd}
	t.Cleanup(func() {
		stdin.Close()
		ch.kill()
	})
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- l
	}()
	select {
	case l := <-line:
		if l != "ready\n" {
			t.Fatalf("child %s: %q", role, l)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("child %s not ready after 30s", role)
	}
	return ch
}

// kill is kill -9: no unlock, no resignation; only the lease's expiry
// frees what the child held.
func (c *child) kill() {
	if c.cmd.ProcessState != nil {
		return
	}
	_ = c.cmd.Process.Kill()
	_ = c.cmd.Wait()
}

// TestLockHolderKilled: a gateway process holds the lock; another waits
// and, when its deadline ends, is told the holder's pid; when the holder
// is killed -9 the waiter gets the lock once the holder's lease expires.
func TestLockHolderKilled(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	holder := startChild(t, c, p, "lock")
	s := open(t, c.Endpoints(), p)
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	_, err := s.Lock(ctx)
	var le *rotation.LockedError
	if !errors.As(err, &le) || le.Owner == nil || le.Owner.PID != holder.cmd.Process.Pid {
		t.Fatalf("Lock while child %d holds it: %v", holder.cmd.Process.Pid, err)
	}
	if !strings.Contains(err.Error(), fmt.Sprintf("locked by pid %d", holder.cmd.Process.Pid)) {
		t.Fatalf("the error does not name the holder: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		u, err := s.Lock(t.Context())
		if err == nil {
			err = u()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("Lock returned while the child holds it: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	killed := time.Now()
	holder.kill()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("lock taken %v after the holder was killed (TTL %v)", time.Since(killed).Round(time.Millisecond), testTTL)
	case <-time.After(testTTL + 10*time.Second):
		t.Fatalf("lock not taken %v after the holder was killed (TTL %v)", time.Since(killed), testTTL)
	}
}

// TestElectionFailover: a gateway process leads; this one campaigns and
// waits; the leader is killed -9 and this one leads within the lease TTL
// (plus margin); Leader names each in turn; Resign hands over at once.
func TestElectionFailover(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	leader := startChild(t, c, p, "lead")
	s := open(t, c.Endpoints(), p, func(o *etcdstore.Options) { o.Name = "gw-parent" })
	el := s.NewElection()
	ctx := t.Context()
	who, err := el.Leader(ctx)
	if err != nil || who.PID != leader.cmd.Process.Pid || who.Name != "child" {
		t.Fatalf("Leader: %+v %v, want the child %d", who, err, leader.cmd.Process.Pid)
	}
	if el.IsLeader() {
		t.Fatal("IsLeader before any campaign")
	}
	won := make(chan error, 1)
	go func() { won <- el.Campaign(ctx) }()
	select {
	case err := <-won:
		t.Fatalf("Campaign returned while the child leads: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	killed := time.Now()
	leader.kill()
	select {
	case err := <-won:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("leading %v after the leader was killed (TTL %v)", time.Since(killed).Round(time.Millisecond), testTTL)
	case <-time.After(testTTL + 10*time.Second):
		t.Fatalf("not leading %v after the leader was killed (TTL %v)", time.Since(killed), testTTL)
	}
	if !el.IsLeader() {
		t.Fatal("IsLeader false after winning")
	}
	who, err = el.Leader(ctx)
	if err != nil || who.PID != os.Getpid() || who.Name != "gw-parent" {
		t.Fatalf("Leader: %+v %v, want this process", who, err)
	}

	// Resign: Done closes, another candidate leads at once.
	other := open(t, c.Endpoints(), p).NewElection()
	won2 := make(chan error, 1)
	go func() { won2 <- other.Campaign(ctx) }()
	done := el.Done()
	if err := el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after Resign")
	}
	if el.IsLeader() {
		t.Fatal("IsLeader after Resign")
	}
	select {
	case err := <-won2:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(testTTL): // well before the lease could expire
		t.Fatal("the next candidate does not lead after a resignation")
	}
	if err := other.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := el.Leader(ctx); !errors.Is(err, etcdstore.ErrNoLeader) {
		t.Fatalf("Leader with nobody leading: %v, want ErrNoLeader", err)
	}
}

// TestLead: Lead runs its function only while leading, and of two
// gateways only one at a time; when the leader's function returns, the
// other leads.
func TestLead(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	inside := make(chan string, 4)
	release := make(chan struct{})
	var done []chan error
	for _, name := range []string{"gw1", "gw2"} {
		el := open(t, c.Endpoints(), p, func(o *etcdstore.Options) { o.Name = name }).NewElection()
		d := make(chan error, 1)
		done = append(done, d)
		go func() {
			d <- el.Lead(ctx, func(lctx context.Context) {
				if !el.IsLeader() {
					t.Errorf("%s runs without leading", name)
				}
				inside <- name
				select {
				case <-release:
				case <-lctx.Done():
				}
			})
		}()
	}
	first := <-inside
	select {
	case second := <-inside:
		t.Fatalf("%s and %s lead at once", first, second)
	case <-time.After(time.Second):
	}
	release <- struct{}{} // the leader's function returns: it resigns
	select {
	case second := <-inside:
		if second == first {
			// It may win again only after the other had a turn: Lead
			// resigns and campaigns again behind the waiting candidate.
			t.Fatalf("%s led twice in a row", first)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nobody leads after the leader's function returned")
	}
	cancel()
	for _, d := range done {
		select {
		case err := <-d:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Lead: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Lead did not return after its context ended")
		}
	}
}

// TestCloseReleases: a gateway that shuts down (Close) hands its lock and
// its leadership over at once, not when its lease would expire.
func TestCloseReleases(t *testing.T) {
	c := testenv.StartEtcd(t)
	p := newPrefix(t)
	long := func(o *etcdstore.Options) { o.TTL = time.Minute }
	holder := open(t, c.Endpoints(), p, long)
	if _, err := holder.Lock(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := holder.NewElection().Campaign(t.Context()); err != nil {
		t.Fatal(err)
	}
	next := open(t, c.Endpoints(), p, long)
	if err := holder.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second) // a third of the TTL
	defer cancel()
	if _, err := next.Lock(ctx); err != nil {
		t.Fatalf("lock after the holder closed: %v", err)
	}
	if err := next.NewElection().Campaign(ctx); err != nil {
		t.Fatalf("campaign after the leader closed: %v", err)
	}
}

// TestDomains lists the domains with records under the prefix only.
func TestDomains(t *testing.T) {
	c := testenv.StartEtcd(t)
	a, other := open(t, c.Endpoints(), newPrefix(t)), open(t, c.Endpoints(), newPrefix(t))
	ctx := t.Context()
	if ds, err := a.Domains(ctx); err != nil || len(ds) != 0 {
		t.Fatalf("Domains of an empty store: %q, %v", ds, err)
	}
	for _, k := range []rotation.Key{
		{Domain: "example.org", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0},
		{Domain: "example.com", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0},
		{Domain: "example.com", Selector: "s2", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0},
	} {
		if err := a.Update(ctx, rotation.Change{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	if err := other.Update(ctx, rotation.Change{Key: rotation.Key{Domain: "example.net", Selector: "s1", Algorithm: rotation.Ed25519, State: rotation.StatePlanned, CreatedAt: t0}}); err != nil {
		t.Fatal(err)
	}
	if ds, err := a.Domains(ctx); err != nil || strings.Join(ds, ",") != "example.com,example.org" {
		t.Fatalf("Domains = %q, %v; want example.com,example.org", ds, err)
	}
}
