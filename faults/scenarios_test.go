package faults

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// longForm: DKIMGW_FAULTS=long (make test-faults) runs every scenario
// with 2,000 messages or more; otherwise each runs a short form that
// `go test ./...` can afford.
func longForm() bool { return os.Getenv("DKIMGW_FAULTS") == "long" }

// scenario is one fault, injected while the load runs.
type scenario struct {
	name  string
	title string // for the table
	about string // what is done, for docs/reliability.md
	// token: the gateway reaches SoftHSM through the fault shim.
	token bool
	// upstreamTimeout is upstream.timeout and connect_timeout (default 30s).
	upstreamTimeout time.Duration
	sessions        int // default 20
	n               func(long bool) int
	attempts        int // per message; default 3
	connErrAt       map[stage]bool
	// wrap runs the gateway under a command (setpriv).
	wrap []string
	// rotation: the domain rotates its keys every rotateEvery against
	// BIND (instead of the fixed selectors rsa1 and ed1).
	rotation    bool
	rotateEvery time.Duration
	// rate paces the load at this many messages a second (0: as fast as
	// the sessions go), so that a run lasts long enough for its fault.
	rate float64
	// drive injects the fault while the load runs; it returns when the
	// fault is over (the load may still run).
	drive func(r *run)
	// after checks that the fault was really hit, and what else the
	// scenario promises.
	after func(r *run, res *result)
}

// run is one scenario's moving parts.
type run struct {
	t       *testing.T
	ctx     context.Context
	sink    *testenv.FaultSink
	tok     *testenv.SoftHSMToken
	shim    *testenv.PKCS11Fault // nil without token
	rot     *rotationRun         // nil without rotation
	gw      *gateway
	cur     atomic.Pointer[proc]
	load    *load
	loadEnd chan struct{}
	// loadStart and loadStop are when the load ran.
	loadStart, loadStop time.Time
	// faultEnd is when the last fault was lifted: mail must flow after it.
	faultEnd time.Time
	hits     int
	note     string
	// passes counts the `dkimgw rotate` runs of the rotation scenario.
	passes int
}

// at waits until a fraction of the messages are done; false when the load
// ended or the context did first.
func (r *run) at(frac float64) bool {
	for r.load.progress() < frac {
		select {
		case <-r.loadEnd:
			return false
		case <-r.ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	return true
}

// window waits d, or until a fraction upto of the messages are done,
// whichever comes first: a fault lasts long enough to bite, and never
// eats the whole run.
func (r *run) window(d time.Duration, upto float64) {
	end := time.Now().Add(d)
	for time.Now().Before(end) && r.load.progress() < upto {
		select {
		case <-r.loadEnd:
			return
		case <-r.ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (r *run) lifted() { r.faultEnd = time.Now() }

// sinkFault is the drive of the upstream scenarios: from a quarter of the
// run, the sink shows fault for d or until progress upto, then recovers.
func sinkFault(fault testenv.UpstreamFault, d time.Duration, upto float64) func(*run) {
	return func(r *run) {
		if !r.at(0.25) {
			return
		}
		r.sink.SetFault(fault)
		r.window(d, upto)
		r.sink.SetFault(testenv.UpstreamOK)
		r.lifted()
	}
}

// mustHit fails the run when its fault was never hit: such a run proves
// nothing.
func (r *run) mustHit(what string, n int) {
	r.t.Helper()
	r.hits = n
	if n == 0 {
		r.t.Errorf("the fault (%s) was never hit: this run proves nothing", what)
	}
}

func (r *run) mustTempFail(res *result) {
	r.t.Helper()
	if res.tempFail == 0 && res.retries == 0 {
		r.t.Errorf("no message was deferred (4xx) during the fault: it did not reach the client")
	}
}

// longShort is long in the long form and short in the short one.
func longShort(long, short time.Duration) time.Duration {
	if longForm() {
		return long
	}
	return short
}

func allStages() map[stage]bool {
	return map[stage]bool{stageDial: true, stageMail: true, stageLater: true}
}

func count(n int) func(bool) int {
	return func(long bool) int {
		if long {
			return max(2000, n)
		}
		return n
	}
}

var scenarios = []scenario{
	{
		name: "upstream-restart", title: "upstream killed and restarted",
		about: "The upstream MTA is killed (listener and every connection closed at once) and restarted on the same address after 300 ms, three times during the run.",
		n:     count(100),
		drive: func(r *run) {
			for _, at := range []float64{0.2, 0.45, 0.7} {
				if !r.at(at) {
					return
				}
				r.sink.Stop()
				time.Sleep(300 * time.Millisecond)
				r.sink.Start()
				r.hits++
			}
			r.lifted()
		},
		after: func(r *run, res *result) { r.mustHit("upstream killed", r.hits) },
	},
	{
		name: "upstream-refuses", title: "upstream refuses connections",
		about: "The upstream's listener is closed for 2 s (or a third of the run): every connection to it is refused; then it listens again.",
		n:     count(100),
		drive: func(r *run) {
			if !r.at(0.25) {
				return
			}
			r.sink.Stop()
			r.window(2*time.Second, 0.6)
			r.sink.Start()
			r.lifted()
		},
		after: func(r *run, res *result) { r.mustHit("connections refused", 1); r.mustTempFail(res) },
	},
	{
		name: "upstream-421", title: "upstream answers 421",
		about: "For 2 s (or a third of the run) the upstream greets new connections with 421 and answers MAIL FROM on open ones with 421, closing them.",
		n:     count(100),
		drive: sinkFault(testenv.Upstream421, 2*time.Second, 0.6),
		after: func(r *run, res *result) { r.mustHit("421", r.sink.Faulted()); r.mustTempFail(res) },
	},
	{
		name: "upstream-stall", title: "upstream stalls past the timeout",
		about: "For 7 s (4 s in the short form) the upstream reads nothing: no greeting on new connections, and a message in DATA is left unread. upstream.timeout is 2 s, so the gateway gives up on it first.",
		n:     count(100), upstreamTimeout: 2 * time.Second,
		drive: sinkFault(testenv.UpstreamStall, longShort(7*time.Second, 4*time.Second), 0.75),
		after: func(r *run, res *result) { r.mustHit("stall", r.sink.Faulted()); r.mustTempFail(res) },
	},
	{
		name: "upstream-drop-data", title: "upstream drops the connection in DATA",
		about: "For 2 s (or a third of the run) the upstream reads the first bytes of each message and closes the connection.",
		n:     count(100),
		drive: sinkFault(testenv.UpstreamDropMidData, 2*time.Second, 0.6),
		after: func(r *run, res *result) { r.mustHit("drop in DATA", r.sink.Faulted()); r.mustTempFail(res) },
	},
	{
		name: "upstream-drop-dot", title: "upstream drops the connection after the final dot",
		about: "For 2 s (or a third of the run) the upstream reads and keeps each whole message, then closes the connection without replying. The gateway cannot know the message arrived and defers it; the client's retry makes a duplicate (RFC 1047).",
		n:     count(100),
		drive: sinkFault(testenv.UpstreamDropAfterDot, 2*time.Second, 0.6),
		after: func(r *run, res *result) { r.mustHit("drop after dot", r.sink.Faulted()); r.mustTempFail(res) },
	},
	{
		name: "token-sessions-closed", title: "token: every session closed",
		about: "Every 300 ms, from a tenth to four fifths of the run, the PKCS#11 shim closes every session of the token (C_CloseAllSessions) behind the gateway's back: it is logged out and every handle it holds is void.",
		token: true, n: count(100),
		drive: func(r *run) {
			if !r.at(0.1) {
				return
			}
			for i := 0; i < 40 && r.load.progress() < 0.8; i++ {
				r.shim.CloseAllSessions(r.t)
				r.window(300*time.Millisecond, 0.8)
			}
			r.lifted()
		},
		after: func(r *run, res *result) { r.mustHit("sessions closed", r.shim.Injected("close_all")) },
	},
	{
		name: "token-device-errors", title: "token: device errors, then recovery",
		about: "The shim fails every token call with CKR_DEVICE_ERROR for 1.5 s, then with CKR_DEVICE_REMOVED for 1.5 s, then C_SignInit and C_Sign with CKR_SESSION_HANDLE_INVALID for 1.5 s, starting at a fifth, two fifths and three fifths of the run (each also ends when a further tenth of the messages is done), and lets calls through again after each.",
		token: true, n: count(100),
		drive: func(r *run) {
			steps := []struct {
				at   float64
				spec testenv.PKCS11FaultSpec
			}{
				{0.2, testenv.PKCS11FaultSpec{Error: testenv.CKRDeviceError, ErrorOps: []string{"all"}}},
				{0.4, testenv.PKCS11FaultSpec{Error: testenv.CKRDeviceRemoved, ErrorOps: []string{"all"}}},
				{0.6, testenv.PKCS11FaultSpec{Error: testenv.CKRSessionHandleInvalid, ErrorOps: []string{"C_SignInit", "C_Sign"}}},
			}
			for _, s := range steps {
				if !r.at(s.at) {
					break
				}
				r.shim.Set(r.t, s.spec)
				r.window(1500*time.Millisecond, s.at+0.1)
				// Lifted between the steps: each is a fault "for a while",
				// followed by recovery.
				r.shim.Set(r.t, testenv.PKCS11FaultSpec{})
				r.lifted()
			}
		},
		after: func(r *run, res *result) { r.mustHit("device errors", r.shim.Injected("error")); r.mustTempFail(res) },
	},
	{
		name: "token-hang", title: "token: C_Sign hangs for seconds",
		about: "Every C_Sign waits before it reaches SoftHSM: in the long form 40 s for 45 s, longer than the gateway's deadline for signing a message (30 s), so messages are deferred; in the short form 3 s for 4 s, so they are only late.",
		token: true, n: count(100),
		drive: func(r *run) {
			if !r.at(0.25) {
				return
			}
			hang, span := 3*time.Second, 4*time.Second
			if longForm() {
				hang, span = 40*time.Second, 45*time.Second
			}
			r.shim.Set(r.t, testenv.PKCS11FaultSpec{Hang: hang, HangOps: []string{"C_Sign"}})
			r.window(span, 0.75)
			r.shim.Set(r.t, testenv.PKCS11FaultSpec{})
			r.lifted()
		},
		after: func(r *run, res *result) {
			r.mustHit("hung C_Sign", r.shim.Injected("hang"))
			if longForm() {
				r.mustTempFail(res)
			}
		},
	},
	{
		name: "token-dir-unreadable", title: "token directory unreadable, then restored",
		about: "The token's directory in SoftHSM's store is made unreadable (chmod 000) for 2 s, then restored. The gateway runs without CAP_DAC_OVERRIDE (setpriv), so that the mode binds it even as root.",
		token: true, n: count(100),
		wrap: []string{"setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--"},
		drive: func(r *run) {
			dir := r.tok.Dir()
			if dir == "" {
				r.t.Errorf("the token's directory is not found")
				return
			}
			st, err := os.Stat(dir)
			if err != nil {
				r.t.Error(err)
				return
			}
			if !r.at(0.25) {
				return
			}
			if err := os.Chmod(dir, 0); err != nil {
				r.t.Error(err)
				return
			}
			r.hits++
			r.window(2*time.Second, 0.6)
			if err := os.Chmod(dir, st.Mode().Perm()); err != nil {
				r.t.Error(err)
			}
			r.lifted()
		},
		after: func(r *run, res *result) {
			r.mustHit("directory unreadable", r.hits)
			if res.tempFail == 0 && res.retries == 0 {
				r.note = "SoftHSM went on signing from memory: no message was deferred"
			}
		},
	},
	{
		name: "gateway-kill9", title: "dkimgw killed (SIGKILL) and restarted",
		about: "dkimgw is killed with SIGKILL mid-run, twice, and started again on the same address at once; clients see their connections break and retry (up to 10 times).",
		n:     count(100), connErrAt: allStages(), attempts: 10,
		drive: func(r *run) {
			for _, at := range []float64{0.3, 0.6} {
				if !r.at(at) {
					return
				}
				p := r.cur.Load()
				p.signal(r.t, syscall.SIGKILL)
				p.waitExit(r.t, 30*time.Second)
				r.hits++
				r.cur.Store(r.gw.start())
			}
			r.lifted()
		},
		after: func(r *run, res *result) {
			r.mustHit("SIGKILL", r.hits)
			broken := 0
			for i := range r.load.recs {
				for _, a := range r.load.recs[i].attempts {
					if a.code == 0 && a.stage == stageLater {
						broken++
					}
				}
			}
			if broken == 0 {
				r.note = "no transaction was caught mid-flight by the kill"
			}
		},
	},
	{
		name: "gateway-sighup", title: "SIGHUP every 100 ms",
		about: "dkimgw is sent SIGHUP (reload the configuration, re-read the PIN) every 100 ms for the whole run.",
		n:     count(100),
		drive: func(r *run) {
			for r.hits < 100000 {
				select {
				case <-r.loadEnd:
					r.lifted()
					return
				case <-r.ctx.Done():
					return
				case <-time.After(100 * time.Millisecond):
				}
				r.cur.Load().signal(r.t, syscall.SIGHUP)
				r.hits++
			}
		},
		after: func(r *run, res *result) {
			r.mustHit("SIGHUP", r.hits)
			if refused := r.cur.Load().logged("reload refused, the old configuration keeps serving"); len(refused) > 0 {
				r.t.Errorf("%d reloads of an unchanged configuration were refused: %v", len(refused), refused[0])
			}
		},
	},
	{
		name: "gateway-sigterm", title: "SIGTERM with 100 transactions in flight",
		about: "120 sessions, an upstream that takes 2 s to answer each message; when 100 messages are in the upstream's hands, dkimgw gets SIGTERM. It must finish them (250) and exit 0, answering new transactions 421 and refusing new connections meanwhile; then the upstream answers at once, dkimgw is started again and the run goes on (clients retry up to 10 times).",
		n:     count(250), attempts: 10,
		sessions: 120, connErrAt: map[stage]bool{stageDial: true, stageMail: true},
		drive: func(r *run) {
			r.sink.DelayData(2 * time.Second)
			deadline := time.Now().Add(60 * time.Second)
			for r.sink.InData() < 100 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			inFlight := r.sink.InData()
			if inFlight < 100 {
				r.t.Errorf("only %d transactions in flight after 60s, want 100", inFlight)
			}
			p := r.cur.Load()
			p.signal(r.t, syscall.SIGTERM)
			r.hits = inFlight
			if code := p.waitExit(r.t, 90*time.Second); code != 0 {
				r.t.Errorf("dkimgw serve exited %d after SIGTERM, want 0", code)
			}
			r.sink.DelayData(0)
			r.cur.Store(r.gw.start())
			r.lifted()
		},
		after: func(r *run, res *result) {
			r.mustHit("transactions in flight", r.hits)
			if res.deliveredUnaccepted > 0 {
				r.t.Errorf("%d messages reached the upstream but their client got no 250: SIGTERM cut them short", res.deliveredUnaccepted)
			}
		},
	},
	{
		name: "rotation", title: "a key rotation every few seconds",
		about:    "The domain's keys (RSA-2048 and Ed25519) rotate every 2 s (a rotation takes a second or two more: the new record must be seen in DNS first): serve generates each new key in the token, publishes its record in BIND by dynamic update (TSIG), switches to it once BIND serves it, and keeps the old record published (grace 10 min, longer than the run); meanwhile `dkimgw rotate` runs a pass of its own every 3 s from another process, as a cron job would, contending for the rotation state; the load is paced at 20 messages a second so that the run spans several rotations. Every message is verified against the records BIND serves at the end, and must carry a t= no earlier than serve's switch to the keys that signed it; the audit log serve and the passes wrote side by side must verify (`dkimgw audit verify-log`).",
		rotation: true, rotateEvery: 2 * time.Second, rate: 20, n: count(300),
		drive: func(r *run) { r.rotatePasses(3 * time.Second) },
		after: func(r *run, res *result) {
			if r.passes == 0 {
				r.t.Errorf("no `dkimgw rotate` pass ran during the load")
			}
			r.verifyAuditLog()
			switches := keySwitches(r.gw)
			during := 0
			for _, s := range switches {
				if s.at.After(r.loadStart) && s.at.Before(r.loadStop) {
					during++
				}
			}
			r.mustHit("key rotations during the load", during)
			if during < 2 {
				r.t.Errorf("%d key rotations during the load, want at least 2", during)
			}
			sets := checkSignedAfterSwitch(r.t, switches, r.sink.Messages())
			if sets < 3 {
				r.t.Errorf("the messages were signed by %d key sets, want at least 3: the rotations did not happen under load", sets)
			}
			r.note = fmt.Sprintf("%d rotations during the load, %.0f s, and %d `dkimgw rotate` passes; the messages were signed by %d key sets", during, r.loadStop.Sub(r.loadStart).Seconds(), r.passes, sets)
		},
	},
}

// TestFaults runs every scenario: go test ./faults -run 'TestFaults/NAME'
// runs one.
func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("the fault suite runs the real gateway with SoftHSM; not in -short")
	}
	testenv.Require(t, "softhsm2-util", testenv.SoftHSMModule, "cc", "setpriv", "named")
	bin := buildDkimgw(t, t.TempDir())
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) { runScenario(t, bin, sc) })
	}
}

func runScenario(t *testing.T, bin string, sc scenario) {
	long := longForm()
	start := time.Now()
	st := testenv.SoftHSM(t)
	var records map[string]string
	if !sc.rotation {
		records = makeKeys(t, st)
	}
	sink := testenv.NewFaultSink(t)
	r := &run{t: t, ctx: t.Context(), sink: sink, tok: st, loadEnd: make(chan struct{})}
	uri := st.URIWithPINFile(t)
	var env []string
	if sc.token {
		r.shim = testenv.NewPKCS11Fault(t)
		uri = r.shim.URI(uri)
		env = r.shim.Env()
	}
	timeout := sc.upstreamTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	addr := freeAddr(t)
	cfg := gwConfig{uri: uri, upstream: sink.Addr(), listen: addr, upstreamTimeout: timeout, grace: 60 * time.Second}
	if sc.rotation {
		r.rot = startRotation(t, &cfg, sc.rotateEvery, 10*time.Minute)
	}
	r.gw = newGateway(t, bin, cfg, env, sc.wrap)
	r.cur.Store(r.gw.start())
	if r.rot != nil {
		r.rot.waitActive(t, r.gw)
	}

	sessions := sc.sessions
	if sessions == 0 {
		sessions = 20
	}
	n := sc.n(long)
	deadline := 3 * time.Minute
	if long {
		deadline = 20 * time.Minute
	}
	r.load = newLoad(loadSpec{scenario: sc.name, addr: addr, n: n, sessions: sessions, attempts: sc.attempts, deadline: deadline, rate: sc.rate})
	driven := make(chan struct{})
	go func() {
		defer close(driven)
		sc.drive(r)
	}()
	r.loadStart = time.Now()
	r.load.run(t.Context())
	r.loadStop = time.Now()
	close(r.loadEnd)
	<-driven

	if r.rot != nil {
		records = r.rot.published(t, r.gw)
	}
	res := check(t, r.load, sink.Messages(), records, checkOptions{connErrAt: sc.connErrAt})
	res.seconds = time.Since(start).Seconds()
	if !r.faultEnd.IsZero() && r.load.attemptsSince(r.faultEnd) > 0 && r.load.acceptedSince(r.faultEnd) == 0 {
		t.Errorf("no message was accepted after the fault was lifted: the gateway did not recover")
	}
	if res.sent == 0 || res.accepted == 0 {
		t.Errorf("%d messages sent, %d accepted: the run did not run", res.sent, res.accepted)
	}
	sc.after(r, &res)
	res.faultHits = r.hits
	if !r.faultEnd.IsZero() {
		res.lastFailAfter = r.load.lastFailureAfter(r.faultEnd).Seconds()
	}
	res.passed = !t.Failed()
	t.Logf("%s: sent %d, accepted %d, 4xx %d, 5xx %d, conn err %d, unsent %d, retries %d, delivered %d, duplicates %d, delivered unaccepted %d, unsigned %d, lost %d, fault hits %d, last failure %.1fs after the fault, %.1fs %s",
		sc.name, res.sent, res.accepted, res.tempFail, res.permFail, res.connErr, res.unsent, res.retries, res.delivered, res.duplicates, res.deliveredUnaccepted, res.unsigned, res.lost, res.faultHits, res.lastFailAfter, res.seconds, r.note)
	report(t, sc, res, r.note)
}

// makeKeys generates the gateway's keys (example.com: rsa1 RSA-2048 and
// ed1 Ed25519) through SoftHSM directly, and returns their DNS records.
func makeKeys(t *testing.T, st *testenv.SoftHSMToken) map[string]string {
	t.Helper()
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	records := map[string]string{}
	for _, k := range []struct {
		sel string
		alg hsm.Algorithm
	}{{"rsa1", hsm.RSA2048}, {"ed1", hsm.Ed25519}} {
		key, err := tok.GenerateKey(t.Context(), "example.com", k.sel, k.alg)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := hsm.TXTRecord(key.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[hsm.RecordName("example.com", k.sel)] = rec
	}
	return records
}
