package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/smtpproxy"
)

// serveObs is what serve's metrics and readiness read: the current
// configuration, reconciler and relay, swapped at each reload.
type serveObs struct {
	m    *metrics
	ring *keyring
	cfg  atomic.Pointer[policy.Config]
	rot  atomic.Pointer[rotator]
	srv  atomic.Pointer[smtpproxy.Server]
	// driftSink is told of drift: the audit log.
	driftSink driftSink
}

func newServeObs(cfg *policy.Config, ring *keyring, rot *rotator) *serveObs {
	o := &serveObs{ring: ring}
	o.cfg.Store(cfg)
	o.rot.Store(rot)
	o.m = newMetrics(metricsSources{
		token: ring.token,
		connections: func() int {
			if s := o.srv.Load(); s != nil {
				return s.Connections()
			}
			return 0
		},
		spool: func() (int64, int64) {
			if s := o.srv.Load(); s != nil {
				return s.SpoolBytes()
			}
			return 0, 0
		},
		keys:  o.keys,
		state: o.state,
		fixed: func() map[string][]string {
			out := map[string][]string{}
			for d, dom := range o.cfg.Load().Domains {
				if dom.Rotation == nil {
					out[d] = dom.Selectors
				}
			}
			return out
		},
	})
	ring.observeSign = o.m.observeSign
	return o
}

// keys reads the rotating domains' keys and their policies' intervals.
func (o *serveObs) keys(ctx context.Context) ([]rotation.Status, map[string]time.Duration, error) {
	rot := o.rot.Load()
	if rot == nil {
		return nil, nil, nil
	}
	st, err := rot.setup.rec.Status(ctx)
	if err != nil {
		return nil, nil, err
	}
	iv := make(map[string]time.Duration, len(rot.setup.policies))
	for d, p := range rot.setup.policies {
		iv[d] = p.Interval
	}
	return st, iv, nil
}

// state tells what this gateway knows of the shared (etcd) state store;
// ok is false without one.
func (o *serveObs) state(ctx context.Context) (stateInfo, bool) {
	rot := o.rot.Load()
	if rot == nil || rot.setup.store.etcd == nil {
		return stateInfo{}, false
	}
	st := stateInfo{up: rot.storeUp.Load(), leading: rot.leading(), revision: rot.revision.Load()}
	// Asking who leads takes a call: not while etcd is known to be out
	// of reach, where it would only wait for its timeout.
	if !st.up {
		return st, true
	}
	if p, err := rot.setup.store.etcd.NewElection().Leader(ctx); err == nil {
		st.leader = fmt.Sprintf("%s[%d]@%s", p.Name, p.PID, p.Host)
	}
	return st, true
}

// stateCheck is /readyz's report of the shared state store. It never
// makes the gateway unready: with etcd out of reach it still signs, with
// the keys last seen active.
func (o *serveObs) stateCheck(context.Context) error {
	rot := o.rot.Load()
	if rot == nil || rot.setup.store.etcd == nil || rot.storeUp.Load() {
		return nil
	}
	return fmt.Errorf("the etcd state store is unreachable: signing with the keys last seen active (revision %d); rotation paused", rot.revision.Load())
}

// readyChecks are /readyz's conditions: the configuration is loaded, the
// token gives a free, logged-in session, the upstream accepts a TCP
// connection (for the relay; a milter-only gateway has no upstream).
func (o *serveObs) readyChecks(relay bool) []readyCheck {
	checks := []readyCheck{
		{name: "config", check: func(context.Context) error {
			if o.cfg.Load() == nil {
				return errors.New("no configuration loaded")
			}
			return nil
		}},
		{name: "token", check: func(ctx context.Context) error {
			return o.ring.token().Check(ctx)
		}},
		{name: "state", check: o.stateCheck, advisory: true},
	}
	// A milter hands nothing on: its MTA delivers.
	if relay {
		checks = append(checks, readyCheck{name: "upstream", check: func(ctx context.Context) error {
			u := o.cfg.Load().Upstream
			if dir := u.CaptureDir(); dir != "" {
				// Nothing to dial: the directory must still be there.
				if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
					return fmt.Errorf("capture directory %s is gone", dir)
				}
				return nil
			}
			return dialCheck(func() string { return u.Address })(ctx)
		}})
	}
	return checks
}

// sameAdminListener reports whether the admin listener of next is the
// one serving (a new bearer token is taken at reload; a new address or
// certificate needs a restart).
func sameAdminListener(next, cur *policy.Config) bool {
	if next.Admin.Addr() != cur.Admin.Addr() || (next.Admin.TLS == nil) != (cur.Admin.TLS == nil) {
		return false
	}
	if t := next.Admin.TLS; t != nil && (t.CertFile != cur.Admin.TLS.CertFile || t.KeyFile != cur.Admin.TLS.KeyFile) {
		return false
	}
	return true
}
