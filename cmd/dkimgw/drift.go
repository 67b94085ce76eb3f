package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

// driftEvent says that DNS started (Drifted) or stopped serving a key's
// record differently from what dkimgw published.
type driftEvent struct {
	Domain, Selector string
	State            rotation.State // active or retired
	Drifted          bool
	// Detail is what each server that disagrees serves ("ns1:53/udp:
	// absent"); empty when the drift ended.
	Detail string
}

// driftSink is told of every drift that starts or ends; the audit log
// implements it. Calls come from the drift watch's goroutine, one at a
// time, and must return promptly.
type driftSink interface {
	DriftReported(ctx context.Context, e driftEvent)
}

// driftCheckTimeout bounds one key's check at every server.
const driftCheckTimeout = 30 * time.Second

// driftWatch re-checks, every rotation.drift_every, that every
// authoritative server serves the record of each active and retired key
// of the rotating domains exactly as published. Domains with fixed
// selectors are not checked: the configuration names no zone for them.
type driftWatch struct {
	setup   *rotationSetup
	every   time.Duration
	onDrift policy.DriftAction
	ring    *keyring
	m       *metrics
	sink    driftSink
	log     *slog.Logger

	// drifted are the keys found drifting at the last check, by
	// "domain/selector"; only the watch's goroutine touches it.
	drifted map[string]bool
	seen    map[string]bool // the keys with a drift series

	cancel context.CancelFunc
	done   chan struct{}
}

func newDriftWatch(cfg *policy.Config, rot *rotator, ring *keyring, m *metrics, sink driftSink, logger *slog.Logger) *driftWatch {
	if rot == nil {
		ring.drifted.Store(nil)
		return nil
	}
	return &driftWatch{
		setup: rot.setup, every: cfg.Rotation.DriftEvery.D(), onDrift: cfg.Rotation.OnDrift,
		ring: ring, m: m, sink: sink, log: logger.With("component", "drift"),
		drifted: map[string]bool{}, seen: map[string]bool{},
	}
}

// start checks at once, then every period, until stop.
func (w *driftWatch) start() {
	if w == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel, w.done = cancel, make(chan struct{})
	go func() {
		defer close(w.done)
		t := time.NewTicker(w.every)
		defer t.Stop()
		for {
			w.check(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// stop ends the watch, waiting for a check in flight until deadline.
func (w *driftWatch) stop(deadline time.Time) {
	if w == nil || w.cancel == nil {
		return
	}
	w.cancel()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-w.done:
	case <-t.C:
	}
}

// check runs one round over every active and retired key.
func (w *driftWatch) check(ctx context.Context) {
	keys, err := w.status(ctx)
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("drift watch: cannot read the rotation state; DNS not checked this time", "error", err)
		}
		return
	}
	type result struct {
		k               rotation.Key
		drifted, usable bool
		detail          string
	}
	var todo []rotation.Key
	for _, k := range keys {
		if (k.State == rotation.StateActive || k.State == rotation.StateRetired) && k.Record != "" {
			todo = append(todo, k.Key)
		}
	}
	results := make([]result, len(todo))
	var wg sync.WaitGroup
	for i, k := range todo {
		wg.Go(func() {
			drifted, detail, usable := w.checkKey(ctx, k)
			results[i] = result{k: k, drifted: drifted, usable: usable, detail: detail}
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return
	}
	// A key the reconciler moved on while DNS was asked (a retired key
	// revoked: its record replaced) is no drift: read the state again and
	// keep only the verdicts on keys that did not change.
	after, err := w.status(ctx)
	if err != nil {
		return
	}
	type rec struct {
		state  rotation.State
		record string
	}
	still := map[string]rec{}
	for _, k := range after {
		still[k.Domain+"/"+k.Selector] = rec{k.State, k.Record}
	}

	now, checked, badDomains := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, r := range results {
		k := r.k
		id := k.Domain + "/" + k.Selector
		if st, ok := still[id]; !ok || st.state != k.State || st.record != k.Record {
			continue
		}
		checked[id] = true
		drifted := r.drifted
		if !r.usable {
			// No server answered usably: nothing known, the last
			// verdict stands.
			drifted = w.drifted[id]
		}
		if drifted {
			now[id] = true
			if k.State == rotation.StateActive {
				badDomains[k.Domain] = true
			}
		}
		if !r.usable {
			continue
		}
		if r.drifted {
			w.log.Warn("DNS drift: authoritative servers do not serve the key's record as published",
				"domain", k.Domain, "selector", k.Selector, "state", string(k.State), "servers", r.detail,
				"on_drift", string(w.onDrift))
		}
		if r.drifted != w.drifted[id] {
			if !r.drifted {
				w.log.Info("DNS drift ended: every authoritative server serves the record as published", "domain", k.Domain, "selector", k.Selector)
			}
			if w.sink != nil {
				w.sink.DriftReported(ctx, driftEvent{Domain: k.Domain, Selector: k.Selector, State: k.State, Drifted: r.drifted, Detail: r.detail})
			}
		}
	}
	for id := range checked {
		d, s, _ := strings.Cut(id, "/")
		w.m.drift.WithLabelValues(d, s).Set(b2f(now[id]))
	}
	for id := range w.seen {
		if !checked[id] {
			d, s, _ := strings.Cut(id, "/")
			w.m.drift.DeleteLabelValues(d, s)
		}
	}
	w.seen, w.drifted = checked, now
	if w.onDrift == policy.DriftTempfail {
		w.ring.drifted.Store(&badDomains)
	} else {
		w.ring.drifted.Store(nil)
	}
}

// status reads every key of the rotating domains.
func (w *driftWatch) status(ctx context.Context) ([]rotation.Status, error) {
	sctx, cancel := context.WithTimeout(ctx, driftCheckTimeout)
	defer cancel()
	return w.setup.rec.Status(sctx)
}

// checkKey asks every authoritative server of the key's zone for its
// record. ok is false when no server gave a usable answer.
func (w *driftWatch) checkKey(ctx context.Context, k rotation.Key) (drifted bool, detail string, ok bool) {
	p, found := w.setup.policies[k.Domain]
	if !found {
		return false, "", false
	}
	c, err := w.setup.checkers.forZone(p.Zone)
	if err != nil {
		w.log.Warn("drift watch: no checker for the zone", "domain", k.Domain, "zone", p.Zone, "error", err)
		return false, "", false
	}
	cctx, cancel := context.WithTimeout(ctx, driftCheckTimeout)
	defer cancel()
	rep, err := c.Check(cctx, p.Zone, dnspub.Record{Name: k.Selector + "._domainkey." + k.Domain + ".", Value: k.Record})
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("drift watch: cannot check the key's record", "domain", k.Domain, "selector", k.Selector, "error", err)
		}
		return false, "", false
	}
	var bad, failed []string
	for _, o := range rep.Observations {
		where := o.Server + "/" + o.Net
		switch o.State {
		case dnspub.Present:
			ok = true
		case dnspub.Absent, dnspub.Different:
			ok = true
			bad = append(bad, where+": "+o.State.String())
		default:
			failed = append(failed, fmt.Sprintf("%s: %v", where, o.Err))
		}
	}
	if len(failed) > 0 {
		w.log.Warn("drift watch: servers did not answer", "domain", k.Domain, "selector", k.Selector, "servers", strings.Join(failed, "; "))
	}
	return len(bad) > 0, strings.Join(bad, "; "), ok
}
