package smtpproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
)

// session is one SMTP session: from EHLO to QUIT, or to STARTTLS, after
// which go-smtp starts a new one. go-smtp calls its methods from the
// connection's goroutine, except Data during BDAT, which runs in its own
// goroutine while Reset may be called: mu guards tx.
type session struct {
	srv    *Server
	conn   *smtp.Conn
	cc     *clientConn
	remote netip.Addr
	tls    bool
	helo   string

	ctx    context.Context
	cancel context.CancelFunc

	user         string // authenticated user, "" if none
	authFailures int

	mu sync.Mutex
	tx *transaction
}

var (
	_ smtp.Session     = (*session)(nil)
	_ smtp.AuthSession = (*session)(nil)
)

func (s *Server) newSession(c *smtp.Conn) (*session, error) {
	ss := &session{srv: s, conn: c, helo: c.Hostname()}
	nc := c.Conn()
	if tc, ok := nc.(*tls.Conn); ok {
		ss.tls = true
		nc = tc.NetConn()
	}
	cc, ok := nc.(*clientConn)
	if !ok {
		// Only a Server's own listener makes connections.
		return nil, errLocal
	}
	ss.cc = cc
	if ss.tls {
		cc.setTLS()
	}
	if ap, err := netip.ParseAddrPort(nc.RemoteAddr().String()); err == nil {
		ss.remote = ap.Addr().Unmap()
	}
	ss.ctx, ss.cancel = context.WithCancel(s.ctx)
	return ss, nil
}

// client is who is talking, by the current configuration: the
// authenticated user's client, else the client of the source address.
func (ss *session) client(p Policy) *policy.Client {
	if ss.user != "" {
		return p.ClientByUser(ss.user, ss.remote)
	}
	return p.ClientByAddr(ss.remote)
}

func (ss *session) AuthMechanisms() []string {
	if !ss.tls || !ss.srv.state.Load().policy.HasUsers() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

func (ss *session) Auth(mech string) (sasl.Server, error) {
	if !ss.tls {
		// go-smtp refuses AUTH without TLS before asking us; this is a
		// second lock on the same door.
		return nil, &smtp.SMTPError{Code: 538, EnhancedCode: smtp.EnhancedCode{5, 7, 11}, Message: "Encryption required for requested authentication mechanism"}
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, user, password string) error {
			if identity != "" && identity != user {
				return ss.authFailed(user, "authorization identity differs from user")
			}
			return ss.authenticate(user, password)
		}), nil
	case sasl.Login:
		return &loginServer{auth: ss.authenticate}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (ss *session) authenticate(user, password string) error {
	p := ss.srv.state.Load().policy
	// bcrypt is slow on purpose; no more run at once than there are CPUs.
	select {
	case ss.srv.bcrypt <- struct{}{}:
	case <-ss.ctx.Done():
		return errShuttingDown
	}
	cl, err := p.Authenticate(user, password)
	<-ss.srv.bcrypt
	if err != nil {
		return ss.authFailed(user, "bad user name or password")
	}
	if p.ClientByUser(user, ss.remote) == nil {
		// The same reply as a wrong password: the password is not
		// confirmed to someone outside the client's networks.
		return ss.authFailed(user, "client "+cl.Name+" has require_auth and this address is outside its networks")
	}
	ss.user = user
	ss.srv.logger.Info("authenticated", "remote", ss.remote.String(), "user", user, "client", cl.Name)
	return nil
}

// authFailed counts a failure against the connection (max_auth_failures
// closes it) and against its source across connections: the reply waits
// longer with each recent failure from the source, which slows guessing
// on many connections at once.
func (ss *session) authFailed(user, why string) error {
	ss.authFailures++
	delay, recent := ss.srv.auth.failed(ss.cc.src)
	ss.srv.logger.Warn("authentication failed", "remote", ss.remote.String(), "user", user, "reason", why,
		"failures", ss.authFailures, "source_failures", recent, "delay_s", delay.Seconds())
	t := time.NewTimer(delay)
	select {
	case <-t.C:
	case <-ss.ctx.Done():
		t.Stop()
	}
	if ss.authFailures >= ss.srv.state.Load().set.MaxAuthFailures {
		ss.cc.windDown()
		return errTooManyAuthFailures
	}
	return smtp.ErrAuthFailed
}

func (ss *session) Mail(from string, opts *smtp.MailOptions) error {
	ss.endTx("new MAIL") // go-smtp allows MAIL again without RSET
	if ss.cc.windingDown() {
		return errShuttingDown
	}
	st := ss.srv.state.Load()
	cl := ss.client(st.policy)
	if cl == nil {
		// The client sees the 530, then the connection closes: a client
		// that authenticates does so before MAIL (Postfix, Exim), so a
		// second try on this connection would only serve a stranger,
		// which would otherwise hold a connection slot until read_timeout.
		ss.srv.logger.Info("relay refused: unknown client", "remote", ss.remote.String(), "user", ss.user, "helo", ss.helo)
		ss.cc.setInTx(false) // endTx ended any earlier transaction
		ss.cc.windDownWith(replyNotAClient)
		return errAuthRequired
	}
	if err := mailControl(from, opts); err != nil {
		ss.cc.setInTx(false) // endTx ended any earlier transaction
		return err
	}
	tx := &transaction{
		ss: ss, st: st, client: cl, start: time.Now(), mailFrom: from,
	}
	if opts != nil {
		tx.declared = opts.Size
	}
	tx.ctx, tx.cancel = context.WithCancel(ss.ctx)
	ss.cc.setInTx(true)

	err := tx.mail(from, opts)
	if err != nil {
		ss.cc.setInTx(false)
		tx.finish(err)
		return err
	}
	ss.mu.Lock()
	ss.tx = tx
	ss.mu.Unlock()
	return nil
}

func (ss *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	ss.mu.Lock()
	tx := ss.tx
	ss.mu.Unlock()
	if tx == nil {
		return errNoTransaction
	}
	if err := rcptControl(to, opts); err != nil {
		return err
	}
	return tx.rcpt(to, opts)
}

func (ss *session) Data(r io.Reader) error {
	ss.mu.Lock()
	tx := ss.tx
	ss.mu.Unlock()
	if tx == nil {
		return errNoTransaction
	}
	err := tx.data(r)
	ss.mu.Lock()
	if ss.tx == tx {
		ss.tx = nil
	}
	ss.mu.Unlock()
	tx.finish(err)
	return err
}

func (ss *session) Reset() {
	ss.endTx("reset")
	ss.cc.setInTx(false)
}

func (ss *session) Logout() error {
	ss.endTx("connection closed")
	ss.cc.setInTx(false)
	ss.cancel()
	return nil
}

// endTx aborts the transaction in progress, if any. A transaction inside
// Data (BDAT runs it in its own goroutine) is only cancelled: Data
// finishes it.
func (ss *session) endTx(why string) {
	ss.mu.Lock()
	tx := ss.tx
	ss.tx = nil
	ss.mu.Unlock()
	if tx == nil {
		return
	}
	if tx.inData.Load() {
		tx.cancel()
		return
	}
	tx.abort(why)
}

func (c *clientConn) windingDown() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.winding
}

// loginServer is the server side of AUTH LOGIN, which go-sasl lacks:
// "Username:" and "Password:" challenges, or the user name as initial
// response.
type loginServer struct {
	auth func(user, password string) error
	user string
	step int
}

func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		fallthrough
	case 1:
		l.user = string(response)
		l.step = 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.auth(l.user, string(response))
	}
	return nil, false, errors.New("smtpproxy: unexpected AUTH LOGIN response")
}

// logAttrs are the connection's attributes for the transaction log.
func (ss *session) logAttrs() []any {
	a := []any{slog.String("remote", ss.remote.String()), slog.Bool("tls", ss.tls)}
	if ss.user != "" {
		a = append(a, slog.String("user", ss.user))
	}
	return a
}

// isTimeout reports a network timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
