package main

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/signer"
	"github.com/dkimgw/dkimgw/smtpproxy"
)

// stateWatchEvery is how often serve looks at the rotation state file for
// changes another process made (a `dkimgw rotate --emergency`, a cron
// pass): a compromised key must stop signing within about a second, not
// at the next check_every.
const stateWatchEvery = time.Second

// rotatingSet is the active keys of every rotating domain, swapped as a
// whole: a message is signed with one set, never a mix of two.
type rotatingSet map[string][]rotatingKey

type rotatingKey struct {
	selector string
	key      *hsm.Key
	tok      *hsm.Token // the token key came from
}

// rotatingKeys is the part of the keyring that knows the rotating
// domains' active keys.
type rotatingKeys struct {
	mu  sync.Mutex // serialises setActive
	log *slog.Logger
}

var _ smtpproxy.SignerSource = (*keyring)(nil)

// Signers returns the active keys of a rotating domain, for
// smtpproxy; none is smtpproxy.ErrNoActiveKey (451 4.7.0).
func (r *keyring) Signers(ctx context.Context, domain string) ([]signer.Identity, error) {
	var keys []rotatingKey
	if set := r.rot.Load(); set != nil {
		keys = (*set)[domain]
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("dkimgw: domain %s: %w (rotation has not activated a key DNS serves)", domain, smtpproxy.ErrNoActiveKey)
	}
	if d := r.drifted.Load(); d != nil && (*d)[domain] {
		return nil, fmt.Errorf("dkimgw: domain %s: %w (DNS no longer serves the active key's record as published; rotation.on_drift: tempfail)", domain, smtpproxy.ErrNoActiveKey)
	}
	ids := make([]signer.Identity, 0, len(keys))
	for _, k := range keys {
		key := k.key
		if key.Err() != nil || k.tok != r.token() {
			// The key object was replaced (or the token re-opened): find
			// the selector's key again.
			nk, err := r.token().Key(ctx, domain, k.selector)
			if err != nil {
				return nil, err
			}
			key = nk
		}
		ids = append(ids, signer.Identity{Domain: domain, Selector: k.selector, Key: timed(key, r.observeSign)})
	}
	return ids, nil
}

// setActive installs the active keys rotation reports, looking up the
// token objects of keys not seen before. A key the token cannot give is
// logged and left out (its domain signs with the others, or gets 451).
func (r *keyring) setActive(ctx context.Context, act map[string][]rotation.ActiveKey) {
	r.rk.mu.Lock()
	defer r.rk.mu.Unlock()
	old := rotatingSet{}
	if p := r.rot.Load(); p != nil {
		old = *p
	}
	next := rotatingSet{}
	tok := r.token()
	for domain, keys := range act {
		var out []rotatingKey
		for _, a := range keys {
			if i := slices.IndexFunc(old[domain], func(k rotatingKey) bool { return k.selector == a.Selector }); i >= 0 && old[domain][i].tok == tok && old[domain][i].key.Err() == nil {
				out = append(out, old[domain][i])
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, tokenTimeout)
			key, err := tok.Key(cctx, domain, a.Selector)
			cancel()
			if err != nil {
				r.rk.log.Error("active key not usable; the domain signs without it", "domain", domain, "selector", a.Selector, "error", err)
				continue
			}
			out = append(out, rotatingKey{selector: a.Selector, key: key, tok: tok})
		}
		next[domain] = out
	}
	r.rot.Store(&next)
	for _, d := range slices.Sorted(maps.Keys(next)) {
		was, now := selectorsOf(old[d]), selectorsOf(next[d])
		if was == now {
			continue
		}
		if now == "" {
			r.rk.log.Warn("no active key: the domain's mail gets 451 4.7.0 until rotation activates one", "domain", d, "previous", was)
		} else {
			r.rk.log.Info("signing keys switched", "domain", d, "selectors", now, "previous", was)
		}
	}
}

func selectorsOf(keys []rotatingKey) string {
	s := make([]string, len(keys))
	for i, k := range keys {
		s[i] = k.selector
	}
	return strings.Join(s, ",")
}

// rotator is the reconciler of a serve process: a pass every
// rotation.check_every, and a watch on the state store, both feeding the
// keyring. With an etcd store, only the gateway that leads the store's
// election runs the passes; every gateway watches.
type rotator struct {
	setup   *rotationSetup
	dataDir string
	every   time.Duration
	cancel  context.CancelFunc
	done    chan struct{}

	// lead is this gateway's candidacy (etcd only), which a reload that
	// keeps the store hands to the next rotator (takeOver).
	lead atomic.Pointer[leadership]
	// storeUp is whether the last read of the etcd store succeeded, and
	// revision the store revision the keyring's view is at (etcd only).
	storeUp  atomic.Bool
	revision atomic.Int64
}

// prepareRotator builds the reconciler of cfg (nil when no domain
// rotates) and installs the active keys it records in ring; it starts
// nothing, so that a reload can still refuse. With an etcd store out of
// reach the keyring keeps what it has (nothing at a first start: the
// rotating domains get 451 until the watch reads the store).
//
// prev is the rotator serving until now (a reload), or nil. When its
// etcd store has the same settings as cfg's, the new rotator uses that
// store rather than opening another, so that takeOver can keep the
// gateway's candidacy: a new store would be a new candidacy, last in
// line, and a leader would hand its leadership to another gateway on
// every reload.
func prepareRotator(ctx context.Context, cfg *policy.Config, ring *keyring, logger *slog.Logger, alog *audit.Log, prev *rotator) (*rotator, error) {
	if len(cfg.Rotating()) == 0 {
		ring.setActive(ctx, nil)
		return nil, nil
	}
	ring.rk.log = logger.With("component", "keyring")
	domains := len(cfg.Rotating())
	shared := cfg.State.Type == policy.StateEtcd
	after := func(rep rotation.Report, err error) {
		// The keyring switches after every pass, from what it recorded;
		// a pass that could not read every domain's state (it failed
		// early, or the store did) leaves the keyring as it is. A shared
		// store's watch switches every gateway, the leader included: a
		// pass's view could be older than the watch's.
		if !shared && len(rep.Active) == domains {
			ring.setActive(context.Background(), rep.Active)
		}
	}
	var setup *rotationSetup
	var err error
	if old := sameEtcdStore(cfg, prev); old != nil {
		setup, err = rotationOn(old, cfg, ring.token(), logger, after, cfg.Rotation.CheckEvery.D(), alog)
		if setup != nil {
			setup.borrowed = true
		}
	} else {
		setup, err = newAuditedRotation(cfg, ring.token(), logger, after, cfg.Rotation.CheckEvery.D(), alog)
	}
	if err != nil {
		return nil, err
	}
	r := &rotator{setup: setup, dataDir: cfg.DataDir, every: cfg.Rotation.CheckEvery.D()}
	actx, cancel := context.WithTimeout(ctx, tokenTimeout)
	defer cancel()
	if shared {
		actx, cancel = context.WithTimeout(ctx, cfg.State.DialTimeout.D())
		defer cancel()
	}
	act, err := setup.rec.Active(actx)
	switch {
	case err != nil && shared && storeUnavailable(err):
		logger.Warn("the etcd state store is unreachable: signing with the keys last seen active (none at a first start) until it answers", "store", setup.store.String(), "error", err)
	case err != nil:
		setup.Close()
		return nil, fmt.Errorf("read the rotation state: %w", err)
	default:
		r.storeUp.Store(true)
		ring.setActive(actx, act)
	}
	return r, nil
}

// sameEtcdStore returns prev's etcd store when cfg's state settings are
// the same, else nil.
func sameEtcdStore(cfg *policy.Config, prev *rotator) *stateStore {
	if cfg.State.Type != policy.StateEtcd || prev == nil || prev.setup.store.etcd == nil {
		return nil
	}
	_, sum, err := etcdSettings(cfg.State, cfg.SMTP.Hostname)
	if err != nil || sum != prev.setup.store.settings {
		return nil
	}
	return prev.setup.store
}

// takeOver moves prev's etcd store and candidacy to r when r shares the
// store (prepareRotator): prev's stop then leaves both alone, and r's
// start runs r's reconciler under the same candidacy, leading or in
// line as before. Called once the reload is certain, before prev stops.
func (r *rotator) takeOver(prev *rotator) {
	if r == nil || prev == nil || r.setup.store != prev.setup.store {
		return
	}
	// prev keeps its pointer, so that its leading() stays true until
	// serve looks at r instead; borrowed tells its stop to leave it.
	r.lead.Store(prev.lead.Load())
	prev.setup.borrowed, r.setup.borrowed = true, false
}

// start runs the passes and the state watch until stop.
func (r *rotator) start(ring *keyring, logger *slog.Logger) {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan struct{})
	var wg sync.WaitGroup
	if e := r.setup.store.etcd; e != nil {
		run := func(ctx context.Context) { r.setup.rec.Run(ctx, r.every) }
		if l := r.lead.Load(); l != nil {
			l.setRun(run)
		} else {
			r.lead.Store(lead(e.NewElection(), run, logger))
		}
		wg.Go(func() { r.watchEtcd(ctx, ring, logger) })
		wg.Go(func() { r.probeEtcd(ctx, logger) })
	} else {
		wg.Go(func() { r.setup.rec.Run(ctx, r.every) })
		wg.Go(func() { r.watch(ctx, ring, logger) })
	}
	go func() { wg.Wait(); close(r.done) }()
}

// stop ends the passes, waiting for the one in flight until deadline at
// most (a token call cannot be interrupted; its step is redone by the
// next pass, wherever it stopped), and closes the store: an etcd
// leadership or lock goes to another gateway at once.
func (r *rotator) stop(deadline time.Time, logger *slog.Logger) {
	if r == nil {
		return
	}
	if r.cancel != nil {
		r.cancel()
		done := r.done
		if l := r.lead.Load(); l != nil && !r.setup.borrowed {
			// Resigns once the pass in flight is done.
			l.cancel()
			watches := done
			done = make(chan struct{})
			go func() { <-watches; <-l.done; close(done) }()
		}
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			logger.Warn("rotation pass still running; not waiting for it")
		}
	}
	if err := r.setup.Close(); err != nil {
		logger.Warn("closing the state store", "error", err)
	}
}

// leading reports whether this gateway runs the reconciler: always with
// bbolt, while it leads the election with etcd.
func (r *rotator) leading() bool {
	if r.setup.store.etcd == nil {
		return true
	}
	l := r.lead.Load()
	return l != nil && l.election.IsLeader()
}

// leadership is a gateway's candidacy in its etcd store's election and
// the loop that runs the reconciler while it leads. It outlives the
// rotator that started it when a reload keeps the store (takeOver).
type leadership struct {
	election *etcdstore.Election
	log      *slog.Logger
	cancel   context.CancelFunc
	done     chan struct{} // closed once resigned

	mu      sync.Mutex
	run     func(context.Context) // the current reconciler's passes
	swapped chan struct{}         // closed when run is replaced
}

// lead campaigns in e until cancel, running run while leading.
func lead(e *etcdstore.Election, run func(context.Context), logger *slog.Logger) *leadership {
	ctx, cancel := context.WithCancel(context.Background())
	l := &leadership{election: e, log: logger, cancel: cancel, done: make(chan struct{}), run: run, swapped: make(chan struct{})}
	go func() {
		defer close(l.done)
		_ = e.Lead(ctx, l.leading)
	}()
	return l
}

// setRun replaces the reconciler: a pass of the old one in flight ends
// before the new one's first, so one gateway never runs two.
func (l *leadership) setRun(run func(context.Context)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.run = run
	close(l.swapped)
	l.swapped = make(chan struct{})
}

// leading runs the current reconciler until ctx ends (the leadership
// does), switching to the next one when setRun replaces it.
func (l *leadership) leading(ctx context.Context) {
	l.log.Info("leading the rotation reconciler")
	for {
		l.mu.Lock()
		run, swapped := l.run, l.swapped
		l.mu.Unlock()
		rctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-swapped:
			case <-rctx.Done():
			}
			cancel()
		}()
		run(rctx)
		cancel()
		select {
		case <-swapped:
			if ctx.Err() == nil {
				continue
			}
		default:
		}
		return
	}
}

// stateProbeEvery is how often serve asks etcd whether it answers: a
// watch whose members all went away stays silent (the client reconnects
// for ever), so the watch alone cannot say the store is gone.
const stateProbeEvery = time.Second

// stateProbeTimeout bounds one probe.
const stateProbeTimeout = 2 * time.Second

// probeEtcd keeps storeUp true while etcd answers.
func (r *rotator) probeEtcd(ctx context.Context, logger *slog.Logger) {
	t := time.NewTicker(stateProbeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, stateProbeTimeout)
		err := r.setup.store.etcd.Check(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		r.setStoreUp(err == nil, err, logger)
	}
}

// setStoreUp records whether the store answers, logging each change.
func (r *rotator) setStoreUp(up bool, err error, logger *slog.Logger) {
	was := r.storeUp.Swap(up)
	switch {
	case was && !up:
		logger.Warn("the etcd state store is unreachable: signing goes on with the keys last seen active; rotation pauses", "store", r.setup.store.String(), "error", err)
	case !was && up:
		logger.Info("the etcd state store answers again", "store", r.setup.store.String(), "revision", r.revision.Load())
	}
}

// watchEtcd keeps the keyring on the active keys the etcd store lists,
// switching within moments of each transaction, whoever made it. While
// the store cannot be read the keyring keeps the last view: signing goes
// on, only the lifecycle pauses.
func (r *rotator) watchEtcd(ctx context.Context, ring *keyring, logger *slog.Logger) {
	view := map[string]map[string]rotation.Key{}
	for ev := range r.setup.store.etcd.Watch(ctx) {
		if ev.Err != nil {
			r.setStoreUp(false, ev.Err, logger)
			continue
		}
		if ev.Full {
			view = map[string]map[string]rotation.Key{}
		}
		for _, k := range ev.Keys {
			if view[k.Domain] == nil {
				view[k.Domain] = map[string]rotation.Key{}
			}
			view[k.Domain][k.Selector] = k
		}
		ring.setActive(ctx, activeIn(view, r.setup.policies))
		r.revision.Store(ev.Revision)
	}
}

// activeIn is the active keys of each rotating domain in view, ordered
// as the store orders them (creation, then selector).
func activeIn(view map[string]map[string]rotation.Key, pols map[string]rotation.Policy) map[string][]rotation.ActiveKey {
	out := make(map[string][]rotation.ActiveKey, len(pols))
	for d := range pols {
		var keys []rotation.Key
		for _, k := range view[d] {
			if k.State == rotation.StateActive {
				keys = append(keys, k)
			}
		}
		slices.SortFunc(keys, func(a, b rotation.Key) int {
			if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
				return c
			}
			return strings.Compare(a.Selector, b.Selector)
		})
		act := []rotation.ActiveKey{}
		for _, k := range keys {
			act = append(act, rotation.ActiveKey{Selector: k.Selector, Algorithm: k.Algorithm})
		}
		out[d] = act
	}
	return out
}

// watch re-reads the active keys whenever the state file changes, so
// that a pass of another process (an emergency rotation in particular)
// switches the keyring within a second.
func (r *rotator) watch(ctx context.Context, ring *keyring, logger *slog.Logger) {
	path := r.setup.store.bolt.Path()
	var last time.Time
	var lastSize int64
	t := time.NewTicker(stateWatchEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		if err != nil || (fi.ModTime().Equal(last) && fi.Size() == lastSize) {
			continue
		}
		actx, cancel := context.WithTimeout(ctx, r.every+stateWatchEvery)
		act, err := r.setup.rec.Active(actx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				logger.Warn("reading the rotation state after it changed", "error", err)
			}
			continue
		}
		last, lastSize = fi.ModTime(), fi.Size()
		ring.setActive(ctx, act)
	}
}
