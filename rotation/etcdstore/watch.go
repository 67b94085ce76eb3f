package etcdstore

import (
	"context"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// WatchEvent is what a watching gateway learns: every record (Full), or
// the records written since the previous event, and the store revision
// its view is at after applying them.
type WatchEvent struct {
	// Revision is the etcd revision the watcher's view is at once it has
	// applied this event (for readiness and metrics: two gateways at the
	// same revision see the same keys).
	Revision int64
	// Full means Keys is every record of every domain: the watcher
	// replaces its view. It is the first event, and follows any gap
	// (the watch had to start over: compaction, a member without a
	// leader, a deleted record).
	Full bool
	// Keys are the records: all of them (Full), or those written since
	// the previous event, each as written, Rev set.
	Keys []rotation.Key
	// Err is set when the store could not be read: the watcher keeps its
	// view (signing goes on with the last known active keys) and the
	// watch tries again; a Full event follows when it can.
	Err error
}

// retryWatch is how long Watch waits after a failed read before trying
// again.
const retryWatch = time.Second

// Watch tells the caller of every change of any key's record, within
// moments of its transaction: a Full event first, then the changes. The
// channel is closed when ctx ends. The caller must receive promptly; the
// watch waits for it.
func (s *Store) Watch(ctx context.Context) <-chan WatchEvent {
	ch := make(chan WatchEvent)
	go func() {
		defer close(ch)
		for ctx.Err() == nil {
			rev, ok := s.watchFull(ctx, ch)
			if !ok {
				continue
			}
			s.watchFrom(ctx, ch, rev)
		}
	}()
	return ch
}

func send(ctx context.Context, ch chan<- WatchEvent, ev WatchEvent) bool {
	select {
	case ch <- ev:
		return true
	case <-ctx.Done():
		return false
	}
}

// watchFull reads every record and sends them as a Full event, or sends
// the error and waits before the next try.
func (s *Store) watchFull(ctx context.Context, ch chan<- WatchEvent) (int64, bool) {
	cctx, cancel := s.call(ctx)
	resp, err := s.cli.Get(cctx, s.keysPrefix(), clientv3.WithPrefix())
	cancel()
	ev := WatchEvent{Full: true}
	if err == nil {
		ev.Revision = resp.Header.Revision
		for _, kv := range resp.Kvs {
			k, derr := s.decode(kv.Key, kv.Value, kv.Version)
			if derr != nil {
				err = derr
				break
			}
			ev.Keys = append(ev.Keys, k)
		}
	}
	if err != nil {
		if ctx.Err() == nil {
			send(ctx, ch, WatchEvent{Err: s.wrap(ctx, "watch: read keys", err)})
			t := time.NewTimer(retryWatch)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
		return 0, false
	}
	sortKeys(ev.Keys)
	return ev.Revision, send(ctx, ch, ev)
}

// watchFrom sends the changes after rev until the watch breaks (then
// the caller starts over with a Full event) or ctx ends.
func (s *Store) watchFrom(ctx context.Context, ch chan<- WatchEvent, rev int64) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// WithRequireLeader: a member cut off from its cluster ends the
	// watch (rather than leaving it silent), and the next try reaches
	// another member.
	wch := s.cli.Watch(clientv3.WithRequireLeader(wctx), s.keysPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for wr := range wch {
		if err := wr.Err(); err != nil {
			if ctx.Err() == nil {
				s.log.Debug("watch broke; reading the store again", "err", err)
			}
			return
		}
		ev := WatchEvent{Revision: wr.Header.Revision}
		for _, e := range wr.Events {
			if e.Type != mvccpb.PUT {
				// The store never deletes a record (a destroyed key stays
				// as a tombstone): someone did by hand. Start over.
				s.log.Warn("a record was deleted from the store; reading it again", "key", string(e.Kv.Key))
				return
			}
			k, err := s.decode(e.Kv.Key, e.Kv.Value, e.Kv.Version)
			if err != nil {
				send(ctx, ch, WatchEvent{Err: err})
				return
			}
			ev.Keys = append(ev.Keys, k)
		}
		if len(ev.Keys) == 0 {
			continue // a progress notification
		}
		if !send(ctx, ch, ev) {
			return
		}
	}
}
