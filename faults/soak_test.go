package faults

// The soak (`make soak`, not in CI): the real gateway under a steady
// load for minutes, its keys rotating every minute and a SIGHUP every
// 30 s, its goroutines, file descriptors, memory and token sessions
// sampled from its admin listener; they must stay flat.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

const (
	// soakEnv turns the soak on; soakDurationEnv sets its length
	// (default soakDefault); soakReportEnv names the file its section
	// goes to (make soak: docs/reliability.md).
	soakEnv         = "DKIMGW_SOAK"
	soakDurationEnv = "SOAK_DURATION"
	soakReportEnv   = "DKIMGW_SOAK_REPORT"
	soakDefault     = 10 * time.Minute

	soakRate     = 20 // messages a second
	soakSessions = 10
	soakRotate   = time.Minute
	soakHUP      = 30 * time.Second
	soakSample   = 10 * time.Second
)

// sample is one reading of the gateway's /metrics and of the shim.
type sample struct {
	at                  time.Duration // since the load started
	goroutines, fds     float64
	rssBytes            float64
	sessions            float64 // token pool sessions open (in use + idle)
	moduleSessions      float64 // sessions open in SoftHSM, as the shim counts them
	accepted, rotations int
	reloads             int
}

// series is one quantity that must stay flat, and its rule: the largest
// value of the last third of the samples may exceed the largest of the
// first third by factor, plus slack. The first third holds the warm-up
// (heap growth to its working size, pools filling); a leak grows without
// bound and shows in the last third.
type series struct {
	name   string
	unit   string
	value  func(sample) float64
	factor float64
	slack  float64
	// bound, when not 0, is the limit instead: the series may grow to
	// it, never past it (a pool's size).
	bound float64
}

var soakSeries = []series{
	// A trial soak measured about 30 goroutines, 24 descriptors, 28 MiB
	// and 2 sessions once warm, varying by a few: the slack covers that
	// noise, and a leak of one goroutine or descriptor per reload (20 in
	// 10 minutes) still breaks the rule.
	{name: "goroutines", value: func(s sample) float64 { return s.goroutines }, factor: 1.1, slack: 8},
	{name: "open file descriptors", value: func(s sample) float64 { return s.fds }, factor: 1.1, slack: 8},
	{name: "resident memory", unit: "MiB", value: func(s sample) float64 { return s.rssBytes / (1 << 20) }, factor: 1.1, slack: 16},
	// The pool keeps the sessions it opened for a peak (a key generated
	// at a rotation holds one while mail is signed): it may grow up to
	// max-sessions, never past it. A leak is a session outside the pool:
	// SoftHSM's count beyond the pool's (the one session kept logged in)
	// must stay flat.
	{name: "token pool sessions", value: func(s sample) float64 { return s.sessions }, bound: hsm.DefaultMaxSessions},
	{name: "sessions in SoftHSM beyond the pool", value: func(s sample) float64 { return s.moduleSessions - s.sessions }, factor: 1.1, slack: 1},
}

// verdict is a series judged over the samples.
type verdict struct {
	s                  series
	firstMax, lastMax  float64
	limit              float64
	flat               bool
	firstN, lastN, all int
}

// judge applies s's rule to the samples; fewer than 3 samples cannot be
// judged (not flat).
func judge(s series, samples []sample) verdict {
	v := verdict{s: s, all: len(samples)}
	k := len(samples) / 3
	if k == 0 {
		return v
	}
	v.firstN, v.lastN = k, k
	for i, x := range samples {
		val := s.value(x)
		if i < k {
			v.firstMax = max(v.firstMax, val)
		}
		if i >= len(samples)-k {
			v.lastMax = max(v.lastMax, val)
		}
	}
	v.limit = v.firstMax*s.factor + s.slack
	if s.bound > 0 {
		v.limit = s.bound
		for _, x := range samples {
			v.lastMax = max(v.lastMax, s.value(x))
		}
	}
	v.flat = v.lastMax <= v.limit
	return v
}

func soakDuration(t *testing.T) time.Duration {
	t.Helper()
	v := os.Getenv(soakDurationEnv)
	if v == "" {
		return soakDefault
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Minute {
		t.Fatalf("%s=%q: want a duration of a minute or more (e.g. 1m, 10m)", soakDurationEnv, v)
	}
	return d
}

// TestSoak is `make soak`: SOAK_DURATION (10m) at soakRate messages a
// second, a key rotation every minute, a SIGHUP every 30 s; the series
// must be flat, nothing lost, nothing unsigned.
func TestSoak(t *testing.T) {
	if os.Getenv(soakEnv) == "" {
		t.Skipf("the soak runs for minutes: make soak (%s=1, %s=10m)", soakEnv, soakDurationEnv)
	}
	testenv.Require(t, "softhsm2-util", testenv.SoftHSMModule, "named", "cc")
	dur := soakDuration(t)
	if dl, ok := t.Deadline(); ok && time.Until(dl) < dur+5*time.Minute {
		t.Fatalf("go test's -timeout leaves %v, the soak needs %v and 5 minutes to set up and check", time.Until(dl).Round(time.Second), dur)
	}
	start := time.Now()
	// Without the race detector: the memory measured is the product's.
	bin := buildDkimgwWith(t, t.TempDir())
	st := testenv.SoftHSM(t)
	// The gateway reaches SoftHSM through the shim, injecting nothing: its
	// count of open sessions covers every session of the process, not
	// only the pool's that /metrics shows.
	shim := testenv.NewPKCS11Fault(t)
	sink := testenv.NewFaultSink(t)
	addr := freeAddr(t)
	cfg := gwConfig{uri: shim.URI(st.URIWithPINFile(t)), upstream: sink.Addr(), listen: addr, upstreamTimeout: 30 * time.Second, grace: 60 * time.Second}
	// The grace period outlasts the soak: every record that signed is
	// still published at the end, when the messages are verified.
	rot := startRotation(t, &cfg, soakRotate, dur+10*time.Minute)
	gw := newGateway(t, bin, cfg, shim.Env(), nil)
	p := gw.start()
	rot.waitActive(t, gw)
	admin := adminAddr(t, p)

	n := int(soakRate * dur.Seconds())
	l := newLoad(loadSpec{scenario: "soak", addr: addr, n: n, sessions: soakSessions, attempts: 3, deadline: dur + 3*time.Minute, rate: soakRate})
	ctx, cancel := context.WithCancel(t.Context())
	var (
		mu      sync.Mutex
		samples []sample
		hups    int
		errs    []string
		wg      sync.WaitGroup
	)
	loadStart := time.Now()
	take := func() {
		s, err := scrape(admin)
		if err == nil {
			var n int
			n, err = shim.Sessions()
			s.moduleSessions = float64(n)
		}
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			errs = append(errs, err.Error())
			return
		}
		s.at = time.Since(loadStart).Round(time.Second)
		s.accepted = len(l.acceptedSinceTimes(loadStart))
		for _, sw := range keySwitches(gw) {
			if sw.at.After(loadStart) {
				s.rotations++
			}
		}
		s.reloads = len(p.logged("configuration reloaded"))
		samples = append(samples, s)
		t.Logf("soak %4.0fs: goroutines %.0f, fds %.0f, RSS %.1f MiB, token sessions %.0f (SoftHSM %.0f), accepted %d, rotations %d, reloads %d",
			s.at.Seconds(), s.goroutines, s.fds, s.rssBytes/(1<<20), s.sessions, s.moduleSessions, s.accepted, s.rotations, s.reloads)
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(soakSample)
		defer tk.Stop()
		take()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				take()
			}
		}
	}()
	go func() {
		defer wg.Done()
		tk := time.NewTicker(soakHUP)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				p.signal(t, syscall.SIGHUP)
				mu.Lock()
				hups++
				mu.Unlock()
			}
		}
	}()
	l.run(t.Context())
	loadTime := time.Since(loadStart)
	cancel()
	wg.Wait()

	if p.exited() {
		t.Fatalf("dkimgw serve exited during the soak (status %d)", p.status())
	}
	if len(errs) > 0 {
		t.Errorf("%d scrapes of /metrics failed; the first: %s", len(errs), errs[0])
	}
	if refused := p.logged("reload refused, the old configuration keeps serving"); len(refused) > 0 {
		t.Errorf("%d reloads of an unchanged configuration were refused: %v", len(refused), refused[0])
	}
	// The last SIGHUP may be in flight when the load ends.
	if got := len(p.logged("configuration reloaded")); got < hups-1 || hups == 0 {
		t.Errorf("%d SIGHUPs sent, %d reloads logged", hups, got)
	}
	switches := keySwitches(gw)
	rotations := 0
	for _, s := range switches {
		if s.at.After(loadStart) {
			rotations++
		}
	}
	// One a minute, each a few seconds late (the new record must be seen
	// in DNS first): two thirds of the minutes is a safe floor.
	if want := int(loadTime/soakRotate) * 2 / 3; rotations < want {
		t.Errorf("%d key rotations in %v, want at least %d (one a minute)", rotations, loadTime.Round(time.Second), want)
	}
	records := rot.published(t, gw)
	res := check(t, l, sink.Messages(), records, checkOptions{})
	sets := checkSignedAfterSwitch(t, switches, sink.Messages())
	if res.accepted < n*9/10 {
		t.Errorf("%d of %d messages accepted: the gateway did not keep up with a steady %d a second", res.accepted, n, soakRate)
	}
	var verdicts []verdict
	for _, s := range soakSeries {
		v := judge(s, samples)
		verdicts = append(verdicts, v)
		if !v.flat {
			t.Errorf("%s not flat: the last third's largest sample %.1f exceeds the first third's %.1f × %.1f + %.0f = %.1f (%d samples)",
				s.name, v.lastMax, v.firstMax, s.factor, s.slack, v.limit, v.all)
		}
	}
	res.seconds = time.Since(start).Seconds()
	res.passed = !t.Failed()
	t.Logf("soak: %v, sent %d, accepted %d, delivered %d, duplicates %d, unsigned %d, lost %d, 4xx %d, rotations %d, key sets %d, SIGHUPs %d",
		loadTime.Round(time.Second), res.sent, res.accepted, res.delivered, res.duplicates, res.unsigned, res.lost, res.tempFail, rotations, sets, hups)
	if path := os.Getenv(soakReportEnv); path != "" {
		rep := soakReport{dur: dur, loadTime: loadTime, res: res, verdicts: verdicts, samples: samples, rotations: rotations, sets: sets, hups: hups}
		prev, err := os.ReadFile(path)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, withSoakSection(prev, rep.render()), 0o644); err != nil {
			t.Errorf("write %s: %v", path, err)
		}
	}
}

// acceptedSinceTimes lists the 250s after t.
func (l *load) acceptedSinceTimes(t time.Time) []time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []time.Time
	for _, a := range l.acceptedAt {
		if a.After(t) {
			out = append(out, a)
		}
	}
	return out
}

// adminAddr is where p's admin listener listens (its log says).
func adminAddr(t *testing.T, p *proc) string {
	t.Helper()
	for _, l := range p.logged("admin listener serving /metrics, /healthz, /readyz") {
		if a, ok := l["admin_listen"].(string); ok && a != "" {
			return a
		}
	}
	t.Fatalf("dkimgw serve did not log its admin listener:\n%s", p.logText())
	return ""
}

// scrape reads the sampled series from the admin listener's /metrics
// (the Prometheus text format: "name{labels} value").
func scrape(admin string) (sample, error) {
	var s sample
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + admin + "/metrics")
	if err != nil {
		return s, fmt.Errorf("scrape /metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("scrape /metrics: %s", resp.Status)
	}
	found := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		name, val := line[:i], line[i+1:]
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_goroutines":
			s.goroutines = v
		case "process_open_fds":
			s.fds = v
		case "process_resident_memory_bytes":
			s.rssBytes = v
		case `dkimgw_token_sessions{state="in_use"}`, `dkimgw_token_sessions{state="idle"}`:
			s.sessions += v
		default:
			continue
		}
		found[strings.SplitN(name, "{", 2)[0]] = true
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("read /metrics: %w", err)
	}
	for _, want := range []string{"go_goroutines", "process_open_fds", "process_resident_memory_bytes", "dkimgw_token_sessions"} {
		if !found[want] {
			return s, fmt.Errorf("/metrics has no %s", want)
		}
	}
	return s, nil
}

// ruleText states the rule of every series.
func ruleText() string {
	var parts []string
	for _, s := range soakSeries {
		unit := ""
		if s.unit != "" {
			unit = " " + s.unit
		}
		if s.bound > 0 {
			parts = append(parts, fmt.Sprintf("%s: at most %.0f (max-sessions) in every sample", s.name, s.bound))
			continue
		}
		parts = append(parts, fmt.Sprintf("%s × %.1f + %.0f%s", s.name, s.factor, s.slack, unit))
	}
	return strings.Join(parts, "; ")
}

// soakReport is the soak's section of docs/reliability.md.
type soakReport struct {
	dur, loadTime         time.Duration
	res                   result
	verdicts              []verdict
	samples               []sample
	rotations, sets, hups int
}

func (r soakReport) render() []byte {
	var b bytes.Buffer
	b.WriteString(soakBegin + "\n\n## Soak\n\n")
	cmd := os.Getenv("DKIMGW_SOAK_COMMAND")
	if cmd == "" {
		cmd = fmt.Sprintf("%s=1 %s=%s go test -run TestSoak ./faults", soakEnv, soakDurationEnv, r.dur)
	}
	fmt.Fprintf(&b, "The soak runs the real `dkimgw serve` (built without the race detector, so that the memory measured is the product's) "+
		"for a while at a steady load: %d messages a second over %d SMTP sessions to a recording upstream, the domain's keys "+
		"(RSA-2048 and Ed25519) rotating every minute against BIND, and a SIGHUP every 30 s. Every 10 s it reads the gateway's "+
		"admin listener (`/metrics`): goroutines (`go_goroutines`), open file descriptors (`process_open_fds`), resident memory "+
		"(`process_resident_memory_bytes`) and the token's pool sessions (`dkimgw_token_sessions`, in use and idle); "+
		"and the sessions the process has open in SoftHSM, counted by the PKCS#11 shim the gateway loads in front of it "+
		"(injecting nothing), which sees every session, the pool's or not. "+
		"A series is flat when the largest sample of the last third of the run is at most the largest of the first third "+
		"times a factor plus a small constant (the limit column below: %s): the first third holds the warm-up, "+
		"and a leak grows without bound. At the end every message is checked as in the fault table above: accepted ones "+
		"reached the upstream, signed and verifying against the records BIND serves (the grace period outlasts the soak), "+
		"none signed before serve switched to its keys.\n\n", soakRate, soakSessions, ruleText())
	fmt.Fprintf(&b, "- Command: `%s` (SOAK_DURATION=%s)\n", cmd, r.dur)
	fmt.Fprintf(&b, "- Date: %s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "- Machine: %s\n", machine())
	verdict := "**flat**: pass"
	if !r.res.passed {
		verdict = "**FAIL**"
	}
	fmt.Fprintf(&b, "- Load: %s; sent %d, accepted %d, deferred 4xx %d, delivered %d, duplicates %d, unsigned %d, lost %d\n",
		r.loadTime.Round(time.Second), r.res.sent, r.res.accepted, r.res.tempFail, r.res.delivered, r.res.duplicates, r.res.unsigned, r.res.lost)
	fmt.Fprintf(&b, "- Key rotations during the load: %d (messages signed by %d key sets); SIGHUPs: %d\n", r.rotations, r.sets, r.hups)
	fmt.Fprintf(&b, "- Result: %s\n\n", verdict)

	b.WriteString("| series | largest, first third | largest, last third | limit | flat |\n|---|---:|---:|---:|---|\n")
	for _, v := range r.verdicts {
		unit := ""
		if v.s.unit != "" {
			unit = " (" + v.s.unit + ")"
		}
		flat := "yes"
		if !v.flat {
			flat = "**no**"
		}
		if v.s.bound > 0 {
			fmt.Fprintf(&b, "| %s%s (largest of all, against its bound) | %.1f | %.1f | %.1f | %s |\n", v.s.name, unit, v.firstMax, v.lastMax, v.limit, flat)
			continue
		}
		fmt.Fprintf(&b, "| %s%s | %.1f | %.1f | %.1f | %s |\n", v.s.name, unit, v.firstMax, v.lastMax, v.limit, flat)
	}
	b.WriteString("\n| t (s) | goroutines | open fds | RSS (MiB) | token sessions | sessions in SoftHSM | accepted | rotations | reloads |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range r.samples {
		fmt.Fprintf(&b, "| %.0f | %.0f | %.0f | %.1f | %.0f | %.0f | %d | %d | %d |\n", s.at.Seconds(), s.goroutines, s.fds, s.rssBytes/(1<<20), s.sessions, s.moduleSessions, s.accepted, s.rotations, s.reloads)
	}
	b.WriteString("\n" + soakEnd + "\n")
	return b.Bytes()
}
