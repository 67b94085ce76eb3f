package smtpproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
)

// resetTimeout bounds the RSET (or QUIT) that cleans up a connection on
// its way back to the pool; it runs in the background.
const resetTimeout = 10 * time.Second

// errNoSTARTTLS is the upstream lacking STARTTLS under tls: required.
var errNoSTARTTLS = errors.New("smtpproxy: upstream does not offer STARTTLS")

// pool holds connections to the upstream. A transaction takes one at
// MAIL and gives it back at its end; a connection whose transaction
// completed (or was RSET) is reused by the next one.
type pool struct {
	cfg      UpstreamSettings
	hostname string
	logger   *slog.Logger

	slots chan struct{} // one per connection in use: upstream.max_connections

	mu     sync.Mutex
	idle   []*upConn // most recently used last
	closed bool
	done   chan struct{}
	wg     sync.WaitGroup
}

// upConn is one upstream connection.
type upConn struct {
	pool      *pool
	c         *smtp.Client
	dc        *deadlineConn
	reused    bool
	tls       bool
	idleSince time.Time
	lastUsed  time.Time // when the last command went upstream
	junk      int       // NOOPs and RSETs since the last delivered message
}

func newPool(cfg UpstreamSettings, hostname string, logger *slog.Logger) *pool {
	p := &pool{
		cfg:      cfg,
		hostname: hostname,
		logger:   logger,
		slots:    make(chan struct{}, cfg.MaxConnections),
		done:     make(chan struct{}),
	}
	p.wg.Add(1)
	go p.janitor()
	return p
}

// get returns a connection ready for MAIL: an idle one if there is one
// and fresh is false, else a new one. It waits for a free slot at most
// connect_timeout.
func (p *pool) get(ctx context.Context, fresh bool) (*upConn, error) {
	wait := time.NewTimer(p.cfg.ConnectTimeout)
	defer wait.Stop()
	select {
	case p.slots <- struct{}{}:
	case <-wait.C:
		return nil, errUpstreamBusy
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if !fresh {
		if uc := p.popIdle(); uc != nil {
			return uc, nil
		}
	}
	uc, err := p.dial(ctx)
	if err != nil {
		<-p.slots
		return nil, err
	}
	return uc, nil
}

func (p *pool) popIdle() *upConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.idle) > 0 {
		uc := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if time.Since(uc.idleSince) < p.cfg.IdleTimeout {
			uc.reused = true
			return uc
		}
		go uc.c.Close()
	}
	return nil
}

// put gives a connection back. clean says the upstream is between
// transactions (after a completed DATA, or a MAIL it refused); dirty but
// healthy connections are RSET in the background first; broken ones
// (nil-safe) are closed.
func (p *pool) put(uc *upConn, state connState) {
	<-p.slots
	if state != connBroken && uc.junk >= maxJunk {
		p.logger.Debug("upstream connection retired: too many NOOPs and RSETs without a delivered message", "upstream", p.cfg.Address, "junk", uc.junk)
		p.quit(uc)
		return
	}
	switch state {
	case connBroken:
		_ = uc.c.Close()
	case connClean:
		p.keep(uc)
	case connDirty:
		started := p.background(func() {
			ctx, cancel := context.WithTimeout(context.Background(), resetTimeout)
			defer cancel()
			release := uc.dc.bind(ctx)
			err := uc.c.Reset()
			uc.junk++
			if !release() || err != nil {
				_ = uc.c.Close()
				return
			}
			p.keep(uc)
		})
		if !started {
			_ = uc.c.Close()
		}
	}
}

// background runs f in a goroutine that close waits for, unless the pool
// is closed already: then it reports false and the caller cleans up
// itself. Checking closed and adding to wg under one lock keeps every
// wg.Add before close's wg.Wait.
func (p *pool) background(f func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		f()
	}()
	return true
}

// dropIdle closes every idle connection. It is called when a reused
// connection turned out dead: idle connections are reused most recently
// used first, so the others have been idle at least as long, to the same
// upstream, and are dead too if it restarted or timed them out.
func (p *pool) dropIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, uc := range idle {
		_ = uc.c.Close()
	}
}

func (p *pool) keep(uc *upConn) {
	p.mu.Lock()
	if p.closed || len(p.idle) >= p.cfg.MaxIdle {
		p.mu.Unlock()
		p.quit(uc)
		return
	}
	uc.idleSince = time.Now()
	p.idle = append(p.idle, uc)
	p.mu.Unlock()
}

// quit says goodbye politely in the background; once the pool is closed,
// it just closes.
func (p *pool) quit(uc *upConn) {
	if !p.background(func() { sayQuit(uc) }) {
		_ = uc.c.Close()
	}
}

func sayQuit(uc *upConn) {
	ctx, cancel := context.WithTimeout(context.Background(), resetTimeout)
	defer cancel()
	release := uc.dc.bind(ctx)
	if err := uc.c.Quit(); err != nil {
		_ = uc.c.Close()
	}
	release()
}

// janitor closes connections idle for longer than idle_timeout, so that
// the upstream does not have to (and we hold no half-closed sockets).
func (p *pool) janitor() {
	defer p.wg.Done()
	t := time.NewTicker(max(p.cfg.IdleTimeout/2, 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return
		case <-t.C:
		}
		p.mu.Lock()
		var expired []*upConn
		kept := p.idle[:0]
		for _, uc := range p.idle {
			if time.Since(uc.idleSince) >= p.cfg.IdleTimeout {
				expired = append(expired, uc)
			} else {
				kept = append(kept, uc)
			}
		}
		p.idle = kept
		p.mu.Unlock()
		for _, uc := range expired {
			p.quit(uc)
		}
	}
}

// close quits the idle connections and makes put close the others; it
// waits for background clean-ups at most until ctx ends.
func (p *pool) close(ctx context.Context) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	for _, uc := range p.idle {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			sayQuit(uc)
		}()
	}
	p.idle = nil
	close(p.done)
	p.mu.Unlock()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// dial connects, reads the greeting, says EHLO and, as configured,
// starts TLS. connect_timeout bounds all of it.
func (p *pool) dial(ctx context.Context) (*upConn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	switch p.cfg.TLS {
	case policy.UpstreamTLSRequired:
		return p.open(ctx, p.tlsConfig(true))
	case policy.UpstreamTLSOpportunistic:
		uc, err := p.open(ctx, p.tlsConfig(false))
		if err == nil || ctx.Err() != nil {
			return uc, err
		}
		// RFC 7435: no TLS (or a failed handshake) is no reason not to
		// deliver when TLS is only opportunistic.
		p.logger.Debug("upstream TLS unavailable, continuing without", "upstream", p.cfg.Address, "error", err)
		return p.open(ctx, nil)
	default:
		return p.open(ctx, nil)
	}
}

func (p *pool) tlsConfig(verify bool) *tls.Config {
	if !verify {
		// Opportunistic TLS authenticates nothing (RFC 7435), so an
		// unverifiable certificate is no reason to fall back to plain text.
		return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}
	}
	name := p.cfg.TLSServerName
	if name == "" {
		name, _, _ = net.SplitHostPort(p.cfg.Address)
	}
	return &tls.Config{ServerName: name, RootCAs: p.cfg.RootCAs, MinVersion: tls.VersionTLS12}
}

func (p *pool) open(ctx context.Context, tlsConfig *tls.Config) (*upConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", p.cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("smtpproxy: connect to upstream %s: %w", p.cfg.Address, err)
	}
	dc := &deadlineConn{Conn: nc}
	release := dc.bind(ctx)
	defer release()

	var c *smtp.Client
	if tlsConfig == nil {
		c = smtp.NewClient(dc)
	} else {
		// go-smtp says EHLO as "localhost" before STARTTLS; the EHLO
		// that counts is the one over TLS below.
		c, err = smtp.NewClientStartTLS(dc, tlsConfig)
		if err != nil {
			_ = dc.Close()
			if strings.Contains(err.Error(), "doesn't support STARTTLS") {
				return nil, errNoSTARTTLS
			}
			return nil, fmt.Errorf("smtpproxy: upstream %s: STARTTLS: %w", p.cfg.Address, err)
		}
	}
	c.CommandTimeout = p.cfg.Timeout
	c.SubmissionTimeout = p.cfg.Timeout
	if err := c.Hello(p.hostname); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("smtpproxy: upstream %s: greeting or EHLO: %w", p.cfg.Address, err)
	}
	return &upConn{pool: p, c: c, dc: dc, tls: tlsConfig != nil, lastUsed: time.Now()}, nil
}

// connState says how a connection goes back to the pool.
type connState int

const (
	connClean  connState = iota // between transactions: reuse as is
	connDirty                   // in a transaction, healthy: RSET first
	connBroken                  // unusable: close
)

// healthy reports whether the upstream connection survives err, an error
// from a command: an SMTP reply other than 421 leaves it usable.
func healthy(err error) bool {
	var se *smtp.SMTPError
	return err == nil || errors.As(err, &se) && se.Code != 421
}

// idleCount is how many connections wait in the pool.
func (p *pool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}
