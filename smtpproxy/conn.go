package smtpproxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// past is a deadline that has already passed: setting it wakes a blocked
// Read or Write at once.
var past = time.Unix(1, 0)

// clientConn is a client connection as go-smtp sees it. go-smtp sets a
// read deadline before every command, BDAT chunks included, so the rules
// about how long a client may take live in SetReadDeadline and Read:
//
//   - Winding down (shutdown, or the session is over max_session_duration):
//     a read *between* transactions fails at once (the client gets 421 and
//     the connection closes); a transaction in flight may go on, but for
//     at most data_timeout, so that no client keeps a session alive by
//     trickling commands or chunks.
//   - While a message is received (DATA or BDAT), no read deadline goes
//     past the transfer's data deadline, whatever go-smtp asks for: each
//     BDAT command would otherwise get a fresh read_timeout.
//   - A read that fails during a transfer fails it for good: the read
//     returns an *smtp.SMTPError, errDataTimeout or errDataIncomplete, and
//     so does every later read, so the rest of the message is not taken
//     for commands and the connection closes. go-smtp reads a BDAT chunk
//     through an io.LimitReader: it would answer a read error other than
//     an *smtp.SMTPError with 554, and take an EOF (the client gone in
//     the middle of the chunk) for the end of the chunk, relaying a
//     truncated message if it was the LAST one.
type clientConn struct {
	net.Conn
	srv *Server
	src netip.Prefix // the source it is counted under (sourceOf)

	mu         sync.Mutex
	inTx       bool      // between MAIL and the end of the transaction
	winding    bool      // shutting down, or the session is over its time
	windLimit  time.Time // winding down in a transaction: when reads end
	dataLimit  time.Time // a message is being received: when it must be in
	dataFailed bool      // a transfer timed out: nothing more is read
	deadline   time.Time // the read deadline in force
	isTLS      bool      // the session runs over STARTTLS: no raw writes
	said421    bool
	bye        string // the 421 reply that closes it; "" for replyShuttingDown

	timer     *time.Timer
	closeOnce sync.Once
}

func (c *clientConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.setReadDeadlineLocked(t)
}

// setReadDeadlineLocked applies t, or an earlier deadline the rules above
// impose. It runs under mu, so that a deadline computed before a limit
// changed cannot overwrite one computed after.
func (c *clientConn) setReadDeadlineLocked(t time.Time) error {
	switch {
	case c.dataFailed || c.winding && !c.inTx:
		t = past
	default:
		for _, l := range []time.Time{c.windLimit, c.dataLimit} {
			if !l.IsZero() && (t.IsZero() || t.After(l)) {
				t = l
			}
		}
	}
	c.deadline = t
	return c.Conn.SetReadDeadline(t)
}

func (c *clientConn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.SetReadDeadline(t)
}

func (c *clientConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err == nil || n > 0 {
		return n, err
	}
	c.mu.Lock()
	if c.dataFailed || !c.dataLimit.IsZero() {
		c.dataFailed = true
		c.mu.Unlock()
		if isTimeout(err) {
			return 0, errDataTimeout
		}
		return 0, errDataIncomplete
	}
	overTime := !c.windLimit.IsZero() && !time.Now().Before(c.windLimit)
	closing := c.winding && (!c.inTx || overTime)
	say := closing && !c.isTLS && !c.said421
	if say {
		c.said421 = true
	}
	bye := c.bye
	c.mu.Unlock()
	if bye == "" {
		bye = replyShuttingDown
	}
	if !closing {
		return n, err
	}
	if say {
		// go-smtp is blocked in this Read, so nothing else writes now. A
		// TLS session cannot be written to from below TLS: there the
		// timeout error makes go-smtp send its own 421.
		_ = c.Conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c.Conn, bye)
		return 0, io.EOF
	}
	return n, err
}

// replyShuttingDown closes a connection that winds down.
const replyShuttingDown = "421 4.3.2 Service shutting down, closing connection\r\n"

// windDown makes the connection close after its transaction in flight,
// which gets at most data_timeout more, or at once when there is none.
func (c *clientConn) windDown() { c.windDownWith("") }

// windDownWith is windDown with bye (a full reply line) as the 421 sent
// before closing, instead of replyShuttingDown. The reply being written
// now still reaches the client: only the next read fails.
func (c *clientConn) windDownWith(bye string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.winding = true
	if bye != "" && c.bye == "" {
		c.bye = bye
	}
	if c.inTx && c.windLimit.IsZero() {
		c.windLimit = time.Now().Add(c.srv.state.Load().set.DataTimeout)
	}
	_ = c.setReadDeadlineLocked(c.deadline)
}

func (c *clientConn) setInTx(v bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inTx = v
	switch {
	case v && c.winding && c.windLimit.IsZero():
		// The transaction started as the connection began to wind down.
		c.windLimit = time.Now().Add(c.srv.state.Load().set.DataTimeout)
	case !v && c.winding:
		_ = c.setReadDeadlineLocked(past)
	}
}

// startData puts the transfer of a message under deadline, until
// endData.
func (c *clientConn) startData(deadline time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dataLimit = deadline
	_ = c.setReadDeadlineLocked(c.deadline)
}

func (c *clientConn) endData() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dataLimit = time.Time{}
}

func (c *clientConn) setTLS() {
	c.mu.Lock()
	c.isTLS = true
	c.mu.Unlock()
}

func (c *clientConn) Close() error {
	c.closeOnce.Do(func() {
		if c.timer != nil {
			c.timer.Stop()
		}
		c.srv.untrack(c)
	})
	return c.Conn.Close()
}

// listener admits at most smtp.max_connections clients; the others get a
// 421 and are closed, instead of piling up in the accept queue.
type listener struct {
	net.Listener
	srv       *Server
	closeOnce sync.Once
}

// Close closes the listener once: Shutdown closes it, then go-smtp's
// Shutdown does, and only the first may say how it went.
func (l *listener) Close() error {
	err := error(nil)
	l.closeOnce.Do(func() { err = l.Listener.Close() })
	return err
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cc, refusal := l.srv.track(nc)
		if cc != nil {
			return cc, nil
		}
		reason, metric := "too many connections", RefusedMaxConnections
		if refusal == replyTooManyFromSrc {
			reason, metric = "too many connections from this source", RefusedMaxConnectionsPerIP
		}
		l.srv.obs.ConnectionRefused(metric)
		l.srv.logger.Warn("connection refused", "reason", reason, "remote", nc.RemoteAddr().String())
		_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = io.WriteString(nc, refusal)
		_ = nc.Close()
	}
}

// deadlineConn is an upstream connection whose deadlines are capped by a
// context while one is bound: go-smtp's client sets its own deadlines
// before every command, which would otherwise outlive a cancelled ctx.
type deadlineConn struct {
	net.Conn

	mu    sync.Mutex
	limit time.Time // zero: no cap
}

func (c *deadlineConn) clamp(t time.Time) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.limit.IsZero() && (t.IsZero() || t.After(c.limit)) {
		return c.limit
	}
	return t
}

func (c *deadlineConn) SetDeadline(t time.Time) error { return c.Conn.SetDeadline(c.clamp(t)) }
func (c *deadlineConn) SetReadDeadline(t time.Time) error {
	return c.Conn.SetReadDeadline(c.clamp(t))
}
func (c *deadlineConn) SetWriteDeadline(t time.Time) error {
	return c.Conn.SetWriteDeadline(c.clamp(t))
}

// bind caps the connection's deadlines by ctx until release is called.
// release reports false when ctx ended while bound: the connection may
// then be mid-command and must not be reused.
func (c *deadlineConn) bind(ctx context.Context) (release func() bool) {
	c.mu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		c.limit = dl
	}
	limit := c.limit
	c.mu.Unlock()
	if !limit.IsZero() {
		_ = c.Conn.SetDeadline(limit)
	}
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.limit = past
		c.mu.Unlock()
		_ = c.Conn.SetDeadline(past)
	})
	return func() bool {
		ok := stop() && ctx.Err() == nil
		c.mu.Lock()
		c.limit = time.Time{}
		c.mu.Unlock()
		_ = c.Conn.SetDeadline(time.Time{})
		return ok
	}
}
