package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// rotServe is a `dkimgw serve` whose one domain rotates its keys against
// a real DNS server, with a sink as the upstream.
type rotServe struct {
	t       *testing.T
	bin     string
	st      *testenv.SoftHSMToken
	srv     *testenv.DNSServer
	sink    *testenv.SMTPSink
	cfg     gwConfig
	dataDir string
	gw      *gateway
}

func newRotServe(t *testing.T, bin string, server *testenv.DNSServer, policy string) *rotServe {
	t.Helper()
	st := testenv.SoftHSM(t)
	r := &rotServe{t: t, bin: bin, st: st, srv: server, sink: testenv.NewSMTPSink(t), dataDir: t.TempDir()}
	domain := strings.TrimSuffix(server.Zone, ".")
	k := server.Keys[0]
	r.cfg = gwConfig{
		uri: st.URIWithPINFile(t), upstream: r.sink.Addr(),
		clientDomains: []string{domain},
		rotating:      map[string]string{domain: policy},
		extra: fmt.Sprintf(`dns:
  publishers:
    primary: {type: rfc2136, server: %q, tsig: {name: %q, algorithm: %s, secret_file: %q}}
  check_servers: [%q]
  timeout: 5s
rotation:
  check_every: 500ms
data_dir: %q
`, server.Addr, k.Name, k.Algorithm, server.KeyFile(t, k), server.Addr, r.dataDir),
	}
	return r
}

func (r *rotServe) domain() string { return strings.TrimSuffix(r.srv.Zone, ".") }

func (r *rotServe) start() { r.gw = startGateway(r.t, r.bin, r.cfg) }

// verifyLive verifies msg with go-msgauth against what DNS serves now;
// it returns the records it used and the selectors that signed.
func (r *rotServe) verifyLive(msg []byte) (map[string]string, []string, error) {
	used := map[string]string{}
	var mu sync.Mutex // go-msgauth verifies the signatures in parallel
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(msg), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			vals, err := r.srv.TXT(name)
			if err == nil && len(vals) == 1 {
				mu.Lock()
				used[strings.TrimSuffix(strings.ToLower(name), ".")] = vals[0]
				mu.Unlock()
			}
			return vals, err
		},
	})
	if err != nil {
		return nil, nil, err
	}
	var sels []string
	for _, v := range vs {
		if v.Err != nil {
			return used, nil, fmt.Errorf("signature d=%s does not verify against DNS now: %w", v.Domain, v.Err)
		}
	}
	for _, s := range bytesFields(msg, "DKIM-Signature") {
		sels = append(sels, dkimTags(s)["s"])
	}
	if len(sels) == 0 {
		return used, nil, fmt.Errorf("the message is not signed")
	}
	return used, sels, nil
}

// bytesFields returns the values of the header fields named name.
func bytesFields(msg []byte, name string) []string {
	hdr, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	var out []string
	lines := strings.Split(string(hdr), "\r\n")
	for i := 0; i < len(lines); i++ {
		k, v, ok := strings.Cut(lines[i], ":")
		if !ok || !strings.EqualFold(k, name) {
			continue
		}
		for i+1 < len(lines) && (strings.HasPrefix(lines[i+1], " ") || strings.HasPrefix(lines[i+1], "\t")) {
			i++
			v += lines[i]
		}
		out = append(out, v)
	}
	return out
}

// status reads the rotation state as `rotate status --json` prints it.
func (r *rotServe) status() []rotation.Status {
	r.t.Helper()
	path := r.gw.config
	res := runCLI(r.t, nil, "", "rotate", "status", "--json", "--config", path)
	if res.code != 0 {
		r.t.Fatalf("rotate status: exit %d: %s", res.code, res.stderr)
	}
	var st []rotation.Status
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil {
		r.t.Fatalf("rotate status --json: %v", err)
	}
	return st
}

// sent is one message relayed during a rotation.
type sent struct {
	data      []byte
	selectors []string
	records   map[string]string // as DNS served them when it was signed
}

// relayDuring sends a message every ~150 ms through the gateway until
// done says so, verifying each against DNS right after it was relayed
// and re-verifying the earlier ones while their records are published
// unchanged. Before the domain's first key is active, 451 4.7.0 is the
// only reply allowed; after it, every message must be relayed signed.
func (r *rotServe) relayDuring(timeout time.Duration, done func() bool) []sent {
	t := r.t
	t.Helper()
	var msgs []sent
	deadline := time.Now().Add(timeout)
	firstKey := false
	for i := 0; !done(); i++ {
		if time.Now().After(deadline) {
			t.Fatalf("rotation not done within %v; status:\n%s", timeout, runCLI(t, nil, "", "rotate", "status", "--config", r.gw.config).stdout)
		}
		id := fmt.Sprintf("rot-%d@%s", i, r.domain())
		msg := testMessage("news@"+r.domain(), "a@example.net", id, "rotation "+id, "body of "+id+"\r\n")
		before := len(r.sink.Messages())
		res := sendDirect(t, r.gw.addr, "bounce@"+r.domain(), []string{"a@example.net"}, msg)
		if res.mail != nil || res.data != nil {
			code, ec, text := smtpCode(cmpErr(res.mail, res.data))
			if !firstKey && code == 451 && ec == [3]int{4, 7, 0} {
				time.Sleep(150 * time.Millisecond)
				continue
			}
			t.Fatalf("message %s: %d %v %s (first key active: %v)", id, code, ec, text, firstKey)
		}
		firstKey = true
		got := r.sink.Messages()
		if len(got) != before+1 {
			t.Fatalf("message %s: the sink has %d messages, want %d", id, len(got), before+1)
		}
		data := got[len(got)-1].Data
		used, sels, err := r.verifyLive(data)
		if err != nil {
			t.Fatalf("message %s signed by a key DNS does not serve (exactly): %v\n%s", id, err, data)
		}
		msgs = append(msgs, sent{data: data, selectors: sels, records: used})
		// Every earlier message still verifies while its records are
		// unchanged; a record may only change to the revoked form (after
		// the grace period) or go away, never to another key.
		for _, m := range msgs {
			for name, rec := range m.records {
				vals, err := r.srv.TXT(name)
				if err != nil {
					t.Fatalf("lookup %s: %v", name, err)
				}
				if len(vals) == 0 || (len(vals) == 1 && (vals[0] == rec || vals[0] == rotation.RevokedRecord)) {
					continue
				}
				t.Fatalf("%s changed from the record a message was signed against to %q", name, vals)
			}
		}
		time.Sleep(150 * time.Millisecond)
	}
	return msgs
}

func cmpErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// selectorsActive counts the distinct selectors of an algorithm that were
// ever active (active, retired, revoked or destroyed with ActivatedAt).
func selectorsActivated(st []rotation.Status, alg rotation.Algorithm) int {
	n := 0
	for _, k := range st {
		if k.Algorithm == alg && !k.ActivatedAt.IsZero() {
			n++
		}
	}
	return n
}

func destroyed(st []rotation.Status, alg rotation.Algorithm) int {
	n := 0
	for _, k := range st {
		if k.Algorithm == alg && k.State == rotation.StateDestroyed {
			n++
		}
	}
	return n
}

// checkGrace checks that every revoked key stayed published for the
// grace period after it retired.
func checkGrace(t *testing.T, st []rotation.Status, grace time.Duration) {
	t.Helper()
	for _, k := range st {
		if !k.RevokedAt.IsZero() && k.RevokedAt.Sub(k.RetiredAt) < grace {
			t.Errorf("%s revoked %v after it retired, before the grace period %v", k.Selector, k.RevokedAt.Sub(k.RetiredAt), grace)
		}
	}
}

// TestServeRotation: mail flows through `dkimgw serve` while its domain
// rotates its keys twice against BIND9 (once against Knot): every
// message verifies against DNS when it is signed and while its record
// is published; no message fails once the first key is active.
func TestServeRotation(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	const grace = 3 * time.Second
	policy := "{algorithms: [rsa-2048, ed25519], interval: 5s, grace: 3s, revoke_for: 1s, ttl: 1, publisher: primary}"
	for _, tc := range []struct {
		impl      string
		rotations int
	}{{"bind", 2}, {"knot", 1}} {
		t.Run(tc.impl, func(t *testing.T) {
			var server *testenv.DNSServer
			if tc.impl == "bind" {
				server = testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
			} else {
				server = testenv.StartKnot(t, testenv.DNSOptions{SOAMinimum: 1})
			}
			r := newRotServe(t, bin, server, policy)
			r.start()
			msgs := r.relayDuring(50*time.Second, func() bool {
				st := r.status()
				for _, alg := range []rotation.Algorithm{rotation.RSA2048, rotation.Ed25519} {
					if selectorsActivated(st, alg) < tc.rotations+1 || destroyed(st, alg) < tc.rotations {
						return false
					}
				}
				return true
			})
			st := r.status()
			checkGrace(t, st, grace)
			// The messages were signed by every key set in turn.
			sets := map[string][]byte{}
			for _, m := range msgs {
				sels := slices.Clone(m.selectors)
				slices.Sort(sels)
				key := strings.Join(sels, ",")
				if _, ok := sets[key]; !ok {
					sets[key] = m.data
				}
			}
			if len(sets) < tc.rotations+1 {
				t.Errorf("messages were signed by %d key sets (%v), want at least %d", len(sets), slices.Collect(maps.Keys(sets)), tc.rotations+1)
			}
			if !strings.Contains(r.gw.logText(), "signing keys switched") {
				t.Error("serve did not log the switch of signing keys")
			}
			// The independent verifiers agree on one message per key set
			// that still verifies (whose records DNS still serves).
			for key, data := range sets {
				records := map[string]string{}
				ok := true
				var want []wantSig
				for _, sel := range strings.Split(key, ",") {
					name := hsm.RecordName(r.domain(), sel)
					vals, _ := r.srv.TXT(name)
					if len(vals) != 1 || vals[0] == rotation.RevokedRecord {
						ok = false
						break
					}
					records[name] = vals[0]
					alg := "rsa-sha256"
					if strings.HasPrefix(sel, "ed") {
						alg = "ed25519-sha256"
					}
					want = append(want, wantSig{r.domain(), sel, alg})
				}
				if ok {
					verifyIndependently(t, records, want, data)
				}
			}
		})
	}
}

// TestServeRotationKill9: `dkimgw serve` killed with SIGKILL in the
// middle of rotation passes, and started again, converges: one key per
// algorithm in the token and in the state, one record per selector.
func TestServeRotationKill9(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	r := newRotServe(t, bin, server, "{algorithms: [rsa-2048, ed25519], interval: 1h, ttl: 1, publisher: primary}")
	for _, to := range []string{"generated", "published"} {
		r.start()
		mark := 0
		r.gw.waitLog(mark, 30*time.Second, "a key "+to, func(l logLine) bool {
			return l.str("msg") == "key state changed" && l.str("to") == to
		})
		if err := r.gw.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		r.gw.waitExit(10 * time.Second)
	}
	r.start()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := r.status()
		if selectorsActivated(st, rotation.RSA2048) == 1 && selectorsActivated(st, rotation.Ed25519) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no active keys after the restarts: %+v", st)
		}
		time.Sleep(300 * time.Millisecond)
	}
	st := r.status()
	if len(st) != 2 {
		t.Errorf("the state has %d keys, want 2 (no duplicate after kill -9): %+v", len(st), st)
	}
	tok, err := hsm.Open(t.Context(), r.st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	infos, err := tok.Keys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 {
		t.Errorf("the token holds %d keys, want 2", len(infos))
	}
	for _, k := range st {
		if vals, _ := r.srv.TXT(hsm.RecordName(k.Domain, k.Selector)); len(vals) != 1 || vals[0] != k.Record {
			t.Errorf("%s: DNS serves %q", k.Selector, vals)
		}
	}
	res := sendDirect(t, r.gw.addr, "bounce@"+r.domain(), []string{"a@example.net"}, testMessage("news@"+r.domain(), "a@example.net", "after-kill@x", "after", "body\r\n"))
	if res.data != nil {
		t.Fatalf("send after the restarts: %v", res.data)
	}
	if _, sels, err := r.verifyLive(r.sink.Messages()[0].Data); err != nil || len(sels) != 2 {
		t.Fatalf("message after the restarts: %v, signed by %v", err, sels)
	}
}

// sendOne relays one message and returns the SMTP reply code (250 when
// relayed) and, when relayed, the selectors that signed it, after
// verifying it against DNS now.
func (r *rotServe) sendOne(id string) (int, []string) {
	r.t.Helper()
	msg := testMessage("news@"+r.domain(), "a@example.net", id, "msg "+id, "body of "+id+"\r\n")
	before := len(r.sink.Messages())
	res := sendDirect(r.t, r.gw.addr, "bounce@"+r.domain(), []string{"a@example.net"}, msg)
	if err := cmpErr(res.mail, res.data); err != nil {
		code, _, _ := smtpCode(err)
		return code, nil
	}
	got := r.sink.Messages()
	if len(got) != before+1 {
		r.t.Fatalf("message %s: the sink has %d messages, want %d", id, len(got), before+1)
	}
	_, sels, err := r.verifyLive(got[len(got)-1].Data)
	if err != nil {
		r.t.Fatalf("message %s: %v", id, err)
	}
	return 250, sels
}

// waitSigned sends until a message is relayed signed by n selectors.
func (r *rotServe) waitSigned(n int, timeout time.Duration) []string {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for i := 0; ; i++ {
		code, sels := r.sendOne(fmt.Sprintf("wait-%d-%d@x", n, i))
		if code == 250 && len(sels) == n {
			return sels
		}
		if code != 250 && code != 451 {
			r.t.Fatalf("reply %d while waiting for keys", code)
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("no message signed by %d keys within %v (last: %d %v)", n, timeout, code, sels)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestServeRotationSIGHUP: a reload with a changed rotation policy (a
// second algorithm) rebuilds the reconciler: the new algorithm's key is
// generated, published and signs, and mail never stops.
func TestServeRotationSIGHUP(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	r := newRotServe(t, bin, server, "{algorithms: [ed25519], interval: 1h, ttl: 1, publisher: primary}")
	r.start()
	first := r.waitSigned(1, 30*time.Second)
	mark := r.gw.mark()
	r.cfg.rotating[r.domain()] = "{algorithms: [ed25519, rsa-2048], interval: 1h, ttl: 1, publisher: primary}"
	r.gw.writeConfig(r.cfg)
	r.gw.signal(syscall.SIGHUP)
	r.gw.waitLog(mark, 30*time.Second, "configuration reloaded", func(l logLine) bool { return l.str("msg") == "configuration reloaded" })
	// Signed by ed25519 alone until the RSA key is active, then by both;
	// never refused.
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; ; i++ {
		code, sels := r.sendOne(fmt.Sprintf("after-hup-%d@x", i))
		if code != 250 {
			t.Fatalf("message after the reload: reply %d", code)
		}
		if !slices.Contains(sels, first[0]) {
			t.Fatalf("message after the reload signed by %v, not by the active %s", sels, first[0])
		}
		if len(sels) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the reloaded policy's RSA key never signed")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A bad rotation policy is refused; the running one goes on.
	mark = r.gw.mark()
	r.cfg.rotating[r.domain()] = "{algorithms: [ed25519], selector_template: \"{nope}\", publisher: primary}"
	r.gw.writeConfig(r.cfg)
	r.gw.signal(syscall.SIGHUP)
	l := r.gw.waitLog(mark, 30*time.Second, "reload refused", func(l logLine) bool { return l.str("msg") == "reload refused, the old configuration keeps serving" })
	if !strings.Contains(l.str("error"), "placeholder") {
		t.Errorf("refusal does not say why: %q", l.str("error"))
	}
	if code, sels := r.sendOne("after-bad-hup@x"); code != 250 || len(sels) != 2 {
		t.Errorf("after a refused reload: %d %v", code, sels)
	}
	r.gw.signal(syscall.SIGTERM)
	if code := r.gw.waitExit(30 * time.Second); code != 0 {
		t.Fatalf("serve exited %d", code)
	}
	checkServeAudit(t, r)
}

// checkServeAudit checks serve's audit log after TestServeRotationSIGHUP:
// the start and both reloads, every transition of both keys, the audit
// key generated on the first start, and a last checkpoint at shutdown
// that seals everything.
func checkServeAudit(t *testing.T, r *rotServe) {
	t.Helper()
	logPath := filepath.Join(r.dataDir, "audit.log")
	recs := readAudit(t, logPath)
	var events []string
	count := map[string]int{}
	for _, rec := range recs {
		if rec.Actor != "serve" {
			t.Errorf("record %d actor %q, want serve", rec.Seq, rec.Actor)
		}
		e := rec.Event
		if rec.Selector != "" {
			e += " " + rec.Selector
		}
		events = append(events, e)
		count[rec.Event]++
	}
	if recs[len(recs)-1].Event != audit.EventCheckpoint {
		t.Errorf("the last record is %q, not the shutdown checkpoint", recs[len(recs)-1].Event)
	}
	for ev, n := range map[string]int{
		audit.EventConfigLoaded: 2, audit.EventReloadRefused: 1,
		"key published": 2, "key visible": 2, "key active": 2, audit.EventKeyGenerated: 3,
	} {
		if count[ev] != n {
			t.Errorf("%d %q records, want %d; events:\n%s", count[ev], ev, n, strings.Join(events, "\n"))
		}
	}
	r2 := runCLI(t, map[string]string{hsmEnv: r.st.URIWithPINFile(t)}, "", "audit", "verify-log", "--path", logPath)
	if r2.code != 0 || strings.Contains(r2.stdout, "warning") {
		t.Errorf("verify-log of serve's log: exit %d\n%s%s", r2.code, r2.stdout, r2.stderr)
	}
}

// TestServeEmergencyRotation: `dkimgw rotate --emergency` from another
// process while serve relays: within about a second the compromised key
// signs no more (451 meanwhile), and the new key signs once DNS serves it.
func TestServeEmergencyRotation(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartKnot(t, testenv.DNSOptions{SOAMinimum: 1})
	r := newRotServe(t, bin, server, "{algorithms: [ed25519], interval: 1h, ttl: 2, publisher: primary}")
	// Slow passes, so that the new key is not active at once and the
	// switch seen comes from the state watch, not serve's own pass.
	r.cfg.extra = strings.Replace(r.cfg.extra, "check_every: 500ms", "check_every: 4s", 1)
	r.start()
	old := r.waitSigned(1, 30*time.Second)[0]
	res := runCLI(t, nil, "", "rotate", "--config", r.gw.config, "--domain", r.domain(), "--emergency")
	if res.code != 0 {
		t.Fatalf("rotate --emergency: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	time.Sleep(1500 * time.Millisecond)
	saw451, sawNew := false, false
	deadline := time.Now().Add(40 * time.Second)
	for i := 0; !sawNew; i++ {
		code, sels := r.sendOne(fmt.Sprintf("emergency-%d@x", i))
		switch {
		case code == 451:
			saw451 = true
		case code == 250 && slices.Contains(sels, old):
			t.Fatalf("message %d signed by the compromised key %s after the emergency rotation", i, old)
		case code == 250:
			sawNew = true
		default:
			t.Fatalf("reply %d", code)
		}
		if time.Now().After(deadline) {
			t.Fatal("the replacement key never signed")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !saw451 {
		t.Log("the replacement was active before the first message after the emergency (no 451 seen)")
	}
	if vals, _ := r.srv.TXT(hsm.RecordName(r.domain(), old)); len(vals) != 1 || vals[0] != rotation.RevokedRecord {
		t.Errorf("the compromised selector's record is %q, want revoked", vals)
	}
}
