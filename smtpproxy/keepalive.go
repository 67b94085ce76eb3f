package smtpproxy

import (
	"context"
	"sync"
	"time"
)

// maxJunk is how many NOOPs and RSETs a connection may have sent since it
// last delivered a message and still be reused. Postfix's smtpd counts
// both as junk commands: after 100 without a delivered message each one
// is an error, and at 20 errors it drops the client (measured: the 122nd
// NOOP gets 421 "too many errors"); a connection halfway there is
// replaced instead, so that no transaction inherits the others' count.
const maxJunk = 50

// keepalive keeps the upstream connection of a transaction in use while
// the client sends the message: MAIL and RCPT went upstream at once, but
// the upstream's DATA waits for the whole message, and the upstream drops
// a client silent for longer than its idle limit (Postfix's smtpd_timeout,
// 300s). Every upstream.keepalive after the last command, it sends NOOP.
//
// It is the only user of the connection between start and end; end is
// called before anything else uses it again.
type keepalive struct {
	stop chan struct{}
	done chan struct{}
	once sync.Once
	err  error // the NOOP that failed; read after done
}

func startKeepalive(ctx context.Context, up *upConn, every time.Duration) *keepalive {
	ka := &keepalive{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(ka.done)
		t := time.NewTimer(time.Until(up.lastUsed.Add(every)))
		defer t.Stop()
		for {
			select {
			case <-ka.stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			release := up.dc.bind(ctx)
			err := up.c.Noop()
			if !release() && err == nil {
				err = context.Cause(ctx)
			}
			up.junk++
			up.lastUsed = time.Now()
			if err != nil {
				ka.err = err
				return
			}
			t.Reset(every)
		}
	}()
	return ka
}

// end stops the keepalive, waits for a NOOP in flight, and returns the
// error of the one that failed, if any. It may be called more than once.
func (ka *keepalive) end() error {
	ka.once.Do(func() { close(ka.stop) })
	<-ka.done
	return ka.err
}
