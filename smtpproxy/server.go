package smtpproxy

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
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
	"github.com/dkimgw/dkimgw/signer"
)

// KeySource gives the private key of a (domain, selector). An error with a
// Temporary() bool method returning true is a token failure (answered
// 451 4.7.0, or relayed unsigned when on_token_error says so); any other
// error is treated the same way, as the sender should keep the message
// until an operator fixes the key.
type KeySource interface {
	Key(ctx context.Context, domain, selector string) (crypto.Signer, error)
}

// ErrNoActiveKey is what a SignerSource returns (wrapped) for a rotating
// domain that has no active key yet: DNS serves none of its keys, so
// nothing may be signed for it. The relay answers 451 4.7.0 (or relays
// unsigned with on_token_error: relay-unsigned), as for a token failure.
var ErrNoActiveKey = errors.New("no active key yet")

// SignerSource is a KeySource that also knows the signers of domains whose
// keys rotate (policy.Signing.Rotating): their selectors are not in the
// configuration but those of the domain's active keys, which change while
// the relay runs. Signers returns them, selector and key together, as one
// consistent set: a message is signed with the keys active when it is
// signed, never with a mix of two sets.
type SignerSource interface {
	KeySource
	Signers(ctx context.Context, domain string) ([]signer.Identity, error)
}

// Policy is what the relay asks of its configuration: who a client is and
// what happens to its mail. *policy.Config implements it; the relay does
// not read the configuration otherwise (its settings come in [Settings]).
// The *policy.Client values it returns are only handed back to Sign and
// named in logs.
type Policy interface {
	// ClientByAddr returns the client recognised by the source address
	// ip, or nil.
	ClientByAddr(ip netip.Addr) *policy.Client
	// ClientByUser returns the client of an authenticated user when the
	// user may log in from ip, or nil.
	ClientByUser(user string, ip netip.Addr) *policy.Client
	// Authenticate checks a user name and password and returns the
	// user's client, or an error that does not say which was wrong.
	Authenticate(user, password string) (*policy.Client, error)
	// HasUsers reports whether AUTH is to be offered (over TLS).
	HasUsers() bool
	// Sign returns who signs the client's mail From fromDomain, or an
	// *policy.UnauthorizedError when the client may not use the domain.
	Sign(client *policy.Client, fromDomain string) (policy.Signing, error)
	// ActionOnTokenError says what happens to a message whose key cannot
	// be used.
	ActionOnTokenError() policy.TokenErrorAction
	// ActionOnUnauthorized says what happens to a message Sign refused.
	ActionOnUnauthorized() policy.UnauthorizedAction
}

var _ Policy = (*policy.Config)(nil)

// Settings are the relay's limits, timeouts and addresses, each as the
// configuration key it is named after (smtp.*, upstream.*, spool.*)
// describes it. New takes them as they are: the caller applies defaults
// (policy.Load does).
type Settings struct {
	Listen              string // smtp.listen, for ListenAndServe
	Hostname            string // smtp.hostname; empty: the machine's host name
	MaxMessageBytes     int64
	MaxRecipients       int
	MaxLineLength       int
	MaxConnections      int
	MaxConnectionsPerIP int // 0: no limit per source
	ReadTimeout         time.Duration
	WriteTimeout        time.Duration
	DataTimeout         time.Duration
	MaxSessionDuration  time.Duration
	MaxAuthFailures     int
	// Certificate is STARTTLS's certificate (smtp.tls); nil: no STARTTLS
	// and so no AUTH. It is read when a client starts TLS, so a Reload
	// renews it.
	Certificate *tls.Certificate

	Upstream UpstreamSettings
	Spool    SpoolSettings
}

// UpstreamSettings are the upstream.* settings.
type UpstreamSettings struct {
	Address        string
	TLS            policy.UpstreamTLS // empty means none
	TLSServerName  string             // empty: the host of Address
	RootCAs        *x509.CertPool     // nil: the system roots
	Timeout        time.Duration
	ConnectTimeout time.Duration
	IdleTimeout    time.Duration
	Keepalive      time.Duration
	MaxConnections int
	MaxIdle        int
}

// SpoolSettings are the spool.* settings.
type SpoolSettings struct {
	Dir            string // empty: $TMPDIR
	MemoryLimit    int64
	MemoryTotal    int64 // bound on the memory of all messages together; 0: none
	MaxHeaderBytes int
}

// check refuses settings that would make the relay hang or refuse every
// connection: limits and timeouts New is given unset.
func (st *Settings) check() error {
	var bad []string
	need := func(ok bool, key string) {
		if !ok {
			bad = append(bad, key)
		}
	}
	need(st.MaxMessageBytes > 0, "smtp.max_message_bytes")
	need(st.MaxRecipients > 0, "smtp.max_recipients")
	need(st.MaxLineLength > 0, "smtp.max_line_length")
	need(st.MaxConnections > 0, "smtp.max_connections")
	need(st.ReadTimeout > 0, "smtp.read_timeout")
	need(st.WriteTimeout > 0, "smtp.write_timeout")
	need(st.DataTimeout > 0, "smtp.data_timeout")
	need(st.MaxSessionDuration > 0, "smtp.max_session_duration")
	need(st.MaxAuthFailures > 0, "smtp.max_auth_failures")
	need(st.Upstream.Address != "", "upstream.address")
	need(st.Upstream.Timeout > 0, "upstream.timeout")
	need(st.Upstream.ConnectTimeout > 0, "upstream.connect_timeout")
	need(st.Upstream.IdleTimeout > 0, "upstream.idle_timeout")
	need(st.Upstream.Keepalive > 0, "upstream.keepalive")
	need(st.Upstream.MaxConnections > 0, "upstream.max_connections")
	if len(bad) > 0 {
		return fmt.Errorf("smtpproxy: settings without a value: %s (fill them from a loaded configuration, which has defaults)", strings.Join(bad, ", "))
	}
	return nil
}

// Options configure a Server.
type Options struct {
	// Policy makes the relay's decisions. Required.
	Policy Policy
	// Settings are the relay's limits, timeouts and addresses. Required.
	Settings Settings
	// Keys gives the signing keys. Required.
	Keys KeySource
	// Logger receives one line per transaction and the server's own
	// events. Nil: nothing is logged.
	Logger *slog.Logger
	// Now is the signing time (t=). Nil: time.Now.
	Now func() time.Time
	// Observer is told of every transaction's outcome and of refused
	// connections, for metrics. Nil: nobody is told.
	Observer Observer
}

// signTimeout bounds getting the keys and signing one message: a token
// that hangs must not hold the client until its own timeout.
const signTimeout = 30 * time.Second

// Server is the signing relay. Create it with New, run it with Serve or
// ListenAndServe, swap its policy and settings with Reload and stop it
// with Shutdown.
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
	// listeners are closed by Shutdown itself: go-smtp knows a listener
	// only once its Serve has started, and a Shutdown before that would
	// leave Serve accepting for ever.
	listeners []net.Listener

	auth *authThrottle
	// bcrypt bounds the AUTH checks that run at once to the CPUs, so
	// that password guessing on many connections cannot starve signing.
	bcrypt chan struct{}

	ctx    context.Context // ends when the server is closed for good
	cancel context.CancelFunc

	obs                 Observer
	spoolMem, spoolDisk atomic.Int64         // bytes of the messages spooled now
	spoolBudget         *signer.MemoryBudget // spool.memory_total
}

// state is what a Reload swaps: a policy, settings and the upstream pool
// built from them. A transaction keeps the state it started with.
type state struct {
	policy Policy
	set    *Settings
	pool   *pool
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

func fixedOf(s *Settings) fixedSettings {
	return fixedSettings{
		Listen: s.Listen, Hostname: s.Hostname, MaxMessageBytes: s.MaxMessageBytes,
		MaxRecipients: s.MaxRecipients, MaxLineLength: s.MaxLineLength, MaxConnections: s.MaxConnections,
		ReadTimeout: s.ReadTimeout, WriteTimeout: s.WriteTimeout, MaxSessionDuration: s.MaxSessionDuration,
		TLS: s.Certificate != nil,
	}
}

// New builds a server; it does not listen yet.
func New(opts Options) (*Server, error) {
	if opts.Policy == nil {
		return nil, errors.New("smtpproxy: no policy")
	}
	set := opts.Settings // a copy: the caller's struct may change
	if err := set.check(); err != nil {
		return nil, err
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
	hostname := set.Hostname
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
		fixed:  fixedOf(&set),
		conns:  make(map[*clientConn]struct{}),
		perSrc: make(map[netip.Prefix]int),
		auth:   newAuthThrottle(),
		bcrypt: make(chan struct{}, runtime.GOMAXPROCS(0)),
		ctx:    ctx,
		cancel: cancel,
		obs:    opts.Observer,

		spoolBudget: signer.NewMemoryBudget(set.Spool.MemoryTotal),
	}
	if s.obs == nil {
		s.obs = noObserver{}
	}
	s.state.Store(&state{policy: opts.Policy, set: &set, pool: newPool(set.Upstream, hostname, logger)})

	srv := smtp.NewServer(s)
	srv.Domain = hostname
	srv.MaxMessageBytes = set.MaxMessageBytes
	srv.MaxRecipients = set.MaxRecipients
	srv.MaxLineLength = set.MaxLineLength
	srv.ReadTimeout = set.ReadTimeout
	srv.WriteTimeout = set.WriteTimeout
	srv.EnableSMTPUTF8 = true
	srv.EnableDSN = true
	srv.AllowInsecureAuth = false
	srv.ErrorLog = slog.NewLogLogger(logger.Handler(), slog.LevelDebug)
	if set.Certificate != nil {
		srv.TLSConfig = &tls.Config{
			MinVersion: tls.VersionTLS12,
			// The certificate follows the settings, so a reload renews
			// it without a restart.
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return s.state.Load().set.Certificate, nil
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
		return nil
	}
	s.addr = l.Addr()
	ln := &listener{Listener: l, srv: s}
	s.listeners = append(s.listeners, ln)
	s.mu.Unlock()
	s.cleanSpool()
	s.logger.Info("listening", "addr", l.Addr().String())
	err := s.smtp.Serve(ln)
	s.mu.Lock()
	draining := s.draining
	s.mu.Unlock()
	if draining {
		return nil // the listener was closed by Shutdown
	}
	return err
}

// cleanSpool removes the spool files a crash of an earlier run left
// behind, before any transaction of this one can make new ones.
func (s *Server) cleanSpool() {
	dir := s.state.Load().set.Spool.Dir
	removed, err := signer.CleanSpoolDir(dir)
	if err != nil {
		s.logger.Warn("spool leftovers not all removed", "dir", dir, "removed", len(removed), "error", err)
	} else if len(removed) > 0 {
		s.logger.Warn("spool leftovers removed", "dir", dir, "removed", len(removed))
	}
}

// Addr is the address Serve listens on, or nil before Serve.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Policy returns the policy being served.
func (s *Server) Policy() Policy { return s.state.Load().policy }

// Reload swaps in p and set together (p from a configuration already
// loaded and validated, its keys checked) for new transactions;
// transactions in flight finish with the old ones. A change to a setting
// that needs a restart (the listen address, the host name, the limits and
// timeouts of the SMTP side, enabling or disabling TLS) refuses the whole
// reload: the old policy and settings stay.
func (s *Server) Reload(p Policy, set Settings) error {
	if p == nil {
		return errors.New("smtpproxy: reload refused: no policy; the old configuration stays")
	}
	if err := set.check(); err != nil {
		return fmt.Errorf("%w; reload refused, the old configuration stays", err)
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if diff := restartDiff(s.fixed, fixedOf(&set)); len(diff) > 0 {
		return fmt.Errorf("smtpproxy: reload refused: %s changed, which needs a restart; the old configuration stays", strings.Join(diff, ", "))
	}
	old := s.state.Load()
	s.state.Store(&state{policy: p, set: &set, pool: newPool(set.Upstream, s.smtp.Domain, s.logger)})
	s.spoolBudget.SetLimit(set.Spool.MemoryTotal)
	// Connections in use go back to the old pool, which closes them.
	ctx, cancel := context.WithTimeout(context.Background(), resetTimeout)
	defer cancel()
	old.pool.close(ctx)
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
	for _, l := range s.listeners {
		_ = l.Close()
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
	perSrc := s.state.Load().set.MaxConnectionsPerIP
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
