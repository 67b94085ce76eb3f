package faults

// docs/reliability.md is written here, by the suite, never by hand.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// reportEnv names the file the table goes to (make test-faults:
// docs/reliability.md); unset, nothing is written.
const reportEnv = "DKIMGW_FAULTS_REPORT"

var (
	reportMu   sync.Mutex
	reportRows []reportRow
	reportAt   = time.Now().UTC()
)

// The soak (faults/soak_test.go, make soak) writes a section of its own
// into the same file, between these markers: the fault suite keeps it
// after its table, and the soak keeps the table.
const (
	soakBegin = "<!-- soak: written by `make soak` (faults/soak_test.go); do not edit. -->"
	soakEnd   = "<!-- soak: end -->"
)

// soakSection is the soak's section of doc, markers included (nil when
// there is none).
func soakSection(doc []byte) []byte {
	i := bytes.Index(doc, []byte(soakBegin))
	if i < 0 {
		return nil
	}
	j := bytes.Index(doc[i:], []byte(soakEnd))
	if j < 0 {
		return nil
	}
	end := i + j + len(soakEnd)
	if end < len(doc) && doc[end] == '\n' {
		end++
	}
	return doc[i:end]
}

// withSoakSection returns doc with its soak section replaced by sec, or
// sec appended when doc has none.
func withSoakSection(doc, sec []byte) []byte {
	if old := soakSection(doc); old != nil {
		i := bytes.Index(doc, old)
		return slices.Concat(doc[:i], sec, doc[i+len(old):])
	}
	if len(doc) == 0 {
		return slices.Clone(sec)
	}
	return slices.Concat(bytes.TrimRight(doc, "\n"), []byte("\n\n"), sec)
}

type reportRow struct {
	sc   scenario
	res  result
	note string
}

// report adds a scenario's row and rewrites the whole file, so that a run
// cut short still leaves the rows it has.
func report(t *testing.T, sc scenario, res result, note string) {
	path := os.Getenv(reportEnv)
	if path == "" {
		return
	}
	reportMu.Lock()
	defer reportMu.Unlock()
	reportRows = append(reportRows, reportRow{sc, res, note})
	doc := renderReport(reportRows)
	if prev, err := os.ReadFile(path); err == nil {
		if sec := soakSection(prev); sec != nil {
			doc = withSoakSection(doc, sec)
		}
	}
	if err := os.WriteFile(path, doc, 0o644); err != nil {
		t.Errorf("write %s: %v", path, err)
	}
}

func renderReport(rows []reportRow) []byte {
	var b bytes.Buffer
	form := "short"
	if longForm() {
		form = "long"
	}
	cmd := os.Getenv("DKIMGW_FAULTS_COMMAND")
	if cmd == "" {
		cmd = "DKIMGW_FAULTS=" + os.Getenv("DKIMGW_FAULTS") + " go test ./faults"
	}
	b.WriteString("# Reliability under injected faults\n\n")
	b.WriteString("<!-- Written by the fault suite (faults/report_test.go); do not edit. Run `make test-faults` to renew it. -->\n\n")
	b.WriteString("dkimgw promises that a message it answers 250 has been accepted by the upstream MTA, signed; " +
		"that nothing leaves unsigned; and that a message it cannot relay gets a reply the sending MTA can act on (4xx: " +
		"keep it and retry). The fault suite (package `faults`) checks these promises at volume: a load generator sends " +
		"tagged messages over many concurrent SMTP sessions through the real `dkimgw serve` binary to a recording upstream " +
		"while one fault is injected, then compares what every client saw with what reached the upstream. Every message " +
		"upstream is verified with go-msgauth against the test's keys (RSA-2048 and Ed25519, both must pass), and a sample " +
		"with independent verifiers (dkimpy, OpenDKIM, Mail::DKIM).\n\n")
	fmt.Fprintf(&b, "- Command: `%s` (%s form)\n", cmd, form)
	fmt.Fprintf(&b, "- Date: %s\n", reportAt.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "- Machine: %s\n\n", machine())

	b.WriteString("| scenario | sent | accepted | deferred 4xx | delivered | duplicates | unsigned | lost | result |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, r := range rows {
		verdict := "pass"
		if !r.res.passed {
			verdict = "**FAIL**"
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d | %d | %d | %s |\n", r.sc.title, r.res.sent, r.res.accepted,
			r.res.tempFail, r.res.delivered, r.res.duplicates, r.res.unsigned, r.res.lost, verdict)
	}
	b.WriteString("\nColumns: **sent**: messages whose transaction started (MAIL FROM answered). **accepted**: answered 250, " +
		"on the first try or a retry. **deferred 4xx**: not accepted; the client got a 4xx for it (it tries each " +
		"message up to 3 times, 200 ms then 400 ms apart, as an MTA retries deferred mail, and 10 times where dkimgw itself " +
		"is killed or stopped; after that it gives up for the run: an MTA would keep the message and retry later). " +
		"**delivered**: accepted messages found at the upstream. **duplicates**: copies at the upstream beyond the first " +
		"of each message. **unsigned**: copies at the upstream without both signatures verifying. **lost**: accepted " +
		"messages missing at the upstream. A run passes when lost and unsigned are 0, no message got a 5xx, no client " +
		"connection broke without a reply (but where dkimgw itself is killed or stopped), the fault was really hit, and " +
		"mail flowed again after it.\n\n")

	b.WriteString("## Details\n\n")
	b.WriteString("| scenario | 5xx | broken connections | not started | retries | delivered, never answered 250 | fault hits | last failure after the fault (s) | seconds |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d | %d | %.1f | %.0f |\n", r.sc.title, r.res.permFail, r.res.connErr,
			r.res.unsent, r.res.retries, r.res.deliveredUnaccepted, r.res.faultHits, r.res.lastFailAfter, r.res.seconds)
	}
	b.WriteString("\n**5xx**: messages refused for good (none may be: every fault here is temporary). " +
		"**broken connections**: messages whose last try ended in a connection broken without a reply. " +
		"**not started**: messages for which no transaction ever started (no gateway to connect to). " +
		"**retries**: tries beyond the first, over all messages. " +
		"**delivered, never answered 250**: the upstream has the message but its client never got a 250 " +
		"(the connection broke after the final dot, RFC 1047): the sending MTA retries it, and the retry is a duplicate. " +
		"**fault hits**: how often the fault was applied (connections and transactions it met, token calls it failed, " +
		"signals sent, transactions in flight at SIGTERM). **last failure after the fault**: how long after the fault " +
		"was lifted (or the gateway was serving again) a client attempt last failed: 0 means the next attempts all " +
		"went through. **seconds**: the whole scenario, gateway start and verification included.\n\n")

	b.WriteString("## Scenarios\n\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "- **%s** (`%s`, %d messages over %d sessions): %s", r.sc.title, r.sc.name, r.res.sent+r.res.unsent, sessionsOf(r.sc), r.sc.about)
		if r.note != "" {
			fmt.Fprintf(&b, " Observed: %s.", r.note)
		}
		b.WriteString("\n")
	}
	b.WriteString("\nThe token faults come from a PKCS#11 module placed in front of SoftHSM (`testenv/p11fault/p11fault.c`, " +
		"built by the tests with the C compiler): it forwards every call and, steered by a control file, fails calls with " +
		"a chosen CKR, delays them, or closes every session. dkimgw loads it through `module-path` in its token URI, so its " +
		"real token code meets real failures. The upstream is an in-process SMTP server (`testenv.FaultSink`) that records " +
		"every message it reads in full.\n")
	return b.Bytes()
}

func sessionsOf(sc scenario) int {
	if sc.sessions == 0 {
		return 20
	}
	return sc.sessions
}

// machine describes where the suite ran.
func machine() string {
	var parts []string
	if out, err := exec.Command("uname", "-srm").Output(); err == nil {
		parts = append(parts, strings.TrimSpace(string(out)))
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				parts = append(parts, strings.TrimSpace(v))
				break
			}
		}
	}
	parts = append(parts, fmt.Sprintf("%d CPUs", runtime.NumCPU()), runtime.Version())
	if out, err := exec.Command("softhsm2-util", "--version").Output(); err == nil {
		parts = append(parts, "SoftHSM "+strings.TrimSpace(string(out)))
	}
	if data, err := os.ReadFile("/etc/debian_version"); err == nil {
		parts = append(parts, "Debian "+strings.TrimSpace(string(data)))
	}
	return strings.Join(parts, ", ")
}
