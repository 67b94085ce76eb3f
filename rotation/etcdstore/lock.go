package etcdstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// newSession grants a lease of the store's TTL within the call timeout
// and keeps it alive for as long as the store is open or until the
// session is closed.
func (s *Store) newSession(ctx context.Context, op string) (*concurrency.Session, error) {
	cctx, cancel := s.call(ctx)
	lease, err := s.cli.Grant(cctx, int64(s.ttl))
	cancel()
	if err != nil {
		return nil, s.wrap(ctx, op+": grant a lease", err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(s.ttl), concurrency.WithContext(s.ctx))
	if err != nil {
		s.revoke(lease.ID)
		return nil, s.wrap(ctx, op+": keep the lease alive", err)
	}
	s.mu.Lock()
	s.sessions[sess] = true
	s.mu.Unlock()
	return sess, nil
}

// closeSession stops the keep-alive and revokes the lease, which deletes
// the keys under it (a lock or a candidacy). When etcd cannot be reached
// the lease expires by itself within the TTL.
func (s *Store) closeSession(sess *concurrency.Session) error {
	s.mu.Lock()
	delete(s.sessions, sess)
	s.mu.Unlock()
	sess.Orphan()
	return s.revoke(sess.Lease())
}

func (s *Store) revoke(id clientv3.LeaseID) error {
	ctx, cancel := s.call(context.Background())
	defer cancel()
	_, err := s.cli.Revoke(ctx, id)
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return s.wrap(nil, "revoke the lease", err)
	}
	return nil
}

// campaign runs concurrency.Election.Campaign until this session's
// candidacy is first in line, ctx ends, or the session's lease ends.
// Campaign's own clean-up after a cancellation waits while etcd is out
// of reach; the caller must not, so it is left to finish in the
// background: the caller closes the session, whose lease takes the
// candidacy with it either way.
func (s *Store) campaign(ctx context.Context, sess *concurrency.Session, pfx string, val string) (*concurrency.Election, error) {
	el := concurrency.NewElection(sess, pfx)
	cctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(sess.Ctx(), cancel)
	done := make(chan error, 1)
	go func() { done <- el.Campaign(cctx, val) }()
	var err error
	select {
	case err = <-done:
	case <-cctx.Done():
		err = cctx.Err()
	}
	stop()
	cancel()
	if err == nil {
		return el, nil
	}
	select {
	case <-sess.Done():
		if ctx.Err() == nil {
			return nil, &UnavailableError{Op: "campaign", Endpoints: s.opts.Endpoints, Err: errors.New("the lease ended while waiting: etcd out of reach for longer than the TTL")}
		}
	default:
	}
	return nil, err
}

// holder reads who is first in line under pfx: the lock's holder or the
// leader. Nil when nobody is, or it cannot be read.
func (s *Store) holder(ctx context.Context, pfx string) (*Participant, error) {
	cctx, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, pfx+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return nil, s.wrap(ctx, "read who leads", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	var p Participant
	if err := json.Unmarshal(resp.Kvs[0].Value, &p); err != nil {
		return nil, fmt.Errorf("etcdstore: %s holds an unreadable value: %w", resp.Kvs[0].Key, err)
	}
	return &p, nil
}

func (s *Store) me() string {
	p := s.id
	p.Since = time.Now().UTC()
	v, _ := json.Marshal(p)
	return string(v)
}

func (s *Store) lockPrefix() string { return s.prefix + "lock" }

// Lock takes the store's lock: a candidacy under the lock prefix, on a
// lease of the store's TTL, that is the lock once every earlier one is
// gone. A holder that dies (kill -9, a lost machine, etcd out of its
// reach) loses it when its lease expires. When ctx ends first, the error
// is a *rotation.LockedError naming the holder.
func (s *Store) Lock(ctx context.Context) (func() error, error) {
	sess, err := s.newSession(ctx, "lock")
	if err != nil {
		return nil, err
	}
	el, err := s.campaign(ctx, sess, s.lockPrefix(), s.me())
	if err != nil {
		var owner *rotation.Owner
		if ctx.Err() != nil {
			// ctx has ended: ask with a fresh deadline.
			if p, _ := s.holder(context.WithoutCancel(ctx), s.lockPrefix()); p != nil {
				owner = &rotation.Owner{PID: p.PID, Host: p.Host, Since: p.Since}
			}
		}
		_ = s.closeSession(sess)
		if ctx.Err() != nil {
			return nil, &rotation.LockedError{Path: s.String(), Owner: owner, Err: ctx.Err()}
		}
		return nil, s.wrap(ctx, "lock", err)
	}
	s.mu.Lock()
	s.held = el
	s.mu.Unlock()
	var once sync.Once
	return func() error {
		var err error
		once.Do(func() {
			s.mu.Lock()
			if s.held == el {
				s.held = nil
			}
			s.mu.Unlock()
			// Revoking the lease deletes the candidacy: one call.
			err = s.closeSession(sess)
		})
		return err
	}, nil
}

// Holder returns who holds the lock, or nil when nobody does.
func (s *Store) Holder(ctx context.Context) (*Participant, error) {
	return s.holder(ctx, s.lockPrefix())
}
