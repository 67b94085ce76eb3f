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
// called before anything else uses it again. It is a timer, not a
// goroutine: almost every message ends long before the first NOOP is
// due, and a goroutine per message that only waits cost a start and two
// hand-offs between threads each time.
type keepalive struct {
	ctx   context.Context
	up    *upConn
	every time.Duration

	mu      sync.Mutex
	t       *time.Timer
	ended   bool
	running chan struct{} // closed when the NOOP in flight is done; nil when none is
	err     error         // the NOOP that failed
}

func startKeepalive(ctx context.Context, up *upConn, every time.Duration) *keepalive {
	ka := &keepalive{ctx: ctx, up: up, every: every}
	ka.mu.Lock()
	ka.t = time.AfterFunc(time.Until(up.lastUsed.Add(every)), ka.noop)
	ka.mu.Unlock()
	return ka
}

// noop runs in the timer's goroutine: one NOOP, then the timer is set for
// the next, unless end was called or the NOOP failed.
func (ka *keepalive) noop() {
	ka.mu.Lock()
	if ka.ended || ka.err != nil || ka.ctx.Err() != nil {
		ka.mu.Unlock()
		return
	}
	done := make(chan struct{})
	ka.running = done
	ka.mu.Unlock()

	release := ka.up.dc.bind(ka.ctx)
	err := ka.up.c.Noop()
	if !release() && err == nil {
		err = context.Cause(ka.ctx)
	}
	ka.up.junk++
	ka.up.lastUsed = time.Now()

	ka.mu.Lock()
	ka.running = nil
	if err != nil {
		ka.err = err
	} else if !ka.ended {
		ka.t.Reset(ka.every)
	}
	ka.mu.Unlock()
	close(done)
}

// end stops the keepalive, waits for a NOOP in flight, and returns the
// error of the one that failed, if any. It may be called more than once.
func (ka *keepalive) end() error {
	ka.mu.Lock()
	ka.ended = true
	ka.t.Stop()
	running := ka.running
	ka.mu.Unlock()
	if running != nil {
		<-running
	}
	ka.mu.Lock()
	defer ka.mu.Unlock()
	return ka.err
}
