package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/testenv"
)

// switchWindow bounds how long after a key's retirement a gateway may
// still sign with it: the watch switches within about a second; the rest
// is margin for a loaded machine.
const switchWindow = 3 * time.Second

// takeoverMargin is how long after the dead leader's lease expired the
// test allows for another gateway to lead and say so in its metrics.
const takeoverMargin = 4 * time.Second

// fleet is several `dkimgw serve` processes sharing one SoftHSM token,
// one etcd cluster and one BIND server, with mail relayed through them
// in turn and every message checked as it arrives.
type fleet struct {
	t      *testing.T // the current subtest
	top    *testing.T // the test: the gateways live as long as it
	bin    string
	etcd   *testenv.EtcdCluster
	dns    *rotServe // for its DNS lookups and verification
	st     *testenv.SoftHSMToken
	sink   *testenv.SMTPSink
	store  *etcdstore.Store // the test's own view of the state
	domain string
	policy string

	gws  []*gateway
	live []int // indexes into gws of the gateways mail goes through
	next int
	n    int
	msgs []fleetMsg
}

// fleetMsg is one relayed message: who signed it with what, and when the
// gateway answered 250.
type fleetMsg struct {
	gw        int
	selectors []string
	repliedAt time.Time
}

// etcdState is the state: section of a gateway on c's members under
// prefix, with lease_ttl ttl.
func etcdState(c *testenv.EtcdCluster, prefix, ttl string) string {
	eps := make([]string, len(c.Members))
	for j, m := range c.Members {
		eps[j] = strconv.Quote(m.ClientURL)
	}
	return fmt.Sprintf(`state:
  type: etcd
  endpoints: [%s]
  prefix: %s
  dial_timeout: 2s
  lease_ttl: %s
`, strings.Join(eps, ", "), prefix, ttl)
}

func (f *fleet) config(i int) gwConfig {
	k := f.dns.srv.Keys[0]
	return gwConfig{
		uri: f.st.URIWithPINFile(f.t), upstream: f.sink.Addr(),
		clientDomains: []string{f.domain},
		rotating:      map[string]string{f.domain: f.policy},
		extra: fmt.Sprintf(`dns:
  publishers:
    primary: {type: rfc2136, server: %q, tsig: {name: %q, algorithm: %s, secret_file: %q}}
  check_servers: [%q]
  timeout: 5s
rotation:
  check_every: 500ms
data_dir: %q
%s`, f.dns.srv.Addr, k.Name, k.Algorithm, f.dns.srv.KeyFile(f.t, k), f.dns.srv.Addr, f.t.TempDir(), etcdState(f.etcd, "/e2e/", "3s")),
	}
}

// start starts one more gateway and sends mail through it too.
func (f *fleet) start() int {
	f.t.Helper()
	f.gws = append(f.gws, startGateway(f.top, f.bin, f.config(len(f.gws))))
	i := len(f.gws) - 1
	f.live = append(f.live, i)
	return i
}

// kill9 kills gateway i with SIGKILL; mail no longer goes through it.
func (f *fleet) kill9(i int) {
	f.t.Helper()
	f.live = slices.DeleteFunc(f.live, func(j int) bool { return j == i })
	if err := f.gws[i].cmd.Process.Signal(syscall.SIGKILL); err != nil {
		f.t.Fatal(err)
	}
	f.gws[i].waitExit(10 * time.Second)
}

// keys reads the domain's records from etcd.
func (f *fleet) keys() []rotation.Key {
	f.t.Helper()
	keys, err := f.store.Keys(f.t.Context(), f.domain)
	if err != nil {
		f.t.Fatalf("read the state: %v", err)
	}
	return keys
}

// tryKeys reads the domain's records, or nil while etcd does not answer
// (it elects a new leader after losing one).
func (f *fleet) tryKeys() []rotation.Key {
	keys, err := f.store.Keys(f.t.Context(), f.domain)
	if err != nil {
		f.t.Logf("read the state: %v", err)
		return nil
	}
	return keys
}

// send relays one message through the next live gateway and verifies
// it against what DNS serves now. Before the first key is active 451
// 4.7.0 is the only other reply allowed.
func (f *fleet) send() {
	t := f.t
	t.Helper()
	i := f.live[f.next%len(f.live)]
	f.next++
	f.n++
	id := fmt.Sprintf("fleet-%d@%s", f.n, f.domain)
	msg := testMessage("news@"+f.domain, "a@example.net", id, "fleet "+id, "body of "+id+"\r\n")
	c, err := smtp.Dial(f.gws[i].addr)
	if err != nil {
		t.Fatalf("gateway %d: %v", i, err)
	}
	defer c.Close()
	err = c.SendMail("bounce@"+f.domain, []string{"a@example.net"}, strings.NewReader(msg))
	replied := time.Now()
	if err != nil {
		code, ec, text := smtpCode(err)
		if len(f.msgs) == 0 && code == 451 && ec == [3]int{4, 7, 0} {
			return
		}
		t.Fatalf("gateway %d, message %s: %v (%d %v %s)", i, id, err, code, ec, text)
	}
	got := withID(f.sink.Messages(), id)
	if len(got) != 1 {
		t.Fatalf("message %s reached the upstream %d times", id, len(got))
	}
	_, sels, err := f.dns.verifyLive(got[0].Data)
	if err != nil {
		t.Fatalf("gateway %d, message %s, signed by a key DNS does not serve: %v", i, id, err)
	}
	f.msgs = append(f.msgs, fleetMsg{gw: i, selectors: sels, repliedAt: replied})
}

// pump relays mail, a message every ~100 ms, until done or timeout.
func (f *fleet) pump(timeout time.Duration, what string, done func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	for !done() {
		if time.Now().After(deadline) {
			keys, err := f.store.Keys(f.t.Context(), f.domain)
			f.t.Fatalf("not %s within %v; state: %+v %v", what, timeout, keys, err)
		}
		f.send()
		time.Sleep(100 * time.Millisecond)
	}
}

// pumpFor relays mail for d without looking at the state.
func (f *fleet) pumpFor(d time.Duration) {
	f.t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		f.send()
		time.Sleep(100 * time.Millisecond)
	}
}

func activated(keys []rotation.Key) int {
	n := 0
	for _, k := range keys {
		if !k.ActivatedAt.IsZero() {
			n++
		}
	}
	return n
}

// fingerprint is the state's transitions so far: it changes with every
// write.
func fingerprint(keys []rotation.Key) string {
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s@%d ", k.Selector, k.Rev)
	}
	return b.String()
}

// metric reads one unlabelled gauge from gateway i's /metrics.
func (f *fleet) metric(i int, name string) (float64, bool) {
	resp, err := http.Get("http://" + f.gws[i].admin + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			x, err := strconv.ParseFloat(v, 64)
			return x, err == nil
		}
	}
	return 0, false
}

// leader returns the one live gateway whose metrics say it leads, once
// exactly one does.
func (f *fleet) leader(timeout time.Duration) int {
	f.t.Helper()
	var leaders []int
	f.pump(timeout, "one leader", func() bool {
		leaders = leaders[:0]
		for _, i := range f.live {
			if v, _ := f.metric(i, "dkimgw_state_leader"); v == 1 {
				leaders = append(leaders, i)
			}
		}
		return len(leaders) == 1
	})
	return leaders[0]
}

// allMetric reports whether every live gateway's gauge is v.
func (f *fleet) allMetric(name string, v float64) bool {
	for _, i := range f.live {
		if x, ok := f.metric(i, name); !ok || x != v {
			return false
		}
	}
	return true
}

// TestEtcdFleet: three gateways on one etcd cluster and one token rotate
// a domain while mail flows through all of them: two rotations; the
// leader killed after a publish (another finishes the rotation); a
// gateway started mid-rotation; an etcd member lost, then the etcd
// leader; all of etcd down (signing goes on, transitions pause, then
// resume; TestEtcdStateChecks covers rotate status then). Every message verifies against DNS when it arrives, no
// gateway signs with a retired key for longer than the switch window or
// with a key before it is active, and each rotation generated exactly
// one key.
func TestEtcdFleet(t *testing.T) {
	testenv.Require(t, "etcd")
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	f := &fleet{
		t: t, top: t, bin: bin, etcd: testenv.StartEtcd(t), st: testenv.SoftHSM(t), sink: testenv.NewSMTPSink(t),
		domain: strings.TrimSuffix(server.Zone, "."),
		policy: "{algorithms: [ed25519], interval: 5s, grace: 2s, revoke_for: 1s, ttl: 1, publisher: primary}",
	}
	f.dns = &rotServe{t: t, srv: server}
	s, err := etcdstore.Open(etcdstore.Options{Endpoints: f.etcd.Endpoints(), Prefix: "/e2e/", CallTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f.store = s
	for range 3 {
		f.start()
	}

	t.Run("two rotations", func(t *testing.T) {
		f.t = t
		f.pump(40*time.Second, "rotated twice", func() bool { return activated(f.keys()) >= 3 })
		for _, i := range f.live {
			if !slices.ContainsFunc(f.msgs, func(m fleetMsg) bool { return m.gw == i }) {
				t.Errorf("gateway %d signed no message", i)
			}
		}
	})

	t.Run("leader killed after publish", func(t *testing.T) {
		f.t = t
		var sel string
		f.pump(20*time.Second, "a successor published", func() bool {
			for _, k := range f.keys() {
				if k.State == rotation.StatePublished {
					sel = k.Selector
					return true
				}
			}
			return false
		})
		old := f.leader(10 * time.Second)
		f.kill9(old)
		killed := time.Now()
		t.Logf("killed leader gateway %d with %s published", old, sel)
		// Another leads once the dead one's lease (lease_ttl: 3s) expires.
		if now := f.leader(15 * time.Second); now == old {
			t.Errorf("the killed gateway %d still leads", old)
		}
		if d := time.Since(killed); d > 3*time.Second+takeoverMargin {
			t.Errorf("another gateway led %v after the leader was killed, want within the 3s lease (+%v)", d, takeoverMargin)
		}
		// A gateway started while the rotation is half done.
		late := f.start()
		if keys := f.tryKeys(); slices.ContainsFunc(keys, func(k rotation.Key) bool { return k.Selector == sel && k.State == rotation.StateActive }) {
			t.Logf("%s was already active when the late gateway started", sel)
		}
		f.pump(30*time.Second, sel+" active", func() bool {
			keys := f.keys()
			i := slices.IndexFunc(keys, func(k rotation.Key) bool { return k.Selector == sel })
			return i >= 0 && keys[i].State == rotation.StateActive
		})
		f.pump(10*time.Second, "mail through the late gateway", func() bool {
			return slices.ContainsFunc(f.msgs, func(m fleetMsg) bool { return m.gw == late })
		})
	})

	t.Run("etcd members lost", func(t *testing.T) {
		f.t = t
		for _, which := range []string{"follower", "leader"} {
			lead, err := f.etcd.Leader(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			victim := lead
			if which == "follower" {
				victim = (lead + 1) % len(f.etcd.Members)
			}
			before := fingerprint(f.keys())
			revs := map[int]float64{}
			for _, i := range f.live {
				revs[i], _ = f.metric(i, "dkimgw_state_revision")
			}
			f.etcd.Kill(victim)
			f.pump(30*time.Second, "a transition with the etcd "+which+" down", func() bool {
				keys := f.tryKeys()
				return keys != nil && fingerprint(keys) != before
			})
			// Every gateway applied it (its watch moved to another member).
			f.pump(10*time.Second, "every gateway at a later revision", func() bool {
				for _, i := range f.live {
					if v, ok := f.metric(i, "dkimgw_state_revision"); !ok || v <= revs[i] {
						return false
					}
				}
				return true
			})
			f.etcd.Restart(victim)
		}
	})

	t.Run("etcd down", func(t *testing.T) {
		f.t = t
		before := fingerprint(f.keys())
		marks := make([]int, len(f.gws))
		for _, i := range f.live {
			marks[i] = f.gws[i].mark()
		}
		f.etcd.StopAll()
		f.pump(30*time.Second, "every gateway seeing the store down", func() bool { return f.allMetric("dkimgw_state_store_up", 0) })
		// Still ready (it signs), saying the store is unreachable.
		resp, err := http.Get("http://" + f.gws[f.live[0]].admin + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		var ready struct {
			Status string            `json:"status"`
			Checks map[string]string `json:"checks"`
		}
		err = json.NewDecoder(resp.Body).Decode(&ready)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !strings.Contains(ready.Checks["state"], "unreachable") {
			t.Errorf("/readyz with etcd down: %d %+v %v; want 200 and the state check saying unreachable", resp.StatusCode, ready, err)
		}
		sent := len(f.msgs)
		f.pumpFor(2 * time.Second)
		if len(f.msgs)-sent < 5 {
			t.Errorf("only %d messages signed in 2 s with etcd down", len(f.msgs)-sent)
		}
		for _, i := range f.live {
			for _, l := range f.gws[i].logLines(marks[i]) {
				if l.str("msg") == "key state changed" {
					t.Errorf("gateway %d moved a key with etcd down: %s", i, l.raw)
				}
			}
		}
		f.etcd.RestartAll()
		f.pump(30*time.Second, "rotation resumed", func() bool {
			keys := f.tryKeys()
			return keys != nil && fingerprint(keys) != before && f.allMetric("dkimgw_state_store_up", 1)
		})
	})

	// Stop the fleet, then check what it did.
	for _, i := range slices.Clone(f.live) {
		f.live = slices.DeleteFunc(f.live, func(j int) bool { return j == i })
		_ = f.gws[i].cmd.Process.Signal(syscall.SIGTERM)
		f.gws[i].waitExit(30 * time.Second)
	}
	f.t = t
	checkFleet(t, f)
}

func checkFleet(t *testing.T, f *fleet) {
	keys := f.keys()
	bySel := map[string]rotation.Key{}
	for _, k := range keys {
		bySel[k.Selector] = k
	}
	// No gateway signed with a key before it was active, nor longer than
	// the switch window after it retired.
	late := 0
	for _, m := range f.msgs {
		for _, sel := range m.selectors {
			k, ok := bySel[sel]
			switch {
			case !ok:
				t.Errorf("a message of gateway %d was signed by %s, which the state does not know", m.gw, sel)
			case k.ActivatedAt.IsZero() || m.repliedAt.Before(k.ActivatedAt):
				t.Errorf("gateway %d signed with %s at %s, before it was active (%s)", m.gw, sel, m.repliedAt, k.ActivatedAt)
			case !k.RetiredAt.IsZero() && m.repliedAt.After(k.RetiredAt.Add(switchWindow)):
				t.Errorf("gateway %d signed with %s at %s, %s after it retired", m.gw, sel, m.repliedAt, m.repliedAt.Sub(k.RetiredAt))
			case !k.RetiredAt.IsZero() && m.repliedAt.After(k.RetiredAt):
				late++
			}
		}
	}
	t.Logf("%d messages from %d gateways, %d keys in the state; %d messages signed by a key retired less than %v before", len(f.msgs), len(f.gws), len(keys), late, switchWindow)
	// Exactly one key per rotation: every key of the token is a record
	// of the state, and every record that has a key has exactly one.
	tok, err := hsm.Open(t.Context(), f.st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	infos, err := tok.Keys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	inToken := map[string]int{}
	for _, i := range infos {
		if i.Domain == f.domain {
			inToken[i.Selector]++
		}
	}
	for sel, n := range inToken {
		k, ok := bySel[sel]
		if n != 1 || !ok || k.State == rotation.StateDestroyed || k.State == rotation.StatePlanned {
			t.Errorf("the token holds %d keys for %s (state: %q)", n, sel, k.State)
		}
	}
	for _, k := range keys {
		has := k.State != rotation.StateDestroyed && k.State != rotation.StatePlanned
		if has != (inToken[k.Selector] == 1) {
			t.Errorf("%s is %s but the token holds %d keys for it", k.Selector, k.State, inToken[k.Selector])
		}
		vals, err := f.dns.srv.TXT(hsm.RecordName(f.domain, k.Selector))
		if err != nil {
			t.Fatal(err)
		}
		switch k.State {
		case rotation.StatePublished, rotation.StateVisible, rotation.StateActive, rotation.StateRetired:
			if len(vals) != 1 || vals[0] != k.Record {
				t.Errorf("%s is %s; DNS serves %q", k.Selector, k.State, vals)
			}
		case rotation.StateRevoked:
			if len(vals) != 1 || vals[0] != rotation.RevokedRecord {
				t.Errorf("%s is revoked; DNS serves %q", k.Selector, vals)
			}
		}
	}
	if n := activated(keys); n < 4 {
		t.Errorf("%d keys were activated, want at least 4 (the first, two rotations, and the one the killed leader left)", n)
	}
}
