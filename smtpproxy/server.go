package smtpproxy

import (
	"context"
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
)

// KeySource gives the private key of a (domain, selector). An error with a
// Temporary() bool method returning true is a token failure (answered
// 451 4.7.0, or relayed unsigned when on_token_error says so); any other
// error is treated the same way, as the sender should keep the message
// until an operator fixes the key.
type KeySource interface {
	Key(ctx context.Context, domain, selector string) (crypto.Signer, error)
}

// KeySourceFunc adapts a function to KeySource.
type KeySourceFunc func(ctx context.Context, domain, selector string) (crypto.Signer, error)

// Key calls f.
func (f KeySourceFunc) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	return f(ctx, domain, selector)
}

var _ KeySource = KeySourceFunc(nil)

// Options configure a Server.
type Options struct {
	// Config is the configuration to serve. Required.
	Config *policy.Config
	// Keys gives the signing keys. Required.
	Keys KeySource
	// Logger receives one line per transaction and the server's own
	// events. Nil: nothing is logged.
	Logger *slog.Logger
	// Now is the signing time (t=). Nil: time.Now.
	Now func() time.Time
}

// signTimeout bounds getting the keys and signing one message: a token
// that hangs must not hold the client until its own timeout.
const signTimeout = 30 * time.Second

// Server is the signing relay. Create it with New, run it with Serve or
// ListenAndServe, swap its configuration with Reload and stop it with
// Shutdown.
type Server struct {
	logger *slog.Logger
	keys   KeySource
	now    func() time.Time
	smtp   *smtp.Server
	fixed  fixedSettings

	state atomic.Pointer[state]

	reloadMu sync.Mutex // serialises Reload

	mu       sync.Mutex
	conns    map[*clientConn]struct{}
	perSrc   map[netip.Prefix]int // connections by source (sourceOf)
	draining bool
	addr     net.Addr

	auth *authThrottle
	// bcrypt bounds the AUTH checks that run at once to the CPUs, so
	// that password guessing on many connections cannot starve signing.
	bcrypt chan struct{}

	ctx    context.Context // ends when the server is closed for good
	cancel context.CancelFunc
}

// state is what a Reload swaps: a configuration and the upstream pool
// built from it. A transaction keeps the state it started with.
type state struct {
	cfg  *policy.Config
	pool *pool
}

// fixedSettings are the settings go-smtp reads without locks while it
// serves, so they cannot change without a restart.
type fixedSettings struct {
	Listen             string
	Hostname           string
	MaxMessageBytes    int64
	MaxRecipients      int
	MaxLineLength      int
	MaxConnections     int
	ReadTimeout        time.Duration
	WriteTimeout       time.Duration
	MaxSessionDuration time.Duration
	TLS                bool
}

func fixedOf(cfg *policy.Config) fixedSettings {
	s := cfg.SMTP
	return fixedSettings{
		Listen: s.Listen, Hostname: s.Hostname, MaxMessageBytes: s.MaxMessageBytes,
		MaxRecipients: s.MaxRecipients, MaxLineLength: s.MaxLineLength, MaxConnections: s.MaxConnections,
		ReadTimeout: s.ReadTimeout, WriteTimeout: s.WriteTimeout, MaxSessionDuration: s.MaxSessionDuration,
		TLS: s.TLS != nil,
	}
}

// New builds a server; it does not listen yet.
func New(opts Options) (*Server, error) {
	if opts.Config == nil {
		return nil, errors.New("smtpproxy: no configuration")
	}
	if opts.Keys == nil {
		return nil, errors.New("smtpproxy: no key source")
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("component", "smtpproxy")
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	cfg := opts.Config
	hostname := cfg.SMTP.Hostname
	if hostname == "" {
		var err error
		if hostname, err = os.Hostname(); err != nil {
			return nil, fmt.Errorf("smtpproxy: no smtp.hostname configured and the host name is unknown: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		logger: logger,
		keys:   opts.Keys,
		now:    now,
		fixed:  fixedOf(cfg),
		conns:  make(map[*clientConn]struct{}),
		perSrc: make(map[netip.Prefix]int),
		auth:   newAuthThrottle(),
		bcrypt: make(chan struct{}, runtime.GOMAXPROCS(0)),
		ctx:    ctx,
		cancel: cancel,
	}
	s.state.Store(&state{cfg: cfg, pool: newPool(cfg.Upstream, hostname, logger)})

	srv := smtp.NewServer(s)
	srv.Domain = hostname
	srv.MaxMessageBytes = cfg.SMTP.MaxMessageBytes
	srv.MaxRecipients = cfg.SMTP.MaxRecipients
	srv.MaxLineLength = cfg.SMTP.MaxLineLength
	srv.ReadTimeout = cfg.SMTP.ReadTimeout
	srv.WriteTimeout = cfg.SMTP.WriteTimeout
	srv.EnableSMTPUTF8 = true
	srv.EnableDSN = true
	srv.AllowInsecureAuth = false
	srv.ErrorLog = slog.NewLogLogger(logger.Handler(), slog.LevelDebug)
	if cfg.SMTP.TLS != nil {
		srv.TLSConfig = &tls.Config{
			MinVersion: tls.VersionTLS12,
			// The certificate follows the configuration, so a reload
			// renews it without a restart.
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return s.state.Load().cfg.SMTP.TLS.Certificate(), nil
			},
		}
	}
	s.smtp = srv
	return s, nil
}

// NewSession implements smtp.Backend.
func (s *Server) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return s.newSession(c)
}

// ListenAndServe listens on smtp.listen and serves until Shutdown.
func (s *Server) ListenAndServe() error {
	l, err := net.Listen("tcp", s.fixed.Listen)
	if err != nil {
		return fmt.Errorf("smtpproxy: listen: %w", err)
	}
	return s.Serve(l)
}

// Serve serves connections accepted by l until Shutdown; it then returns
// nil.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		_ = l.Close()
		return smtp.ErrServerClosed
	}
	s.addr = l.Addr()
	s.mu.Unlock()
	s.logger.Info("listening", "addr", l.Addr().String())
	return s.smtp.Serve(&listener{Listener: l, srv: s})
}

// Addr is the address Serve listens on, or nil before Serve.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Config returns the configuration being served.
func (s *Server) Config() *policy.Config { return s.state.Load().cfg }

// Reload swaps in cfg (already loaded and validated, its keys checked)
// for new transactions; transactions in flight finish with the old one.
// A change to a setting that needs a restart (the listen address, the
// host name, the limits and timeouts of the SMTP side, enabling or
// disabling TLS) refuses the whole reload: the old configuration stays.
func (s *Server) Reload(cfg *policy.Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if diff := restartDiff(s.fixed, fixedOf(cfg)); len(diff) > 0 {
		return fmt.Errorf("smtpproxy: reload refused: %s changed, which needs a restart; the old configuration stays", strings.Join(diff, ", "))
	}
	old := s.state.Load()
	s.state.Store(&state{cfg: cfg, pool: newPool(cfg.Upstream, s.smtp.Domain, s.logger)})
	// Connections in use go back to the old pool, which closes them.
	ctx, cancel := context.WithTimeout(context.Background(), resetTimeout)
	defer cancel()
	old.pool.close(ctx)
	s.logger.Info("configuration reloaded", "config", cfg.Path)
	return nil
}

func restartDiff(a, b fixedSettings) []string {
	var d []string
	add := func(changed bool, key string) {
		if changed {
			d = append(d, key)
		}
	}
	add(a.Listen != b.Listen, "smtp.listen")
	add(a.Hostname != b.Hostname, "smtp.hostname")
	add(a.MaxMessageBytes != b.MaxMessageBytes, "smtp.max_message_bytes")
	add(a.MaxRecipients != b.MaxRecipients, "smtp.max_recipients")
	add(a.MaxLineLength != b.MaxLineLength, "smtp.max_line_length")
	add(a.MaxConnections != b.MaxConnections, "smtp.max_connections")
	add(a.ReadTimeout != b.ReadTimeout, "smtp.read_timeout")
	add(a.WriteTimeout != b.WriteTimeout, "smtp.write_timeout")
	add(a.MaxSessionDuration != b.MaxSessionDuration, "smtp.max_session_duration")
	add(a.TLS != b.TLS, "smtp.tls (on/off)")
	return d
}

// Shutdown stops accepting connections, lets each transaction in flight
// finish (an idle connection is closed at once with 421) and returns when
// all connections are closed. When ctx ends first, the remaining
// connections are closed (their senders retry: nothing was acknowledged)
// and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	conns := make([]*clientConn, 0, len(s.conns))
	for cc := range s.conns {
		conns = append(conns, cc)
	}
	s.mu.Unlock()
	for _, cc := range conns {
		cc.windDown()
	}
	err := s.smtp.Shutdown(ctx)
	if errors.Is(err, smtp.ErrServerClosed) {
		err = nil
	}
	if err != nil {
		s.logger.Warn("shutdown grace period over, closing connections", "connections", s.connCount())
		s.cancel() // aborts transactions: their upstream commands fail at once
		_ = s.smtp.Close()
	}
	s.cancel()
	closeCtx, cancel := context.WithTimeout(context.Background(), resetTimeout)
	defer cancel()
	s.state.Load().pool.close(closeCtx)
	return err
}

// Replies to a connection refused at accept time.
const (
	replyTooManyConns   = "421 4.3.2 Too many connections, try again later\r\n"
	replyTooManyFromSrc = "421 4.7.0 Too many connections from your address, try again later\r\n"
)

// track admits a new connection, or returns the reply that refuses it:
// smtp.max_connections in all, smtp.max_connections_per_ip per source.
func (s *Server) track(nc net.Conn) (*clientConn, string) {
	src := sourceOf(nc.RemoteAddr())
	perSrc := s.state.Load().cfg.SMTP.MaxConnectionsPerIP
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) >= s.fixed.MaxConnections {
		return nil, replyTooManyConns
	}
	// A listener that is not TCP gives no address to count by.
	if perSrc > 0 && src.IsValid() && s.perSrc[src] >= perSrc {
		return nil, replyTooManyFromSrc
	}
	cc := &clientConn{Conn: nc, srv: s, src: src, winding: s.draining}
	s.conns[cc] = struct{}{}
	s.perSrc[src]++
	cc.timer = time.AfterFunc(s.fixed.MaxSessionDuration, cc.windDown)
	return cc, ""
}

func (s *Server) untrack(cc *clientConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.conns[cc]; !ok {
		return
	}
	delete(s.conns, cc)
	if s.perSrc[cc.src]--; s.perSrc[cc.src] <= 0 {
		delete(s.perSrc, cc.src)
	}
}

func (s *Server) connCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}
