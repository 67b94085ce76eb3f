package etcdstore

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"
)

// Election chooses one gateway among those sharing a store, for work
// that one of them must do at a time (the rotation reconciler): a
// concurrency.Election on a lease of the store's TTL. A leader that dies
// or loses etcd for longer than the TTL loses the leadership; the next
// candidate in line takes over when the lease expires.
//
// Leadership is a hint, not a guarantee of exclusivity: for a moment
// around a lease's expiry an old leader that cannot reach etcd may still
// believe it leads. What it writes is still safe: every write is a
// compare-and-set, and a pass holds the store's lock.
type Election struct {
	s *Store

	mu   sync.Mutex
	sess *concurrency.Session // while a candidate or leader
	el   *concurrency.Election
	lost chan struct{} // closed when the current leadership ends
}

// NewElection returns this gateway's candidacy in the store's election,
// identified as the store's Options.Name (and pid and host).
func (s *Store) NewElection() *Election {
	lost := make(chan struct{})
	close(lost)
	return &Election{s: s, lost: lost}
}

func (e *Election) prefix() string { return e.s.prefix + "leader" }

// Campaign waits until this gateway leads, ctx ends, or etcd is out of
// reach for longer than the TTL. Leading already, it returns at once.
func (e *Election) Campaign(ctx context.Context) error {
	if e.IsLeader() {
		return nil
	}
	sess, err := e.s.newSession(ctx, "campaign")
	if err != nil {
		return err
	}
	el, err := e.s.campaign(ctx, sess, e.prefix(), e.s.me())
	if err != nil {
		_ = e.s.closeSession(sess)
		return e.s.wrap(ctx, "campaign", err)
	}
	lost := make(chan struct{})
	e.mu.Lock()
	e.sess, e.el, e.lost = sess, el, lost
	e.mu.Unlock()
	go func() {
		<-sess.Done()
		close(lost)
	}()
	e.s.log.Info("leading", "name", e.s.id.Name)
	return nil
}

// IsLeader reports whether this gateway leads: it won a campaign, has
// not resigned, and its lease is kept alive.
func (e *Election) IsLeader() bool {
	select {
	case <-e.Done():
		return false
	default:
		return true
	}
}

// Done is closed when the current leadership ends: resigned, the store
// closed, or the lease lost (etcd out of reach for the TTL). Not
// leading, it is closed already.
func (e *Election) Done() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lost
}

// Resign gives up leading (or a campaign's place in line) at once: the
// next candidate leads without waiting for the lease to expire.
func (e *Election) Resign(ctx context.Context) error {
	e.mu.Lock()
	sess := e.sess
	e.sess, e.el = nil, nil
	e.mu.Unlock()
	if sess == nil {
		return nil
	}
	e.s.log.Info("resigning", "name", e.s.id.Name)
	// Revoking the lease deletes the leader key and ends the keep-alive
	// (which closes Done).
	return e.s.closeSession(sess)
}

// Leader returns who leads, or ErrNoLeader.
func (e *Election) Leader(ctx context.Context) (Participant, error) {
	p, err := e.s.holder(ctx, e.prefix())
	if err != nil {
		return Participant{}, err
	}
	if p == nil {
		return Participant{}, fmt.Errorf("etcdstore: %w", ErrNoLeader)
	}
	return *p, nil
}

// retryLead is how long Lead waits after a failed campaign (etcd out of
// reach) before it tries again.
const retryLead = time.Second

// Lead runs fn whenever this gateway leads, until ctx ends: it
// campaigns, calls fn with a context that ends when the leadership does,
// and when fn returns (or the leadership is lost) resigns and campaigns
// again. It is how the reconciler loop is gated:
//
//	go el.Lead(ctx, func(ctx context.Context) { rec.Run(ctx, every) })
//
// It returns ctx's error.
func (e *Election) Lead(ctx context.Context, fn func(ctx context.Context)) error {
	for ctx.Err() == nil {
		if err := e.Campaign(ctx); err != nil {
			if ctx.Err() != nil {
				break
			}
			e.s.log.Warn("campaign failed; trying again", "err", err)
			t := time.NewTimer(retryLead)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			continue
		}
		lctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-e.Done():
			case <-lctx.Done():
			}
			cancel()
		}()
		fn(lctx)
		cancel()
		if !e.IsLeader() && ctx.Err() == nil {
			e.s.log.Warn("lost the leadership (etcd lease ended)", "name", e.s.id.Name)
		}
		// Resign with a context of its own: ctx may have ended.
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), e.s.opts.CallTimeout)
		if err := e.Resign(rctx); err != nil {
			e.s.log.Warn("resigning failed; the lease expires by itself", "err", err)
		}
		rcancel()
	}
	return ctx.Err()
}
