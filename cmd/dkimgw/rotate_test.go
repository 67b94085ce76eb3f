package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// rotEnv is a rotating domain of a test: a SoftHSM token, a real DNS
// server serving its zone, and a configuration file.
type rotEnv struct {
	t       *testing.T
	st      *testenv.SoftHSMToken
	dns     *testenv.DNSServer
	domain  string
	config  string
	dataDir string
	env     map[string]string
}

// rotTiming is the second-scale policy of the CLI tests.
type rotTiming struct {
	interval, grace, revokeFor string
}

var fastRotation = rotTiming{interval: "1h", grace: "2s", revokeFor: "1s"}

// newRotEnv starts a DNS server with a one-second negative TTL and writes
// a configuration whose domain rotates with publisher kind "rfc2136" or
// "manual". secret overrides the TSIG secret (a wrong one).
func newRotEnv(t *testing.T, server *testenv.DNSServer, kind string, timing rotTiming, algs string) *rotEnv {
	t.Helper()
	st := testenv.SoftHSM(t)
	e := &rotEnv{t: t, st: st, dns: server, domain: strings.TrimSuffix(server.Zone, "."), dataDir: t.TempDir()}
	e.env = map[string]string{}
	e.config = filepath.Join(t.TempDir(), "dkimgw.yaml")
	e.writeConfig(e.configText(kind, timing, algs, server.KeyFile(t, server.Keys[0])))
	return e
}

func (e *rotEnv) configText(kind string, timing rotTiming, algs, secretFile string) string {
	var pub string
	switch kind {
	case "rfc2136":
		pub = fmt.Sprintf("{type: rfc2136, server: %q, zone: %q, tsig: {name: %q, algorithm: %s, secret_file: %q}}",
			e.dns.Addr, e.dns.Zone, e.dns.Keys[0].Name, e.dns.Keys[0].Algorithm, secretFile)
	case "manual":
		pub = "{type: manual}"
	}
	return fmt.Sprintf(`hsm: {uri: %q}
upstream: {address: "127.0.0.1:25"}
clients:
  - name: mta
    networks: ["127.0.0.1/32"]
    domains: [%[2]s]
domains:
  %[2]s:
    rotation:
      algorithms: [%[3]s]
      interval: %[4]s
      grace: %[5]s
      revoke_for: %[6]s
      ttl: 1
      publisher: pub
dns:
  publishers:
    pub: %[7]s
  check_servers: [%[8]q]
  timeout: 5s
rotation:
  check_every: 1s
data_dir: %[9]q
log: {format: json}
`, e.st.URIWithPINFile(e.t), e.domain, algs, timing.interval, timing.grace, timing.revokeFor, pub, e.dns.Addr, e.dataDir)
}

func (e *rotEnv) writeConfig(text string) {
	e.t.Helper()
	if err := os.WriteFile(e.config, []byte(text), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

func (e *rotEnv) run(args ...string) result {
	e.t.Helper()
	return runCLI(e.t, e.env, "", append(args, "--config", e.config)...)
}

// rotate runs one pass and fails the test on an error.
func (e *rotEnv) rotate() result {
	e.t.Helper()
	r := e.run("rotate")
	if r.code != 0 {
		e.t.Fatalf("rotate: exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	return r
}

func (e *rotEnv) status() []rotation.Status {
	e.t.Helper()
	r := e.run("rotate", "status", "--json")
	if r.code != 0 {
		e.t.Fatalf("rotate status: exit %d: %s", r.code, r.stderr)
	}
	var st []rotation.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		e.t.Fatalf("rotate status --json: %v\n%s", err, r.stdout)
	}
	return st
}

func (e *rotEnv) inState(s rotation.State) []rotation.Status {
	var out []rotation.Status
	for _, k := range e.status() {
		if k.State == s {
			out = append(out, k)
		}
	}
	return out
}

// rotateUntil runs passes (half a second apart) until done, for at most
// timeout.
func (e *rotEnv) rotateUntil(timeout time.Duration, what string, done func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for !done() {
		if time.Now().After(deadline) {
			e.t.Fatalf("not %s within %v; status:\n%s", what, timeout, e.run("rotate", "status").stdout)
		}
		e.rotate()
		time.Sleep(500 * time.Millisecond)
	}
}

// served asks the test server for name's TXT values.
func (e *rotEnv) served(name string) []string {
	e.t.Helper()
	vals, err := e.dns.TXT(name)
	if err != nil {
		e.t.Fatalf("query %s: %v", name, err)
	}
	return vals
}

// tokenRecords returns the DKIM record of every key in the token, by
// record name.
func (e *rotEnv) tokenRecords() map[string]string {
	e.t.Helper()
	tok, err := hsm.Open(e.t.Context(), e.st.URI(), hsm.Options{})
	if err != nil {
		e.t.Fatal(err)
	}
	defer tok.Close()
	infos, err := tok.Keys(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]string{}
	for _, i := range infos {
		k, err := tok.Key(e.t.Context(), i.Domain, i.Selector)
		if err != nil {
			e.t.Fatal(err)
		}
		v, err := hsm.TXTRecord(k.Public())
		if err != nil {
			e.t.Fatal(err)
		}
		out[i.Label] = v
	}
	return out
}

// TestRotateCLI takes a domain through its first key, a rotation, the
// retirement, revocation and destruction of the first key, with `rotate`
// passes against a real BIND9 and a real Knot.
func TestRotateCLI(t *testing.T) {
	for _, server := range testenv.DNSServers(t, testenv.DNSOptions{SOAMinimum: 1}) {
		t.Run(server.Impl, func(t *testing.T) {
			e := newRotEnv(t, server, "rfc2136", fastRotation, "rsa-2048, ed25519")
			r := e.run("rotate", "--dry-run")
			if r.code != 0 || !strings.Contains(r.stdout, "would: ") || !strings.Contains(r.stdout, "no active key: start one") {
				t.Fatalf("rotate --dry-run: exit %d:\n%s%s", r.code, r.stdout, r.stderr)
			}
			if len(e.status()) != 0 || len(e.tokenRecords()) != 0 {
				t.Fatal("a dry run changed the state or the token")
			}
			r = e.rotate()
			if !strings.Contains(r.stdout, "generated the key in the key store [planned -> generated]") {
				t.Errorf("first pass printed:\n%s", r.stdout)
			}
			if !strings.Contains(r.stdout, e.domain+": no active key yet") {
				t.Errorf("first pass does not say the domain has no active key:\n%s", r.stdout)
			}
			e.rotateUntil(30*time.Second, "active", func() bool { return len(e.inState(rotation.StateActive)) == 2 })
			first := e.inState(rotation.StateActive)
			toks := e.tokenRecords()
			for _, k := range first {
				name := hsm.RecordName(k.Domain, k.Selector)
				if got := e.served(name); len(got) != 1 || got[0] != toks[name] || k.Record != toks[name] {
					t.Errorf("%s: DNS serves %q, the token's key is %.50q, the state says %.50q", name, got, toks[name], k.Record)
				}
			}
			if r := e.run("dns", "check"); r.code != 0 || !strings.Contains(r.stdout, "every server serves what dkimgw expects") {
				t.Fatalf("dns check on a healthy zone: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			if r := e.run("rotate", "status"); !strings.Contains(r.stdout, "start the successor") {
				t.Errorf("rotate status:\n%s", r.stdout)
			}

			// A short interval: the successors start, the first keys
			// retire, are revoked, then destroyed.
			e.writeConfig(e.configText("rfc2136", rotTiming{"3s", "2s", "1s"}, "rsa-2048, ed25519", server.KeyFile(t, server.Keys[0])))
			e.rotateUntil(60*time.Second, "the first keys destroyed", func() bool { return len(e.inState(rotation.StateDestroyed)) >= 2 })
			toks = e.tokenRecords()
			for _, k := range first {
				name := hsm.RecordName(k.Domain, k.Selector)
				if _, ok := toks[name]; ok {
					t.Errorf("%s destroyed but still in the token", name)
				}
				if got := e.served(name); len(got) != 0 {
					t.Errorf("%s destroyed but DNS serves %q", name, got)
				}
			}
			// Never more keys in the token than the state knows alive.
			alive := 0
			for _, k := range e.status() {
				if k.State != rotation.StateDestroyed && k.State != rotation.StatePlanned {
					alive++
				}
			}
			if len(toks) != alive {
				t.Errorf("token holds %d keys, the state %d alive ones", len(toks), alive)
			}
		})
	}
}

// TestRotateWrongTSIG: a wrong TSIG secret is a clear error, and nothing
// is published or activated.
func TestRotateWrongTSIG(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "ed25519")
	bad := filepath.Join(t.TempDir(), "wrong.key")
	if err := os.WriteFile(bad, []byte("c2VjcmV0IHRoYXQgaXMgd3Jvbmc=\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.writeConfig(e.configText("rfc2136", fastRotation, "ed25519", bad))
	e.rotate() // planned -> generated: nothing asked of DNS yet
	for range 2 {
		r := e.run("rotate")
		if r.code != 1 || !strings.Contains(r.stderr, "TSIG") || !strings.Contains(r.stderr, server.Keys[0].Name) {
			t.Errorf("rotate with a wrong TSIG secret: exit %d, want 1 and an error naming the TSIG key:\n%s", r.code, r.stderr)
		}
	}
	st := e.status()
	if len(st) != 1 || st[0].State != rotation.StateGenerated {
		t.Fatalf("after passes with a wrong secret: %+v, want one generated key", st)
	}
	if got := e.served(hsm.RecordName(e.domain, st[0].Selector)); len(got) != 0 {
		t.Fatalf("DNS serves %q", got)
	}
	if r := e.run("rotate"); !strings.Contains(r.stdout, "no active key yet") {
		t.Errorf("rotate does not say the domain has no active key:\n%s", r.stdout)
	}
}

// TestRotateRecordAlteredBehindOurBack: a published key whose record
// someone changes is not activated; an active key whose record changes
// makes `dns check` fail.
func TestRotateRecordAlteredBehindOurBack(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "ed25519")
	pub, err := dnspub.NewRFC2136(dnspub.RFC2136Options{Server: server.Addr,
		TSIG: dnspub.TSIG{Name: server.Keys[1].Name, Algorithm: server.Keys[1].Algorithm, SecretFile: server.KeyFile(t, server.Keys[1])}})
	if err != nil {
		t.Fatal(err)
	}
	alter := func(pub *dnspub.RFC2136, zone, sel string) {
		t.Helper()
		name := hsm.RecordName(e.domain, sel) + "."
		if _, err := pub.SetRecords(t.Context(), zone, []dnspub.Record{{Name: name, TTL: time.Second, Value: "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}}); err != nil {
			t.Fatal(err)
		}
	}
	e.rotate() // planned -> generated
	e.rotate() // published
	st := e.inState(rotation.StatePublished)
	if len(st) != 1 {
		t.Fatalf("status %+v", e.status())
	}
	alter(pub, server.Zone, st[0].Selector)
	for range 6 {
		e.run("rotate")
		time.Sleep(400 * time.Millisecond)
	}
	if act := e.inState(rotation.StateActive); len(act) != 0 {
		t.Fatalf("a key whose record was altered in DNS was activated: %+v", act)
	}
	if r := e.run("dns", "check"); r.code != 1 || !strings.Contains(r.stdout, "MISMATCH") {
		t.Errorf("dns check with an altered record of a published key: exit %d\n%s", r.code, r.stdout)
	}

	// A fresh zone and state: let the key activate, then alter its record.
	server2 := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e2 := newRotEnv(t, server2, "rfc2136", fastRotation, "ed25519")
	e2.rotateUntil(30*time.Second, "active", func() bool { return len(e2.inState(rotation.StateActive)) == 1 })
	act := e2.inState(rotation.StateActive)[0]
	if r := e2.run("dns", "check", "--selector", act.Selector); r.code != 0 {
		t.Fatalf("dns check before the change: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	pub2, err := dnspub.NewRFC2136(dnspub.RFC2136Options{Server: server2.Addr,
		TSIG: dnspub.TSIG{Name: server2.Keys[1].Name, Algorithm: server2.Keys[1].Algorithm, SecretFile: server2.KeyFile(t, server2.Keys[1])}})
	if err != nil {
		t.Fatal(err)
	}
	alter(pub2, server2.Zone, act.Selector)
	r := e2.run("dns", "check", "--selector", act.Selector, "--json")
	if r.code != 1 {
		t.Fatalf("dns check after the active record changed: exit %d, want 1\n%s", r.code, r.stdout)
	}
	var res []checkResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || len(res) != 1 || res[0].OK || len(res[0].Results) != 2 {
		t.Fatalf("dns check --json: %v\n%s", err, r.stdout)
	}
	for _, s := range res[0].Results {
		if s.State != "different" {
			t.Errorf("server %s/%s: %s, want different", s.Server, s.Net, s.State)
		}
	}
}

// TestRotateManualPublisher plays the DNS admin: it loads `dns pending`
// output into BIND with nsupdate, and the key becomes active; the zone
// fragment passes named-checkzone.
func TestRotateManualPublisher(t *testing.T) {
	tools := testenv.Require(t, "nsupdate", "named-checkzone")
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "manual", fastRotation, "rsa-2048, ed25519")
	e.rotate()
	e.rotate()
	if n := len(e.inState(rotation.StatePublished)); n != 2 {
		t.Fatalf("%d keys published (to the manual publisher), want 2", n)
	}
	r := e.run("dns", "pending")
	if r.code != 0 || strings.Count(r.stdout, "\tIN\tTXT\t") != 2 {
		t.Fatalf("dns pending: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	zone := fmt.Sprintf("$ORIGIN %s\n$TTL 3600\n@ IN SOA ns1 hostmaster 1 3600 600 86400 1\n@ IN NS ns1\nns1 IN A 127.0.0.1\n", server.Zone) + r.stdout
	zf := filepath.Join(t.TempDir(), "zone")
	if err := os.WriteFile(zf, []byte(zone), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(tools[1], server.Zone, zf).CombinedOutput(); err != nil {
		t.Fatalf("named-checkzone refused the dns pending output: %v\n%s\n%s", err, out, zone)
	}
	// Not published yet: nothing becomes active however long we wait.
	for range 3 {
		e.rotate()
	}
	if n := len(e.inState(rotation.StateActive)); n != 0 {
		t.Fatalf("%d keys active before the DNS admin published them", n)
	}

	r = e.run("dns", "pending", "--format", "nsupdate", "--server", server.Addr)
	if r.code != 0 || strings.Count(r.stdout, "update add ") != 2 || !strings.Contains(r.stdout, "send") {
		t.Fatalf("dns pending --format nsupdate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	k := server.Keys[0]
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tools[0], "-y", k.Algorithm+":"+strings.TrimSuffix(k.Name, ".")+":"+k.Secret)
	cmd.Stdin = strings.NewReader(r.stdout)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nsupdate: %v\n%s\nscript:\n%s", err, out, r.stdout)
	}
	e.rotateUntil(30*time.Second, "active", func() bool { return len(e.inState(rotation.StateActive)) == 2 })
	if r := e.run("dns", "pending"); !strings.Contains(r.stdout, "nothing pending") {
		t.Errorf("dns pending after the admin published everything:\n%s", r.stdout)
	}
	if r := e.run("dns", "check"); r.code != 0 {
		t.Errorf("dns check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestRotateLocked: a second reconciler waits for the first, then says
// who holds the lock.
func TestRotateLocked(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "ed25519")
	store, err := rotation.OpenBolt(e.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := store.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	r := e.run("rotate", "--wait", "1s")
	if r.code != exitTempFail || !strings.Contains(r.stderr, fmt.Sprintf("locked by pid %d", os.Getpid())) {
		t.Errorf("rotate while locked: exit %d, want %d naming the holder\n%s", r.code, exitTempFail, r.stderr)
	}
	// Two reconcilers at once: one waits for the other; no duplicates.
	_ = unlock()
	results := make(chan result, 2)
	for range 2 {
		go func() { results <- runCLI(t, e.env, "", "rotate", "--config", e.config) }()
	}
	for range 2 {
		if r := <-results; r.code != 0 {
			t.Errorf("concurrent rotate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	}
	if st := e.status(); len(st) != 1 || len(e.tokenRecords()) != 1 {
		t.Fatalf("after two concurrent passes: state %+v, token %d keys; want one key", st, len(e.tokenRecords()))
	}
	if unlock, err = store.Lock(t.Context()); err != nil {
		t.Fatal(err)
	}
	// It waits: released within the wait, the pass goes ahead.
	time.AfterFunc(time.Second, func() { _ = unlock() })
	r = e.run("rotate", "--wait", "30s")
	if r.code != 0 {
		t.Errorf("rotate after the lock was released: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestRotateEmergency: the compromised key stops signing and its record
// is revoked at once; the new key is active as soon as DNS serves it.
func TestRotateEmergency(t *testing.T) {
	server := testenv.StartKnot(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", rotTiming{"1h", "1h", "1h"}, "ed25519")
	e.rotateUntil(30*time.Second, "active", func() bool { return len(e.inState(rotation.StateActive)) == 1 })
	old := e.inState(rotation.StateActive)[0]
	if r := e.run("rotate", "--emergency"); r.code != exitUsage {
		t.Errorf("--emergency without --domain: exit %d", r.code)
	}
	if r := e.run("rotate", "--domain", "other.example", "--emergency"); r.code != exitUsage || !strings.Contains(r.stderr, "no rotation policy") {
		t.Errorf("--emergency for a domain without rotation: exit %d: %s", r.code, r.stderr)
	}
	r := e.run("rotate", "--domain", e.domain, "--emergency")
	if r.code != 0 {
		t.Fatalf("rotate --emergency: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "EMERGENCY ROTATION") || !strings.Contains(r.stdout, "EMERGENCY: ") {
		t.Errorf("not loud:\nstdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
	if got := e.served(hsm.RecordName(e.domain, old.Selector)); len(got) != 1 || got[0] != rotation.RevokedRecord {
		t.Errorf("the compromised selector's record right after --emergency: %q, want %q", got, rotation.RevokedRecord)
	}
	if act := e.inState(rotation.StateActive); len(act) != 0 {
		t.Errorf("keys still active right after --emergency: %+v", act)
	}
	e.rotateUntil(30*time.Second, "the replacement active", func() bool { return len(e.inState(rotation.StateActive)) == 1 })
	if n := e.inState(rotation.StateActive)[0]; n.Selector == old.Selector || n.Compromised {
		t.Errorf("active after the emergency: %+v", n)
	}
	if r := e.run("dns", "check"); r.code != 0 {
		t.Errorf("dns check after the emergency: exit %d\n%s", r.code, r.stdout)
	}
	// The audit log holds every pass, by the Unix user, and the
	// emergency revocation of the old key.
	me, _ := user.Current()
	runs, emergency := 0, 0
	for _, rec := range readAudit(t, filepath.Join(e.dataDir, "audit.log")) {
		if rec.Actor != me.Username {
			t.Errorf("record %d actor %q, want %q", rec.Seq, rec.Actor, me.Username)
		}
		switch {
		case rec.Event == audit.EventRotateRun && rec.Details["emergency"] == true:
			runs++
		case rec.Event == audit.EventEmergency && rec.Selector == old.Selector:
			emergency++
		}
	}
	if runs != 1 || emergency != 1 {
		t.Errorf("audit log: %d emergency rotate runs, %d emergency revocations of %s; want 1 and 1", runs, emergency, old.Selector)
	}
}

// TestRotationRecordMatchesHSM: rotation renders a key's record itself;
// it must be the text hsm renders (and `keys dns` prints) for the same
// key, or a rotated record would not verify what the token signs.
func TestRotationRecordMatchesHSM(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "rsa-2048, rsa-3072, ed25519")
	e.rotate()
	toks := e.tokenRecords()
	st := e.inState(rotation.StateGenerated)
	if len(st) != 3 {
		t.Fatalf("status %+v", e.status())
	}
	for _, k := range st {
		if want := toks[hsm.RecordName(k.Domain, k.Selector)]; k.Record != want || want == "" {
			t.Errorf("%s (%s): rotation recorded %.60q, hsm renders %.60q", k.Selector, k.Algorithm, k.Record, want)
		}
	}
}

// TestRotateDoesNotOverwriteForeignRecord: a name that already holds a
// TXT record dkimgw did not publish is reported and left alone; the key
// is not activated.
func TestRotateDoesNotOverwriteForeignRecord(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "ed25519")
	sel := "ed" + time.Now().UTC().Format("20060102")
	pub, err := dnspub.NewRFC2136(dnspub.RFC2136Options{Server: server.Addr,
		TSIG: dnspub.TSIG{Name: server.Keys[1].Name, Algorithm: server.Keys[1].Algorithm, SecretFile: server.KeyFile(t, server.Keys[1])}})
	if err != nil {
		t.Fatal(err)
	}
	const foreign = "v=DKIM1; k=rsa; p=someone-elses-key"
	name := hsm.RecordName(e.domain, sel)
	if _, err := pub.AppendRecords(t.Context(), server.Zone, []dnspub.Record{{Name: name + ".", TTL: time.Second, Value: foreign}}); err != nil {
		t.Fatal(err)
	}
	e.rotate() // planned -> generated
	if st := e.status(); len(st) != 1 || st[0].Selector != sel {
		t.Skipf("the day changed during the test (selector %+v)", st)
	}
	r := e.run("rotate")
	if r.code != 1 || !strings.Contains(r.stderr, "already holds another TXT record") {
		t.Errorf("rotate over a foreign record: exit %d\n%s", r.code, r.stderr)
	}
	if got := e.served(name); len(got) != 1 || got[0] != foreign {
		t.Errorf("the foreign record became %q", got)
	}
	if st := e.status(); st[0].State != rotation.StateGenerated {
		t.Errorf("key state %s, want generated (not published)", st[0].State)
	}
}

// TestRotateKill9: `dkimgw rotate` killed with SIGKILL while it
// generates and publishes keys, at several moments, then run again:
// it converges to one key per algorithm, in the state, the token and
// DNS.
func TestRotateKill9(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "rsa-4096, rsa-3072, ed25519")
	for _, after := range []time.Duration{50 * time.Millisecond, 300 * time.Millisecond, time.Second, 2 * time.Second} {
		cmd := exec.Command(bin, "rotate", "--config", e.config)
		cmd.Env = os.Environ()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(after)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		var states []string
		for _, k := range e.status() {
			states = append(states, string(k.State))
		}
		t.Logf("killed after %v: state %v, %d keys in the token", after, states, len(e.tokenRecords()))
	}
	e.rotateUntil(60*time.Second, "active", func() bool { return len(e.inState(rotation.StateActive)) == 3 })
	st := e.status()
	if len(st) != 3 {
		t.Errorf("the state has %d keys, want 3: %+v", len(st), st)
	}
	toks := e.tokenRecords()
	if len(toks) != 3 {
		t.Errorf("the token holds %d keys, want 3", len(toks))
	}
	for _, k := range st {
		name := hsm.RecordName(k.Domain, k.Selector)
		if got := e.served(name); len(got) != 1 || got[0] != toks[name] {
			t.Errorf("%s: DNS serves %q, want the token's key", name, got)
		}
	}
	if r := e.run("dns", "check"); r.code != 0 {
		t.Errorf("dns check: exit %d\n%s", r.code, r.stdout)
	}
}

// TestConfigCheckRotation: config check builds the reconciler: a TSIG
// secret file that is missing is an invalid configuration (78), and a
// good rotating configuration is OK without creating data_dir.
func TestConfigCheckRotation(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	e := newRotEnv(t, server, "rfc2136", fastRotation, "ed25519")
	dataDir := filepath.Join(t.TempDir(), "not-yet")
	e.dataDir = dataDir
	e.writeConfig(e.configText("rfc2136", fastRotation, "ed25519", server.KeyFile(t, server.Keys[0])))
	r := e.run("config", "check")
	if r.code != 0 || !strings.Contains(r.stdout, "1 rotating domains") {
		t.Fatalf("config check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(dataDir); err == nil {
		t.Error("config check created data_dir")
	}
	missing := filepath.Join(t.TempDir(), "missing.key")
	e.writeConfig(e.configText("rfc2136", fastRotation, "ed25519", missing))
	r = e.run("config", "check")
	if r.code != exitConfig || !strings.Contains(r.stderr, "missing.key") {
		t.Errorf("config check with a missing TSIG secret: exit %d\n%s", r.code, r.stderr)
	}
}
