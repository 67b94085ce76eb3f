package faults

// A gateway whose domain rotates its keys while the load runs: its keys
// are generated in the token, published in BIND by dynamic update and
// switched to by `dkimgw serve` itself, every few seconds.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// rotationDomain is the rotating domain: the load's own (its From and
// its client's domains), so the generator needs no change.
const rotationDomain = "example.com"

// rotationRun is the DNS side of a rotating gateway.
type rotationRun struct {
	srv *testenv.DNSServer
}

// startRotation starts BIND for example.com and makes cfg rotate the
// domain's keys (RSA-2048 and Ed25519) every interval. grace must cover
// the whole run: the messages are verified at the end against what BIND
// serves then, so no record of a key that signed may be withdrawn before.
func startRotation(t *testing.T, cfg *gwConfig, interval, grace time.Duration) *rotationRun {
	t.Helper()
	srv := testenv.StartBIND(t, testenv.DNSOptions{Zone: rotationDomain + ".", SOAMinimum: 1})
	k := srv.Keys[0]
	// ttl 1 and an SOA minimum of 1 s: a new key is visible (no cached
	// negative answer to wait out) a second after it is published.
	cfg.domains = fmt.Sprintf("  %s:\n    rotation: {algorithms: [rsa-2048, ed25519], interval: %ds, grace: %ds, revoke_for: 60s, ttl: 1, publisher: primary}\n",
		rotationDomain, int(interval.Seconds()), int(grace.Seconds()))
	cfg.extra = fmt.Sprintf(`dns:
  publishers:
    primary: {type: rfc2136, server: %q, tsig: {name: %q, algorithm: %s, secret_file: %q}}
  check_servers: [%q]
  timeout: 5s
rotation:
  check_every: 500ms
data_dir: %q
`, srv.Addr, k.Name, k.Algorithm, srv.KeyFile(t, k), srv.Addr, t.TempDir())
	return &rotationRun{srv: srv}
}

// keySwitch is serve switching the domain to a new set of signing keys,
// as its log says ("signing keys switched").
type keySwitch struct {
	at        time.Time
	selectors []string
}

// keySwitches lists the switches every process of gw logged, in order.
func keySwitches(gw *gateway) []keySwitch {
	var out []keySwitch
	for _, p := range gw.all() {
		for _, l := range p.logged("signing keys switched") {
			if l["domain"] != rotationDomain {
				continue
			}
			at, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(l["time"]))
			sels, _ := l["selectors"].(string)
			out = append(out, keySwitch{at: at, selectors: strings.Split(sels, ",")})
		}
	}
	slices.SortFunc(out, func(a, b keySwitch) int { return a.at.Compare(b.at) })
	return out
}

// waitActive waits until p signs the domain with both algorithms: before
// that its mail gets 451 4.7.0, which is the rotation's start, not the
// fault under test.
func (rr *rotationRun) waitActive(t *testing.T, gw *gateway) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		for _, s := range keySwitches(gw) {
			if len(s.selectors) == 2 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotating domain had no active RSA and Ed25519 keys within 90s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// published returns the record BIND serves now for every selector serve
// ever signed with (owner → value): the records the messages are
// verified against. A selector withdrawn or revoked already fails t: the
// grace period was shorter than the run.
func (rr *rotationRun) published(t *testing.T, gw *gateway) map[string]string {
	t.Helper()
	records := map[string]string{}
	for _, s := range keySwitches(gw) {
		for _, sel := range s.selectors {
			name := hsm.RecordName(rotationDomain, sel)
			if _, ok := records[name]; ok {
				continue
			}
			vals, err := rr.srv.TXT(name)
			switch {
			case err != nil:
				t.Errorf("look up %s in BIND: %v", name, err)
			case len(vals) != 1 || vals[0] == rotation.RevokedRecord:
				t.Errorf("BIND serves %q for %s, a selector that signed during the run: the grace period must cover the run", vals, name)
			default:
				records[name] = vals[0]
			}
		}
	}
	return records
}

// checkSignedAfterSwitch fails t for every message signed with a
// selector before serve switched to it (its t= earlier than the switch):
// serve switches only to a key the reconciler found visible on every
// authoritative server, so a message signed earlier could have met a
// verifier before its record existed. It returns how many distinct key
// sets signed the messages.
func checkSignedAfterSwitch(t *testing.T, switches []keySwitch, msgs []testenv.SinkMessage) int {
	t.Helper()
	first := map[string]int64{}
	for _, s := range switches {
		for _, sel := range s.selectors {
			if _, ok := first[sel]; !ok {
				first[sel] = s.at.Unix()
			}
		}
	}
	sets := map[string]bool{}
	bad := 0
	for _, m := range msgs {
		var sels []string
		for _, tags := range signatureTags(m.Data) {
			sel := tags["s"]
			sels = append(sels, sel)
			ts, err := strconv.ParseInt(tags["t"], 10, 64)
			at, known := first[sel]
			// t= is in whole seconds and serve logs the switch just after
			// making it: a second of slack, far below the time a key
			// takes from publication to being seen in DNS.
			if err != nil || !known || ts < at-1 {
				bad++
				if bad <= 3 {
					t.Errorf("<%s> signed by %s at t=%s, before serve switched to that key (at %d; known %v)", messageID(m.Data), sel, tags["t"], at, known)
				}
			}
		}
		slices.Sort(sels)
		sets[strings.Join(sels, ",")] = true
	}
	return len(sets)
}

// signatureTags returns the tags of every DKIM-Signature field of msg.
func signatureTags(msg []byte) []map[string]string {
	hdr, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	lines := strings.Split(string(hdr), "\r\n")
	var out []map[string]string
	for i := 0; i < len(lines); i++ {
		k, v, ok := strings.Cut(lines[i], ":")
		if !ok || !strings.EqualFold(strings.TrimSpace(k), "DKIM-Signature") {
			continue
		}
		for i+1 < len(lines) && (strings.HasPrefix(lines[i+1], " ") || strings.HasPrefix(lines[i+1], "\t")) {
			i++
			v += lines[i]
		}
		tags := map[string]string{}
		for _, tag := range strings.Split(v, ";") {
			if name, val, ok := strings.Cut(tag, "="); ok {
				tags[strings.TrimSpace(name)] = strings.Join(strings.Fields(val), "")
			}
		}
		out = append(out, tags)
	}
	return out
}

// rotatePasses runs `dkimgw rotate` (one reconciler pass, in a process of
// its own, as a cron job would) every interval while the load runs: it
// contends with serve's own passes for the rotation state. Every pass
// must succeed.
func (r *run) rotatePasses(interval time.Duration) {
	for {
		select {
		case <-r.loadEnd:
			return
		case <-r.ctx.Done():
			return
		case <-time.After(interval):
		}
		ctx, cancel := context.WithTimeout(r.ctx, 2*time.Minute)
		cmd := exec.CommandContext(ctx, r.gw.bin, "rotate", "--config", r.gw.config)
		cmd.Env = append(os.Environ(), r.gw.env...)
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			r.t.Errorf("dkimgw rotate during the load: %v\n%s", err, out)
			return
		}
		r.passes++
	}
}

// verifyAuditLog checks the audit log serve and every `dkimgw rotate`
// pass appended to side by side: its hash chain and checkpoints verify.
func (r *run) verifyAuditLog() {
	ctx, cancel := context.WithTimeout(r.ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.gw.bin, "audit", "verify-log", "--config", r.gw.config)
	cmd.Env = append(os.Environ(), r.gw.env...)
	out, err := cmd.CombinedOutput()
	r.t.Logf("audit verify-log: %s", bytes.TrimSpace(out))
	if err != nil {
		r.t.Errorf("dkimgw audit verify-log of the log serve and the rotate passes wrote: %v\n%s", err, out)
	}
}
