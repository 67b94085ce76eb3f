package main

import (
	"context"
	"crypto"
	"io"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/milter"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/smtpproxy"
)

// This file is the only place that knows Prometheus. The packages report
// through small interfaces of their own (smtpproxy.Observer, the
// hsm.Token's Stats, rotation's Status) and serve turns that into
// metrics: a change of metrics library stays here, and no label can come
// from a message, since smtpproxy reports only configured names.

// metrics is serve's registry and the metrics updated as things happen;
// the rest (token pool, connections, spool, keys) is read at each scrape
// by a collector.
type metrics struct {
	reg *prometheus.Registry

	messages    *prometheus.CounterVec
	signatures  *prometheus.CounterVec
	signLatency *prometheus.HistogramVec
	upstream    *prometheus.CounterVec
	refused     *prometheus.CounterVec
	reloads     *prometheus.CounterVec
	drift       *prometheus.GaugeVec

	// own are dkimgw's collectors (not Go's and the process's).
	own []prometheus.Collector
}

// metricsSources are what the scrape-time collector reads. Each func may
// be nil (that part is not exported) and must be cheap: a scrape runs
// them all.
type metricsSources struct {
	token       func() *hsm.Token
	connections func() int
	spool       func() (memory, disk int64)
	// keys reads the rotating domains' keys from the state store (nil
	// when no domain rotates).
	keys func(ctx context.Context) ([]rotation.Status, map[string]time.Duration, error)
	// fixed lists the fixed selectors of the configuration, by domain.
	fixed func() map[string][]string
	// state tells of a shared (etcd) state store; ok is false with bbolt
	// (nothing exported).
	state func(ctx context.Context) (st stateInfo, ok bool)
}

// stateInfo is what a gateway knows of the shared state store.
type stateInfo struct {
	// up: the gateway's last read of the store (its watch) succeeded.
	up bool
	// leading: this gateway runs the reconciler.
	leading bool
	// leader names the gateway that leads ("" when nobody does, or the
	// store cannot say).
	leader string
	// revision is the store revision of the keyring's view.
	revision int64
}

// keysScrapeTimeout bounds reading the rotation state at a scrape.
const keysScrapeTimeout = 2 * time.Second

func newMetrics(src metricsSources) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.messages = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dkimgw_messages_total",
		Help: "Messages that got a final reply (to DATA, or a failure at MAIL FROM), by outcome (signed, relayed-unsigned, tempfailed, refused), signing domain (\"\" when the From domain has none or was not read yet) and client.",
	}, []string{"outcome", "domain", "client"})
	m.signatures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dkimgw_signatures_total",
		Help: "DKIM signatures made for messages the upstream accepted, by domain, selector and algorithm.",
	}, []string{"domain", "selector", "algorithm"})
	m.signLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "dkimgw_token_sign_duration_seconds",
		Help:    "Time the token took to make one signature (successful ones), by algorithm.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"algorithm"})
	m.upstream = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dkimgw_upstream_replies_total",
		Help: "Upstream replies to relayed messages (the final dot), by class (2xx, 4xx, 5xx).",
	}, []string{"class"})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dkimgw_smtp_connections_refused_total",
		Help: "Client connections refused at accept time with 421, by reason (max_connections, max_connections_per_ip).",
	}, []string{"reason"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dkimgw_config_reloads_total",
		Help: "Configuration reloads (SIGHUP), by result (success, failure).",
	}, []string{"result"})
	m.drift = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "dkimgw_dns_drift",
		Help: "1 when an authoritative server does not serve the record of an active or retired key as published, 0 when all do.",
	}, []string{"domain", "selector"})
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	for _, r := range []string{smtpproxy.RefusedMaxConnections, smtpproxy.RefusedMaxConnectionsPerIP} {
		m.refused.WithLabelValues(r)
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "dkimgw_build_info",
		Help:        "Always 1; the version label is the running dkimgw's.",
		ConstLabels: prometheus.Labels{"version": version()},
	})
	build.Set(1)
	m.own = []prometheus.Collector{
		m.messages, m.signatures, m.signLatency, m.upstream, m.refused, m.reloads, m.drift, build,
		&scrapeCollector{src: src},
	}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.reg.MustRegister(m.own...)
	return m
}

var _ smtpproxy.Observer = (*metrics)(nil)

// Transaction counts a message; its labels come from the configuration.
func (m *metrics) Transaction(r smtpproxy.TransactionReport) {
	m.messages.WithLabelValues(string(r.Outcome), r.Domain, r.Client).Inc()
	for _, s := range r.Signatures {
		m.signatures.WithLabelValues(s.Domain, s.Selector, s.Algorithm).Inc()
	}
	if r.UpstreamClass != "" {
		m.upstream.WithLabelValues(r.UpstreamClass).Inc()
	}
}

func (m *metrics) ConnectionRefused(reason string) { m.refused.WithLabelValues(reason).Inc() }

// reloaded counts a reload.
func (m *metrics) reloaded(ok bool) {
	if ok {
		m.reloads.WithLabelValues("success").Inc()
	} else {
		m.reloads.WithLabelValues("failure").Inc()
	}
}

// observeSign records one signature's latency.
func (m *metrics) observeSign(alg string, d time.Duration) {
	m.signLatency.WithLabelValues(alg).Observe(d.Seconds())
}

// timedKey is a token key whose signatures are timed for
// dkimgw_token_sign_duration_seconds. It is what the keyring hands
// smtpproxy; errors pass through unchanged (smtpproxy reads their
// Temporary()).
type timedKey struct {
	*hsm.Key
	alg     string
	observe func(alg string, d time.Duration)
}

func timed(k *hsm.Key, observe func(string, time.Duration)) crypto.Signer {
	if observe == nil {
		return k
	}
	alg := "rsa-sha256"
	if k.Info().Algorithm == hsm.Ed25519 {
		alg = "ed25519-sha256"
	}
	return timedKey{Key: k, alg: alg, observe: observe}
}

func (k timedKey) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	start := time.Now()
	sig, err := k.Key.SignContext(ctx, digest, opts)
	if err == nil {
		k.observe(k.alg, time.Since(start))
	}
	return sig, err
}

func (k timedKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.SignContext(context.Background(), digest, opts)
}

// scrapeCollector reads the token, the relay and the rotation state at
// each scrape.
type scrapeCollector struct{ src metricsSources }

var (
	descSessions = prometheus.NewDesc("dkimgw_token_sessions",
		"Token sessions by state: in_use (running a call), idle (open, free), waiting (callers waiting for a session: the pool is exhausted).",
		[]string{"state"}, nil)
	descTokenErrors = prometheus.NewDesc("dkimgw_token_errors_total",
		"Failed token calls by PKCS#11 return value (CKR_...), since the token was opened.",
		[]string{"code"}, nil)
	descReinit = prometheus.NewDesc("dkimgw_token_reinitializations_total",
		"Re-initialisations of the PKCS#11 module (C_Finalize and C_Initialize) to recover a lost device.",
		nil, nil)
	descConns = prometheus.NewDesc("dkimgw_smtp_connections",
		"Client connections open now.", nil, nil)
	descSpool = prometheus.NewDesc("dkimgw_spool_bytes",
		"Bytes of messages spooled now (between the end of DATA and the upstream's reply), by where (memory, disk).",
		[]string{"where"}, nil)
	descKeyAge = prometheus.NewDesc("dkimgw_key_age_seconds",
		"Seconds since a rotating key was created.", []string{"domain", "selector", "algorithm"}, nil)
	descKeyState = prometheus.NewDesc("dkimgw_key_state",
		"A key's lifecycle state: one series per state, 1 for the key's current one. Fixed selectors are always active.",
		[]string{"domain", "selector", "state"}, nil)
	descKeyNext = prometheus.NewDesc("dkimgw_key_next_step_seconds",
		"Seconds until a rotating key's next lifecycle step (visible, start: the successor, revoke, delete) is due (negative: overdue); absent while the step waits for an event (DNS, the next pass).",
		[]string{"domain", "selector", "step"}, nil)
	descInterval = prometheus.NewDesc("dkimgw_key_rotation_interval_seconds",
		"The rotation interval of a rotating domain's policy.", []string{"domain"}, nil)
	descKeysUp = prometheus.NewDesc("dkimgw_key_state_readable",
		"1 when the scrape could read the rotation state, 0 when it could not (the key metrics are then missing).", nil, nil)
	descStateUp = prometheus.NewDesc("dkimgw_state_store_up",
		"1 while the gateway reads the shared (etcd) state store, 0 while it cannot: it then signs with the keys last seen active, and rotation pauses.", nil, nil)
	descStateLeading = prometheus.NewDesc("dkimgw_state_leader",
		"1 when this gateway leads the election of the shared state store (runs the rotation reconciler), 0 otherwise.", nil, nil)
	descStateLeader = prometheus.NewDesc("dkimgw_state_leader_info",
		"Always 1, labelled with the gateway that leads the shared state store's election (name[pid]@host); absent when none does or the store cannot say.", []string{"leader"}, nil)
	descStateRevision = prometheus.NewDesc("dkimgw_state_revision",
		"The shared state store's revision the gateway's signing keys were taken from: gateways at the same revision sign with the same keys.", nil, nil)
)

// allStates are the lifecycle states dkimgw_key_state has a series for.
// Destroyed keys are left out: their tombstones stay in the state store
// for ever and would grow the series without bound.
var allStates = []rotation.State{
	rotation.StatePlanned, rotation.StateGenerated, rotation.StatePublished, rotation.StateVisible,
	rotation.StateActive, rotation.StateRetired, rotation.StateRevoked,
}

func (c *scrapeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSessions, descTokenErrors, descReinit, descConns, descSpool, descKeyAge, descKeyState, descKeyNext, descInterval, descKeysUp, descStateUp, descStateLeading, descStateLeader, descStateRevision} {
		ch <- d
	}
}

func (c *scrapeCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.src
	if s.token != nil {
		if tok := s.token(); tok != nil {
			st := tok.Stats()
			ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(st.SessionsInUse), "in_use")
			ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(st.SessionsIdle), "idle")
			ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(st.SessionsWaiting), "waiting")
			for code, n := range st.Errors {
				ch <- prometheus.MustNewConstMetric(descTokenErrors, prometheus.CounterValue, float64(n), code)
			}
			ch <- prometheus.MustNewConstMetric(descReinit, prometheus.CounterValue, float64(st.Reinitializations))
		}
	}
	if s.connections != nil {
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(s.connections()))
	}
	if s.spool != nil {
		mem, disk := s.spool()
		ch <- prometheus.MustNewConstMetric(descSpool, prometheus.GaugeValue, float64(mem), "memory")
		ch <- prometheus.MustNewConstMetric(descSpool, prometheus.GaugeValue, float64(disk), "disk")
	}
	if s.fixed != nil {
		for domain, sels := range s.fixed() {
			for _, sel := range sels {
				for _, state := range allStates {
					ch <- prometheus.MustNewConstMetric(descKeyState, prometheus.GaugeValue, b2f(state == rotation.StateActive), domain, sel, string(state))
				}
			}
		}
	}
	if s.keys != nil {
		c.collectKeys(ch)
	}
	if s.state != nil {
		ctx, cancel := context.WithTimeout(context.Background(), keysScrapeTimeout)
		st, ok := s.state(ctx)
		cancel()
		if ok {
			ch <- prometheus.MustNewConstMetric(descStateUp, prometheus.GaugeValue, b2f(st.up))
			ch <- prometheus.MustNewConstMetric(descStateLeading, prometheus.GaugeValue, b2f(st.leading))
			ch <- prometheus.MustNewConstMetric(descStateRevision, prometheus.GaugeValue, float64(st.revision))
			if st.leader != "" {
				ch <- prometheus.MustNewConstMetric(descStateLeader, prometheus.GaugeValue, 1, st.leader)
			}
		}
	}
}

func (c *scrapeCollector) collectKeys(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), keysScrapeTimeout)
	defer cancel()
	keys, intervals, err := c.src.keys(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(descKeysUp, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(descKeysUp, prometheus.GaugeValue, 1)
	for d, iv := range intervals {
		ch <- prometheus.MustNewConstMetric(descInterval, prometheus.GaugeValue, iv.Seconds(), d)
	}
	now := time.Now()
	for _, k := range keys {
		if k.State == rotation.StateDestroyed {
			continue
		}
		if !k.CreatedAt.IsZero() {
			ch <- prometheus.MustNewConstMetric(descKeyAge, prometheus.GaugeValue, now.Sub(k.CreatedAt).Seconds(), k.Domain, k.Selector, string(k.Algorithm))
		}
		for _, state := range allStates {
			ch <- prometheus.MustNewConstMetric(descKeyState, prometheus.GaugeValue, b2f(k.State == state), k.Domain, k.Selector, string(state))
		}
		if !k.When.IsZero() {
			ch <- prometheus.MustNewConstMetric(descKeyNext, prometheus.GaugeValue, k.When.Sub(now).Seconds(), k.Domain, k.Selector, stepLabel(k.Next))
		}
	}
}

// stepLabel is the first word of rotation's description of a key's next
// step ("visible", "start", "revoke", "delete"): a short, bounded label.
func stepLabel(next string) string {
	if f := strings.Fields(next); len(f) > 0 {
		return f[0]
	}
	return "none"
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

var _ milter.Observer = (*metrics)(nil)

// Message counts a message the milter decided on, in the relay's
// dkimgw_messages_total and dkimgw_signatures_total: the outcomes have
// the same names, and there is no upstream reply.
func (m *metrics) Message(r milter.Report) {
	m.messages.WithLabelValues(string(r.Outcome), r.Domain, r.Client).Inc()
	for _, s := range r.Signatures {
		m.signatures.WithLabelValues(s.Domain, s.Selector, s.Algorithm).Inc()
	}
}
