package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestServeDriftWatch: the active key's record is changed in BIND behind
// dkimgw's back. Within one drift_every the drift metric is 1 and a
// warning names the key; with on_drift: tempfail the domain's mail gets
// 451 4.7.0 (not a signature that fails); once the record is put back,
// the metric is 0 again and mail is signed again.
func TestServeDriftWatch(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	r := newRotServe(t, bin, server, "{algorithms: [ed25519], interval: 1h, ttl: 1, publisher: primary}")
	const every = 2 * time.Second
	r.cfg.extra = strings.Replace(r.cfg.extra, "  check_every: 500ms\n", fmt.Sprintf("  check_every: 500ms\n  drift_every: %v\n  on_drift: tempfail\n", every), 1)
	r.start()
	sel := r.waitSigned(1, 30*time.Second)[0]
	labels := []string{"domain", r.domain(), "selector", sel}
	waitMetric(t, r.gw, "", "dkimgw_dns_drift", labels, 0)

	// Someone changes the record with the zone's key, as a DNS admin's
	// tool would.
	k := server.Keys[0]
	up, err := dnspub.NewRFC2136(dnspub.RFC2136Options{
		Server: server.Addr,
		TSIG:   dnspub.TSIG{Name: k.Name, Algorithm: k.Algorithm, SecretFile: server.KeyFile(t, k)},
	})
	if err != nil {
		t.Fatal(err)
	}
	name := hsm.RecordName(r.domain(), sel)
	orig, err := r.srv.TXT(name)
	if err != nil || len(orig) != 1 {
		t.Fatalf("lookup %s: %q %v", name, orig, err)
	}
	rel := strings.TrimSuffix(name, "."+r.domain())
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	mark := r.gw.mark()
	changed := time.Now()
	if _, err := up.SetRecords(ctx, server.Zone, []dnspub.Record{{Name: rel, TTL: time.Second, Value: "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}}); err != nil {
		t.Fatalf("change the record behind dkimgw's back: %v", err)
	}
	waitMetric(t, r.gw, "", "dkimgw_dns_drift", labels, 1)
	// Within one period (and the check's own time, generously).
	if d := time.Since(changed); d > every+10*time.Second {
		t.Errorf("drift seen after %v, period %v", d, every)
	}
	l := r.gw.waitLog(mark, 10*time.Second, "the drift warning", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "DNS drift:") && l.str("selector") == sel
	})
	if l.str("level") != "WARN" || !strings.Contains(l.str("servers"), "different") {
		t.Errorf("drift log line: %s", l.raw)
	}
	n := len(r.sink.Messages())
	if code, _ := r.sendOne("drifted@x"); code != 451 {
		t.Errorf("message while the active record drifted: reply %d, want 451", code)
	}
	if got := len(r.sink.Messages()); got != n {
		t.Errorf("the sink got %d messages while the active record drifted", got-n)
	}

	// The record is put back: no drift, mail signed again.
	if _, err := up.SetRecords(ctx, server.Zone, []dnspub.Record{{Name: rel, TTL: time.Second, Value: orig[0]}}); err != nil {
		t.Fatalf("restore the record: %v", err)
	}
	waitMetric(t, r.gw, "", "dkimgw_dns_drift", labels, 0)
	if sels := r.waitSigned(1, 30*time.Second); sels[0] != sel {
		t.Errorf("signed by %v after the drift ended, want %s", sels, sel)
	}

	// The audit log has the drift's start and its end.
	var drifts []bool
	for _, rec := range readAudit(t, filepath.Join(r.dataDir, "audit.log")) {
		if rec.Event == audit.EventDrift && rec.Selector == sel {
			drifts = append(drifts, rec.Details["drifted"] == true)
		}
	}
	if !slices.Equal(drifts, []bool{true, false}) {
		t.Errorf("audit records of the drift (drifted): %v, want [true false]", drifts)
	}
}

// TestSameAdminListener: a reload may change the bearer token, not the
// listener's address or certificate.
func TestSameAdminListener(t *testing.T) {
	addr := func(s string) *string { return &s }
	base := policy.Config{Admin: policy.Admin{Listen: addr("127.0.0.1:9465")}}
	withTLS := func(c policy.Config, cert string) policy.Config {
		c.Admin.TLS = &policy.TLS{CertFile: cert, KeyFile: "k"}
		return c
	}
	other := base
	other.Admin.Listen = addr("127.0.0.1:9466")
	token := base
	token.Admin.BearerTokenFile = "/etc/dkimgw/token"
	for _, c := range []struct {
		name      string
		next, cur policy.Config
		same      bool
	}{
		{"unchanged", base, base, true},
		{"new token file", token, base, true},
		{"new address", other, base, false},
		{"TLS added", withTLS(base, "c"), base, false},
		{"new certificate", withTLS(base, "c2"), withTLS(base, "c"), false},
		{"same certificate", withTLS(base, "c"), withTLS(base, "c"), true},
	} {
		if got := sameAdminListener(&c.next, &c.cur); got != c.same {
			t.Errorf("%s: sameAdminListener = %v, want %v", c.name, got, c.same)
		}
	}
}

// recordingDrift keeps the drift events it is told of.
type recordingDrift struct{ events []driftEvent }

func (r *recordingDrift) DriftReported(_ context.Context, e driftEvent) {
	r.events = append(r.events, e)
}

// TestDriftWatchReportsToItsSink drives one drift watch by hand against
// BIND: the sink (where the audit log plugs in) hears a drift start and
// end once each, the metric follows, and with on_drift: tempfail the
// keyring holds the domain while its active record is wrong.
func TestDriftWatchReportsToItsSink(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	r := newRotServe(t, "", server, "{algorithms: [ed25519], interval: 1h, ttl: 1, publisher: primary}")
	r.cfg.extra = strings.Replace(r.cfg.extra, "  check_every: 500ms\n", "  check_every: 500ms\n  on_drift: tempfail\n", 1)
	path := filepath.Join(t.TempDir(), "dkimgw.yaml")
	if err := os.WriteFile(path, []byte(r.cfg.yaml()), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := policy.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &testenv.LogBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	setup, err := newRotation(cfg, nil, logger, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	domain, sel := r.domain(), "ed20261201"
	const published = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
	now := time.Now()
	if err := setup.store.Update(t.Context(), rotation.Change{Key: rotation.Key{
		Domain: domain, Selector: sel, Algorithm: rotation.Ed25519, State: rotation.StateActive,
		Created: true, Record: published, Since: now, CreatedAt: now, ActivatedAt: now,
	}}); err != nil {
		t.Fatal(err)
	}
	k := server.Keys[0]
	up, err := dnspub.NewRFC2136(dnspub.RFC2136Options{
		Server: server.Addr,
		TSIG:   dnspub.TSIG{Name: k.Name, Algorithm: k.Algorithm, SecretFile: server.KeyFile(t, k)},
	})
	if err != nil {
		t.Fatal(err)
	}
	set := func(value string) {
		t.Helper()
		if _, err := up.SetRecords(t.Context(), server.Zone, []dnspub.Record{{Name: sel + "._domainkey", TTL: time.Second, Value: value}}); err != nil {
			t.Fatal(err)
		}
	}
	set(published)

	var ring keyring
	m := newMetrics(metricsSources{})
	sink := &recordingDrift{}
	w := newDriftWatch(cfg, &rotator{setup: setup}, &ring, m, sink, logger)
	drift := func() float64 { return testutil.ToFloat64(m.drift.WithLabelValues(domain, sel)) }
	held := func() bool { d := ring.drifted.Load(); return d != nil && (*d)[domain] }

	w.check(t.Context())
	if len(sink.events) != 0 || drift() != 0 || held() {
		t.Fatalf("record as published: events %+v, metric %v, domain held %v; want none, 0, false", sink.events, drift(), held())
	}
	set("v=DKIM1; k=ed25519; p=AAAA")
	w.check(t.Context())
	w.check(t.Context()) // a drift that lasts is reported once
	if len(sink.events) != 1 || !sink.events[0].Drifted || sink.events[0].Selector != sel || sink.events[0].State != rotation.StateActive || !strings.Contains(sink.events[0].Detail, "different") {
		t.Fatalf("record changed: events %+v, want one drift of %s", sink.events, sel)
	}
	if drift() != 1 || !held() {
		t.Errorf("record changed: metric %v, domain held %v; want 1, true", drift(), held())
	}
	set(published)
	w.check(t.Context())
	if len(sink.events) != 2 || sink.events[1].Drifted || drift() != 0 || held() {
		t.Errorf("record restored: events %+v, metric %v, domain held %v; want the drift's end, 0, false", sink.events, drift(), held())
	}
	if !strings.Contains(logs.String(), "DNS drift ended") {
		t.Errorf("the end of the drift was not logged:\n%s", logs)
	}
}
