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
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
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
// rotation.check_every, and a watch on the state file, both feeding the
// keyring.
type rotator struct {
	setup   *rotationSetup
	dataDir string
	every   time.Duration
	cancel  context.CancelFunc
	done    chan struct{}
}

// prepareRotator builds the reconciler of cfg (nil when no domain
// rotates) and installs the active keys it records in ring; it starts
// nothing, so that a reload can still refuse.
func prepareRotator(ctx context.Context, cfg *policy.Config, ring *keyring, logger *slog.Logger) (*rotator, error) {
	if len(cfg.Rotating()) == 0 {
		ring.setActive(ctx, nil)
		return nil, nil
	}
	ring.rk.log = logger.With("component", "keyring")
	domains := len(cfg.Rotating())
	setup, err := newRotation(cfg, ring.token(), logger, func(rep rotation.Report, err error) {
		// The keyring switches after every pass, from what it recorded;
		// a pass that could not read every domain's state (it failed
		// early, or the store did) leaves the keyring as it is.
		if len(rep.Active) == domains {
			ring.setActive(context.Background(), rep.Active)
		}
	}, cfg.Rotation.CheckEvery.D())
	if err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, tokenTimeout)
	defer cancel()
	act, err := setup.rec.Active(actx)
	if err != nil {
		return nil, fmt.Errorf("read the rotation state: %w", err)
	}
	ring.setActive(actx, act)
	return &rotator{setup: setup, dataDir: cfg.DataDir, every: cfg.Rotation.CheckEvery.D()}, nil
}

// start runs the passes and the state watch until stop.
func (r *rotator) start(ring *keyring, logger *slog.Logger) {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel, r.done = cancel, make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { r.setup.rec.Run(ctx, r.every) })
	wg.Go(func() { r.watch(ctx, ring, logger) })
	go func() { wg.Wait(); close(r.done) }()
}

// stop ends the passes, waiting for the one in flight until deadline at
// most (a token call cannot be interrupted; its step is redone by the
// next pass, wherever it stopped).
func (r *rotator) stop(deadline time.Time, logger *slog.Logger) {
	if r == nil || r.cancel == nil {
		return
	}
	r.cancel()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-r.done:
	case <-t.C:
		logger.Warn("rotation pass still running; not waiting for it")
	}
}

// watch re-reads the active keys whenever the state file changes, so
// that a pass of another process (an emergency rotation in particular)
// switches the keyring within a second.
func (r *rotator) watch(ctx context.Context, ring *keyring, logger *slog.Logger) {
	path := r.setup.store.Path()
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
