package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/signer"
	"github.com/emersion/go-msgauth/dkim"
)

var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

// env is a reconciler's world: a bbolt file in a temp dir, a fake key
// store, a fake DNS and a fake clock. The reconciler can be "crashed":
// discarded, and a new one opened on the same file.
type env struct {
	t      *testing.T
	dir    string
	clock  *clock
	ks     *fakeKeyStore
	dns    *fakeDNS
	sink   *sink
	faults *faults
	pol    Policy
	logs   *bytes.Buffer
	r      *Reconciler
	bolt   *Bolt
	// verified remembers (selector, served value) pairs already checked:
	// RSA signing at every pass would dominate the suite's time.
	verified map[string]bool
}

func testPolicy() Policy {
	return Policy{
		Domain: "example.com", Algorithms: []Algorithm{RSA2048, Ed25519},
		Interval: 10 * 24 * time.Hour, Grace: 2 * 24 * time.Hour, RevokeFor: 24 * time.Hour,
		TTL: time.Hour, Publisher: "primary",
	}
}

func newEnv(t *testing.T, pol Policy, lags ...time.Duration) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), clock: &clock{t: t0}, faults: &faults{}, sink: &sink{}, pol: pol, logs: &bytes.Buffer{}, verified: map[string]bool{}}
	e.ks = newFakeKeyStore(e.faults)
	zone := pol.Zone
	if zone == "" {
		zone = pol.Domain
	}
	e.dns = newFakeDNS(e.clock, zone, e.faults, lags...)
	e.open()
	return e
}

// open makes a new reconciler on the same state file.
func (e *env) open() {
	e.t.Helper()
	b, err := OpenBolt(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	b.noSync = true
	e.bolt = b
	r, err := New(Options{
		Store: faultyStore{b, e.faults}, Keys: e.ks, Checker: e.dns,
		Publishers: map[string]Publisher{"primary": e.dns},
		Events:     e.sink, Now: e.clock.Now, Policies: []Policy{e.pol},
		Logger: slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.r = r
}

func (e *env) pass() (Report, error) {
	e.t.Helper()
	rep, err := e.r.Reconcile(e.t.Context())
	e.checkInvariants()
	return rep, err
}

func (e *env) mustPass() Report {
	e.t.Helper()
	rep, err := e.pass()
	if err != nil {
		e.t.Fatalf("pass at %s: %v", e.clock.Now().Format(time.RFC3339), err)
	}
	return rep
}

// run makes passes every step until d has passed.
func (e *env) run(d, step time.Duration) {
	e.t.Helper()
	for end := e.clock.Now().Add(d); e.clock.Now().Before(end); e.clock.Advance(step) {
		e.mustPass()
	}
}

func (e *env) keys() []Key {
	e.t.Helper()
	keys, err := e.r.store.Keys(e.t.Context(), e.pol.Domain)
	if err != nil {
		e.t.Fatal(err)
	}
	return keys
}

func (e *env) byState(s State) []Key {
	var out []Key
	for _, k := range e.keys() {
		if k.State == s {
			out = append(out, k)
		}
	}
	return out
}

// checkInvariants holds after every pass: at most one active key per
// algorithm, and every active key signs mail that verifies against what
// every authoritative server serves right now.
func (e *env) checkInvariants() {
	e.t.Helper()
	seen := map[Algorithm]string{}
	for _, k := range e.keys() {
		if k.State != StateActive {
			continue
		}
		if o, ok := seen[k.Algorithm]; ok {
			e.t.Fatalf("two active %s keys: %s and %s", k.Algorithm, o, k.Selector)
		}
		seen[k.Algorithm] = k.Selector
		e.verifyWith(k.Selector)
	}
}

// verifyWith signs a message with the key store's key and verifies it
// against the record every fake server serves.
func (e *env) verifyWith(sel string) {
	e.t.Helper()
	ctx := e.t.Context()
	key, err := e.ks.Key(ctx, e.pol.Domain, sel)
	if err != nil {
		e.t.Fatalf("active key %s: %v", sel, err)
	}
	name := sel + "._domainkey." + e.pol.Domain
	served := e.dns.servedEverywhere(name)
	if served == "" {
		e.t.Fatalf("active key %s: not served by every server", sel)
	}
	if e.verified[sel+"|"+served] {
		return
	}
	e.verified[sel+"|"+served] = true
	m, err := signer.Spool(ctx, strings.NewReader("From: a@"+e.pol.Domain+"\r\nSubject: x\r\n\r\nhi\r\n"), signer.SpoolOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Close()
	f, err := signer.Sign(ctx, m, []signer.Identity{{Domain: e.pol.Domain, Selector: sel, Key: key}}, signer.Options{Now: e.clock.Now})
	if err != nil {
		e.t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := signer.WriteSigned(&buf, f, m); err != nil {
		e.t.Fatal(err)
	}
	vs, err := dkim.VerifyWithOptions(&buf, &dkim.VerifyOptions{LookupTXT: func(string) ([]string, error) { return []string{served}, nil }})
	if err != nil || len(vs) != 1 || vs[0].Err != nil {
		e.t.Fatalf("mail signed with active key %s does not verify against DNS: %v %+v", sel, err, vs)
	}
}

// shape is the end state with selectors replaced by "<alg>#<n>", n the
// key's rank among its algorithm's keys, so that runs whose steps were
// delayed by faults (and whose dated selectors may differ) compare.
func (e *env) shape() string {
	keys := e.keys()
	alias := map[string]string{}
	n := map[Algorithm]int{}
	var b strings.Builder
	for _, k := range keys {
		n[k.Algorithm]++
		alias[k.Selector] = fmt.Sprintf("%s#%d", k.Algorithm, n[k.Algorithm])
		fmt.Fprintf(&b, "state %s %s created=%v compromised=%v\n", alias[k.Selector], k.State, k.Created, k.Compromised)
	}
	for _, l := range e.ks.labels() {
		_, sel, _ := strings.Cut(l, "/")
		fmt.Fprintf(&b, "keystore %s\n", aliasOr(alias, sel))
	}
	for name, v := range e.dns.names() {
		sel, _, _ := strings.Cut(name, ".")
		if v != RevokedRecord {
			v = "key"
		}
		fmt.Fprintf(&b, "dns %s %s\n", aliasOr(alias, sel), v)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	sortStrings(lines)
	return strings.Join(lines, "\n")
}

func aliasOr(m map[string]string, s string) string {
	if a, ok := m[s]; ok {
		return a
	}
	return "unknown:" + s
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// noDoubles checks that no side effect was done twice: one generation
// per selector, one write per (name, value), one deletion per name, one
// destruction per key.
func (e *env) noDoubles() {
	e.t.Helper()
	for id, n := range e.ks.generated {
		if n != 1 {
			e.t.Errorf("key %s generated %d times", id, n)
		}
	}
	for id, n := range e.ks.destroyed {
		if n != 1 {
			e.t.Errorf("key %s destroyed %d times", id, n)
		}
	}
	for rv, n := range e.dns.sets {
		if n != 1 {
			e.t.Errorf("record %.60s... written %d times", rv, n)
		}
	}
	for name, n := range e.dns.deletes {
		if n != 1 {
			e.t.Errorf("record %s deleted %d times", name, n)
		}
	}
}

func statesOf(keys []Key, alg Algorithm) []State {
	var out []State
	for _, k := range keys {
		if k.Algorithm == alg {
			out = append(out, k.State)
		}
	}
	return out
}

func TestTwoFullRotations(t *testing.T) {
	e := newEnv(t, testPolicy())
	ctx := t.Context()

	// Before the first key is visible the domain has no signing key.
	rep := e.mustPass()
	if got := rep.Active["example.com"]; len(got) != 0 {
		t.Fatalf("active keys after the first pass: %v, want none", got)
	}
	if got := e.byState(StateGenerated); len(got) != 2 {
		t.Fatalf("after the first pass: %d generated keys, want 2 (one per algorithm): %+v", len(got), e.keys())
	}
	first := map[Algorithm]string{}
	for _, k := range e.keys() {
		first[k.Algorithm] = k.Selector
	}
	if first[RSA2048] != "rsa20261201" || first[Ed25519] != "ed20261201" {
		t.Fatalf("selectors %v, want rsa20261201 and ed20261201", first)
	}

	e.run(24*time.Hour, 2*time.Hour)
	act, err := e.r.Active(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(act["example.com"]) != 2 {
		t.Fatalf("after a day: active %v, want one key per algorithm; keys %+v", act, e.keys())
	}

	// Two replacements, and the second one's predecessor through grace,
	// revocation and destruction.
	var revokedSeen bool
	for end := e.clock.Now().Add(25 * 24 * time.Hour); e.clock.Now().Before(end); e.clock.Advance(2 * time.Hour) {
		e.mustPass()
		for _, k := range e.byState(StateRevoked) {
			if v := e.dns.servedEverywhere(k.Selector + "._domainkey.example.com"); v != RevokedRecord {
				t.Fatalf("revoked key %s: DNS serves %q, want %q", k.Selector, v, RevokedRecord)
			}
			revokedSeen = true
		}
		for _, k := range e.byState(StateRetired) {
			if v := e.dns.servedEverywhere(k.Selector + "._domainkey.example.com"); v != k.Record {
				t.Fatalf("retired key %s in grace is not served: %q", k.Selector, v)
			}
		}
	}
	if !revokedSeen {
		t.Fatal("no key was ever seen revoked")
	}
	keys := e.keys()
	for _, alg := range []Algorithm{RSA2048, Ed25519} {
		got := fmt.Sprint(statesOf(keys, alg))
		if want := "[destroyed destroyed active]"; got != want {
			t.Errorf("%s keys: %s, want %s", alg, got, want)
		}
	}
	sels := map[string]bool{}
	for _, k := range keys {
		if sels[k.Selector] {
			t.Errorf("selector %s used twice", k.Selector)
		}
		sels[k.Selector] = true
	}
	if got := len(e.ks.labels()); got != 2 {
		t.Errorf("key store holds %v, want only the two active keys", e.ks.labels())
	}
	if got := len(e.dns.names()); got != 2 {
		t.Errorf("zone holds %v, want only the two active records", e.dns.names())
	}
	e.noDoubles()

	// Every key went through every state, one at a time, in order.
	want := []State{StatePlanned, StateGenerated, StatePublished, StateVisible, StateActive, StateRetired, StateRevoked, StateDestroyed}
	path := map[string][]State{}
	for _, ev := range e.sink.all() {
		if ev.From != ev.To {
			path[ev.Selector] = append(path[ev.Selector], ev.To)
		}
	}
	for _, k := range keys {
		if k.State != StateDestroyed {
			continue
		}
		if fmt.Sprint(path[k.Selector]) != fmt.Sprint(want) {
			t.Errorf("%s went through %v, want %v", k.Selector, path[k.Selector], want)
		}
	}
	// The successor was started early enough to be active about one
	// interval after its predecessor.
	var act1, act2 time.Time
	for _, k := range keys {
		if k.Algorithm != Ed25519 {
			continue
		}
		if k.State == StateDestroyed && act1.IsZero() {
			act1 = k.ActivatedAt
		}
	}
	act2 = e.byState(StateActive)[0].ActivatedAt
	if d := act2.Sub(act1); d < 19*24*time.Hour || d > 21*24*time.Hour {
		t.Errorf("second successor active %v after the first key, want about two intervals", d)
	}
}

// TestVisibilityWaitsForEveryServerAndTTL: a lagging server holds the key
// back, and then the TTL does.
func TestVisibilityWaitsForEveryServerAndTTL(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol, 0, 3*time.Hour)
	e.dns.negTTL = 90 * time.Minute
	e.mustPass() // planned, generated
	e.mustPass() // published; ns2 lags 3h
	for range 5 {
		e.clock.Advance(30 * time.Minute)
		e.mustPass()
		if k := e.keys()[0]; k.State != StatePublished || !k.SeenEverywhere.IsZero() {
			t.Fatalf("at %s with ns2 lagging: %s seen=%v, want published and not seen everywhere", e.clock.Now(), k.State, k.SeenEverywhere)
		}
	}
	e.clock.Advance(30 * time.Minute) // 3h: ns2 caught up
	e.mustPass()
	k := e.keys()[0]
	if k.SeenEverywhere.IsZero() || k.Wait != 90*time.Minute {
		t.Fatalf("after ns2 caught up: seen=%v wait=%v, want seen now and the negative TTL (90m, above the 1h TTL)", k.SeenEverywhere, k.Wait)
	}
	e.clock.Advance(89 * time.Minute)
	e.mustPass()
	if s := e.keys()[0].State; s != StatePublished {
		t.Fatalf("before the negative TTL passed: %s, want published", s)
	}
	e.clock.Advance(time.Minute)
	e.mustPass()
	if s := e.keys()[0].State; s != StateVisible {
		t.Fatalf("after the negative TTL: %s, want visible", s)
	}
	rep := e.mustPass()
	if s := e.keys()[0].State; s != StateActive || len(rep.Active["example.com"]) != 1 {
		t.Fatalf("after the probe: %s, active %v", s, rep.Active)
	}
}

// TestAlteredRecordNotActivated: a record that one server serves
// differently is never activated, before or after it was seen everywhere.
func TestAlteredRecordNotActivated(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.mustPass()
	e.mustPass() // published
	sel := e.keys()[0].Selector
	rel := sel + "._domainkey"
	e.dns.servers[1].override[rel] = []string{"v=DKIM1; k=ed25519; p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
	var rep Report
	for range 24 {
		e.clock.Advance(time.Hour)
		rep = e.mustPass()
	}
	if k := e.keys()[0]; k.State != StatePublished || !strings.Contains(k.Note, "ns2: different") {
		t.Fatalf("with ns2 serving another key: %s (%s), want published and a note naming ns2", k.State, k.Note)
	}
	if len(rep.Active["example.com"]) != 0 {
		t.Fatalf("active keys %v, want none", rep.Active)
	}

	// Served everywhere, visible; then altered before the probe.
	delete(e.dns.servers[1].override, rel)
	for e.keys()[0].State != StateVisible {
		e.clock.Advance(time.Hour)
		e.mustPass()
	}
	e.dns.servers[0].override[rel] = []string{"v=DKIM1; k=ed25519; p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
	rep = e.mustPass()
	if k := e.keys()[0]; k.State != StatePublished || !k.SeenEverywhere.IsZero() {
		t.Fatalf("altered while visible: %s, want back to published with the wait restarted", k.State)
	}
	if len(rep.Warnings) == 0 || !strings.Contains(rep.Warnings[0], "not activated") {
		t.Fatalf("warnings %v, want one saying the key was not activated", rep.Warnings)
	}
}

// TestProbeFailsForAnotherKey: DNS serves the record of the key as it was
// generated, but the key store now holds another key under the label:
// only the probe can tell, and the key is not activated.
func TestProbeFailsForAnotherKey(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.mustPass()
	for e.keys()[0].State != StateVisible {
		e.clock.Advance(time.Hour)
		e.mustPass()
	}
	e.ks.replace("example.com", e.keys()[0].Selector)
	_, err := e.pass()
	if err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("pass with a swapped key: %v, want a probe failure", err)
	}
	if k := e.keys()[0]; k.State != StateVisible || !strings.Contains(k.Note, "probe failed") {
		t.Fatalf("after a failed probe: %s (%s), want visible with a note", k.State, k.Note)
	}
}

// TestCrashAtEveryPoint injects a fault at each fault point of a whole
// rotation (before and after every key store, DNS and state store side
// effect), "crashes" the reconciler there (discards it and reopens the
// bbolt file), goes on, and checks that the end state is the same as
// without faults and that no side effect was done twice.
func TestCrashAtEveryPoint(t *testing.T) {
	pol := testPolicy()
	pol.Interval = 3 * 24 * time.Hour
	pol.Grace = 24 * time.Hour
	pol.RevokeFor = 12 * time.Hour
	const span, step = 6 * 24 * time.Hour, 6 * time.Hour

	scenario := func(e *env) {
		for end := e.clock.Now().Add(span); e.clock.Now().Before(end); e.clock.Advance(step) {
			if _, err := e.pass(); err != nil {
				if !errors.Is(err, errFault) {
					e.t.Fatalf("fault %q: unexpected error %v", e.faults.fired, err)
				}
				e.open() // crash: a new reconciler on the same file
			}
		}
	}
	base := newEnv(t, pol)
	scenario(base)
	want := base.shape()
	points := base.faults.n
	t.Logf("%d fault points", points)
	if !strings.Contains(want, "destroyed") || points < 20 {
		t.Fatalf("the fault-free run did not go through a whole rotation (%d fault points):\n%s", points, want)
	}
	base.noDoubles()
	for at := 1; at <= points; at++ {
		t.Run(fmt.Sprint(at), func(t *testing.T) {
			t.Parallel() // the runs wait on file I/O more than on the CPU
			e := newEnv(t, pol)
			e.faults.at = at
			scenario(e)
			if e.faults.fired == "" {
				t.Fatalf("fault %d never fired", at)
			}
			if got := e.shape(); got != want {
				t.Errorf("fault %d (%s): end state\n%s\nwant\n%s", at, e.faults.fired, got, want)
			}
			e.noDoubles()
		})
	}
}

// TestErrorsWithoutCrash: the same faults, with the reconciler kept, also
// converge (the in-memory state of a reconciler is never trusted).
func TestErrorsWithoutCrash(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	pol.Interval = 2 * 24 * time.Hour
	pol.Grace = 12 * time.Hour
	pol.RevokeFor = 12 * time.Hour
	scenario := func(e *env) {
		for end := e.clock.Now().Add(4 * 24 * time.Hour); e.clock.Now().Before(end); e.clock.Advance(6 * time.Hour) {
			e.pass() //nolint:errcheck // errors are the point
		}
	}
	base := newEnv(t, pol)
	scenario(base)
	want := base.shape()
	for at := 1; at <= base.faults.n; at++ {
		t.Run(fmt.Sprint(at), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, pol)
			e.faults.at = at
			scenario(e)
			if got := e.shape(); got != want {
				t.Errorf("fault %d (%s): end state\n%s\nwant\n%s", at, e.faults.fired, got, want)
			}
			e.noDoubles()
		})
	}
}

func TestDryRunChangesNothing(t *testing.T) {
	e := newEnv(t, testPolicy())
	rep, err := e.r.Pass(t.Context(), PassOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Actions) != 2 || !rep.Actions[0].DryRun || rep.Actions[0].To != StatePlanned {
		t.Fatalf("dry run actions %v, want two planned keys", rep.Actions)
	}
	if len(e.keys()) != 0 || len(e.ks.labels()) != 0 || len(e.dns.names()) != 0 || len(e.sink.all()) != 0 {
		t.Fatalf("dry run changed something: state %v keys %v dns %v events %v", e.keys(), e.ks.labels(), e.dns.names(), e.sink.all())
	}
	e.mustPass()
	rep, err = e.r.Pass(t.Context(), PassOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Actions) != 2 || rep.Actions[0].To != StatePublished {
		t.Fatalf("dry run after generation: %v, want two publications", rep.Actions)
	}
	if len(e.dns.names()) != 0 || len(e.byState(StateGenerated)) != 2 {
		t.Fatal("dry run published")
	}
}

func TestEmergencyRotation(t *testing.T) {
	e := newEnv(t, testPolicy())
	e.run(12*time.Hour, time.Hour)
	old := e.byState(StateActive)
	if len(old) != 2 {
		t.Fatalf("active %v", e.keys())
	}
	e.clock.Advance(time.Hour)
	rep, err := e.r.Emergency(t.Context(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	// At once: new keys generated and published; the old ones stopped
	// signing and their records are revoked, without grace.
	if got := len(e.byState(StatePublished)); got != 2 {
		t.Fatalf("after Emergency: %d published keys, want 2: %v", got, rep.Actions)
	}
	if act := e.byState(StateActive); len(act) != 0 {
		t.Fatalf("after Emergency: %d keys still active (signing), want none until the new ones are visible", len(act))
	}
	if act, err := e.r.Active(t.Context()); err != nil || len(act["example.com"]) != 0 {
		t.Fatalf("Active after Emergency = %v, %v; want no key for example.com (451)", act, err)
	}
	if len(rep.Active["example.com"]) != 0 {
		t.Fatalf("Emergency's report lists active keys %v", rep.Active)
	}
	for _, k := range old {
		for _, g := range e.keys() {
			if g.Selector == k.Selector && (g.State != StateRevoked || !g.Compromised) {
				t.Errorf("compromised %s is %s (compromised=%v) right after Emergency, want revoked at once", k.Selector, g.State, g.Compromised)
			}
		}
		if v := e.dns.servedEverywhere(k.Selector + "._domainkey.example.com"); v != RevokedRecord {
			t.Errorf("compromised %s: DNS serves %.40q, want the revoked record", k.Selector, v)
		}
	}
	if !strings.Contains(e.logs.String(), "level=ERROR msg=\"EMERGENCY key rotation") {
		t.Fatalf("no loud log line:\n%s", e.logs.String())
	}
	// Activated as soon as visible.
	for range 20 {
		if len(e.byState(StateActive)) == 2 {
			break
		}
		e.clock.Advance(30 * time.Minute)
		e.mustPass()
	}
	if act := e.byState(StateActive); len(act) != 2 || act[0].Compromised || act[1].Compromised {
		t.Fatalf("the replacements are not active: %v", e.keys())
	}
	var loud int
	for _, ev := range e.sink.all() {
		if ev.Emergency {
			loud++
		}
	}
	if loud < 4 {
		t.Errorf("%d emergency events, want at least the two marked and two planned", loud)
	}
}

func TestAdoptUnknownKeys(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	pol.Grace, pol.RevokeFor = time.Hour, time.Hour
	pol.Interval = 2 * 24 * time.Hour
	e := newEnv(t, pol)
	e.ks.add("example.com", "byhand", Ed25519)
	e.ks.add("example.com", "oldrsa", RSA4096)
	e.ks.add("other.example", "x", Ed25519)
	rep := e.mustPass()
	keys := e.keys()
	if len(keys) != 1 || keys[0].Selector != "byhand" || keys[0].Created || keys[0].State != StatePublished {
		t.Fatalf("after the first pass: %+v, want byhand adopted (not created by dkimgw), published in the same pass, and no new key", keys)
	}
	if len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0], "oldrsa") {
		t.Fatalf("warnings %v, want one for the rsa-4096 key the policy does not list", rep.Warnings)
	}
	// Through its whole life: active, replaced, revoked, "destroyed" -
	// but left in the key store.
	e.run(5*24*time.Hour, 2*time.Hour)
	var byhand Key
	for _, k := range e.keys() {
		if k.Selector == "byhand" {
			byhand = k
		}
	}
	if byhand.State != StateDestroyed || !strings.Contains(byhand.Note, "left in the key store") {
		t.Fatalf("byhand: %s (%s)", byhand.State, byhand.Note)
	}
	labels := strings.Join(e.ks.labels(), " ")
	for _, l := range []string{"example.com/byhand", "example.com/oldrsa", "other.example/x"} {
		if !strings.Contains(labels, l) {
			t.Errorf("key %s was destroyed; dkimgw did not create it", l)
		}
	}
	if _, ok := e.dns.names()["byhand._domainkey"]; ok {
		t.Error("byhand's record is still published")
	}
}

// TestAdoptAfterLostState: a key generated and then the state file lost
// (or a crash before the intent was recorded, by an older version) is
// adopted, not generated again.
func TestAdoptAfterLostState(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.mustPass()
	e.dir = t.TempDir() // the state is gone; the key store is not
	e.open()
	e.mustPass()
	keys := e.keys()
	if len(keys) != 1 || keys[0].Selector != "ed20261201" || keys[0].Created {
		t.Fatalf("after losing the state: %+v, want ed20261201 adopted", keys)
	}
	if len(e.ks.labels()) != 1 {
		t.Fatalf("key store %v, want no second key", e.ks.labels())
	}
}

func TestSelectorsNeverReused(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	pol.Interval, pol.Grace, pol.RevokeFor = 2*time.Hour, time.Hour, time.Hour
	e := newEnv(t, pol)
	e.run(23*time.Hour, 30*time.Minute) // one day: many keys with one date
	seen := map[string]bool{}
	var sels []string
	for _, k := range e.keys() {
		if seen[k.Selector] {
			t.Fatalf("selector %s used twice", k.Selector)
		}
		seen[k.Selector] = true
		sels = append(sels, k.Selector)
	}
	if len(sels) < 4 || sels[0] != "ed20261201" || sels[1] != "ed20261201-2" {
		t.Fatalf("selectors %v, want ed20261201, ed20261201-2, ...", sels)
	}
	// The store refuses a new record under a used selector, destroyed or not.
	k := e.keys()[0]
	if k.State != StateDestroyed {
		t.Fatalf("first key is %s, want destroyed", k.State)
	}
	k.State = StatePlanned
	if err := e.r.store.Update(t.Context(), Change{Prev: 0, Key: k}); !errors.Is(err, ErrConflict) {
		t.Fatalf("reusing %s: %v, want ErrConflict", k.Selector, err)
	}
	e.noDoubles()
}

func TestStatus(t *testing.T) {
	e := newEnv(t, testPolicy())
	e.run(12*time.Hour, time.Hour)
	st, err := e.r.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[0].State != StateActive || st[0].Next != "start the successor" {
		t.Fatalf("status %+v", st)
	}
	k := st[0].Key
	if want := k.ActivatedAt.Add(10*24*time.Hour - k.ActivatedAt.Sub(k.CreatedAt)); !st[0].When.Equal(want) {
		t.Errorf("successor due %v, want %v (interval less the time publishing took)", st[0].When, want)
	}
}

func TestCheckerErrorIsReported(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.mustPass()
	e.mustPass()
	e.dns.checkErr = errors.New("no route to ns1")
	_, err := e.pass()
	if err == nil || !strings.Contains(err.Error(), "no route to ns1") || strings.Count(err.Error(), "rotation:") != 1 {
		t.Fatalf("err = %v, want the checker's error under one rotation: prefix", err)
	}
}

// TestReconcileWaitsForTheLock: a second reconciler on the same state
// file does nothing while the first holds the lock, and says who holds it.
func TestReconcileWaitsForTheLock(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.ks.requireLock = func() bool { e.bolt.mu.Lock(); defer e.bolt.mu.Unlock(); return e.bolt.held }
	other, _ := OpenBolt(e.dir)
	unlock, err := other.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err = e.r.Reconcile(ctx)
	var le *LockedError
	if !errors.As(err, &le) {
		t.Fatalf("Reconcile while another holds the lock: %v, want a LockedError", err)
	}
	if len(e.ks.labels()) != 0 {
		t.Fatal("a reconciler that did not get the lock generated a key")
	}
	done := make(chan error, 1)
	go func() { _, err := e.r.Reconcile(t.Context()); done <- err }()
	time.Sleep(100 * time.Millisecond)
	if len(e.ks.labels()) != 0 {
		t.Fatal("the waiting reconciler went ahead")
	}
	unlock()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(e.ks.labels()) != 1 {
		t.Fatalf("after the lock was released: key store %v, want one key", e.ks.labels())
	}
}

// TestActiveRecordAlteredIsReported: a record changed behind dkimgw's back
// after activation is reported at every pass.
func TestActiveRecordAlteredIsReported(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.run(12*time.Hour, time.Hour)
	k := e.byState(StateActive)[0]
	e.dns.servers[0].override[k.Selector+"._domainkey"] = nil
	rep, err := e.r.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0], "ns1: absent") {
		t.Fatalf("warnings %v, want one naming ns1", rep.Warnings)
	}
	delete(e.dns.servers[0].override, k.Selector+"._domainkey")
	if err := e.ks.DestroyKey(t.Context(), "example.com", k.Selector); err != nil {
		t.Fatal(err)
	}
	rep, err = e.r.Reconcile(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Warnings) != 1 || !strings.Contains(rep.Warnings[0], "missing from the key store") {
		t.Fatalf("warnings %v, want one saying the active key is gone", rep.Warnings)
	}
}

// TestDroppedAlgorithmRetired: when the policy stops listing an algorithm,
// its active key is retired once the remaining algorithm has one.
func TestDroppedAlgorithmRetired(t *testing.T) {
	e := newEnv(t, testPolicy())
	e.run(12*time.Hour, time.Hour)
	e.pol.Algorithms = []Algorithm{Ed25519}
	e.open()
	e.mustPass()
	for _, k := range e.keys() {
		want := StateActive
		if k.Algorithm == RSA2048 {
			want = StateRetired
		}
		if k.State != want {
			t.Errorf("%s (%s): %s, want %s", k.Selector, k.Algorithm, k.State, want)
		}
	}
}

// TestDryRunAdoption: a dry run reports the adoption of an unknown key and
// no new key for its algorithm, as the real pass does.
func TestDryRunAdoption(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.ks.add("example.com", "byhand", Ed25519)
	rep, err := e.r.Pass(t.Context(), PassOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Actions) != 1 || rep.Actions[0].Selector != "byhand" {
		t.Fatalf("dry run: %v, want only the adoption of byhand", rep.Actions)
	}
	if len(e.keys()) != 0 {
		t.Fatal("dry run wrote to the state")
	}
}

// TestStatusDuringPasses: reading the state while passes run (as `rotate
// status` and the relay's keyring do) never fails.
func TestStatusDuringPasses(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		for ctx.Err() == nil {
			if _, err := e.r.Active(ctx); err != nil && ctx.Err() == nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for range 40 {
		if _, err := e.r.Reconcile(t.Context()); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(time.Hour)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Active during passes: %v", err)
	}
}

// failingPublisher refuses every change, like a primary with a wrong TSIG key.
type failingPublisher struct{ *fakeDNS }

func (*failingPublisher) SetRecords(context.Context, string, []Record) error {
	return errors.New("NOTAUTH from 127.0.0.1:53: check the TSIG key")
}

// TestOneDomainFailsOthersGoOn: a domain whose publisher fails does not
// hold back the others, and its error names the domain and the cause.
func TestOneDomainFailsOthersGoOn(t *testing.T) {
	e := newEnv(t, testPolicy())
	bad := &failingPublisher{newFakeDNS(e.clock, "broken.example", nil)}
	b, _ := OpenBolt(e.dir)
	good := testPolicy()
	good.Algorithms = []Algorithm{Ed25519}
	broken := Policy{Domain: "broken.example", Algorithms: []Algorithm{Ed25519}, Publisher: "bad"}
	r, err := New(Options{Store: b, Keys: e.ks, Checker: e.dns, Now: e.clock.Now,
		Publishers: map[string]Publisher{"primary": e.dns, "bad": bad}, Policies: []Policy{good, broken}})
	if err != nil {
		t.Fatal(err)
	}
	var lastErr error
	for range 8 {
		_, lastErr = r.Reconcile(t.Context())
		e.clock.Advance(time.Hour)
	}
	if lastErr == nil || !strings.Contains(lastErr.Error(), "broken.example") || !strings.Contains(lastErr.Error(), "check the TSIG key") {
		t.Fatalf("error %v, want one naming broken.example and the publisher's advice", lastErr)
	}
	act, err := r.Active(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(act["example.com"]) != 1 || len(act["broken.example"]) != 0 {
		t.Fatalf("active %v, want example.com rotated and broken.example without a key", act)
	}
}

// TestEmergencyCrashAtEveryPoint: an emergency rotation interrupted at any
// fault point is finished by ordinary passes, with the same end state.
func TestEmergencyCrashAtEveryPoint(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	scenario := func(e *env, at int) {
		e.run(12*time.Hour, 2*time.Hour)
		if at > 0 {
			e.faults.at = e.faults.n + at
		}
		if _, err := e.r.Emergency(e.t.Context(), "example.com"); err != nil {
			if !errors.Is(err, errFault) {
				e.t.Fatalf("Emergency: %v", err)
			}
			e.open()
			// The operator sees the failure; if it came before the
			// emergency was recorded, they run it again.
			recorded := false
			for _, k := range e.keys() {
				recorded = recorded || k.Compromised
			}
			if !recorded {
				if _, err := e.r.Emergency(e.t.Context(), "example.com"); err != nil {
					e.t.Fatalf("Emergency again: %v", err)
				}
			}
		}
		for range 12 {
			e.clock.Advance(time.Hour)
			if _, err := e.pass(); err != nil {
				if !errors.Is(err, errFault) {
					e.t.Fatalf("fault %q: %v", e.faults.fired, err)
				}
				e.open()
			}
		}
	}
	base := newEnv(t, pol)
	scenario(base, 0)
	want := base.shape()
	if !strings.Contains(want, "compromised=true") || strings.Count(want, "state ") != 2 {
		t.Fatalf("fault-free emergency:\n%s", want)
	}
	before := newEnv(t, pol)
	before.run(12*time.Hour, 2*time.Hour)
	points := base.faults.n - before.faults.n
	for at := 1; at <= points; at++ {
		t.Run(fmt.Sprint(at), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, pol)
			scenario(e, at)
			if got := e.shape(); got != want {
				t.Errorf("fault %d (%s): end state\n%s\nwant\n%s", at, e.faults.fired, got, want)
			}
			e.noDoubles()
		})
	}
}

// TestPassEndedAfterAChangeRecordsIt: a pass whose context ends (serve
// shutting down, leadership lost) just after it changed DNS still
// records that change, so that the state does not lag what DNS serves:
// a stopped fleet left "retired" in the state while DNS already served
// the revoked record.
func TestPassEndedAfterAChangeRecordsIt(t *testing.T) {
	pol := testPolicy()
	pol.Algorithms = []Algorithm{Ed25519}
	pol.Zone = pol.Domain
	e := newEnv(t, pol)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	e.dns.afterSet = cancel
	// Passes until one sets a record (the first ones generate the key).
	for i := 0; i < 10 && ctx.Err() == nil; i++ {
		_, _ = e.r.Reconcile(ctx) // an error is the ended context's, or none
		e.clock.Advance(time.Minute)
	}
	e.dns.afterSet = nil
	keys := e.keys()
	if len(keys) != 1 {
		t.Fatalf("%d keys in the state, want 1", len(keys))
	}
	k := keys[0]
	served := e.dns.names()[pol.relName(k.Selector)]
	if served == "" {
		t.Fatalf("%s: the pass did not publish before its context ended (state %s)", k.Selector, k.State)
	}
	if k.State != StatePublished {
		t.Errorf("%s: DNS holds its record but the state says %s, want %s", k.Selector, k.State, StatePublished)
	}
	e.checkInvariants()
	e.mustPass()
}
