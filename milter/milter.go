package milter

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	gomilter "github.com/d--j/go-milter"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/signer"
)

// Keys gives the signers of a domain: Key for the selectors the
// configuration names, Signers for a domain whose keys rotate (its
// active keys, as one consistent set). An error with a Temporary() bool
// method is a token failure; any other error is handled the same way
// (milter.on_token_error), since the MTA should keep the message until
// an operator fixes the key.
type Keys interface {
	Key(ctx context.Context, domain, selector string) (crypto.Signer, error)
	Signers(ctx context.Context, domain string) ([]signer.Identity, error)
}

// Options configures New.
type Options struct {
	// Config is the configuration: its clients, domains, spool
	// (max_header_bytes) and milter sections. Required.
	Config *policy.Config
	// Keys gives the keys. Required.
	Keys Keys
	// Logger receives one line per message and the server's own events.
	// Nil: nothing is logged.
	Logger *slog.Logger
	// Now is the signing time (t=). Nil: time.Now.
	Now func() time.Time
	// Observer is told what became of each message the milter read to
	// its end, for metrics. Nil: nobody is told.
	Observer Observer
	// Refusals is told of each message a client may not sign for its
	// From domain. Nil: nobody is told.
	Refusals Refusals
}

// Refusals is told of each message whose client may not use its From
// domain (a *policy.UnauthorizedError), whatever milter.on_unauthorized
// then does with it: serve counts them for the audit log's summary, as
// it counts the relay's. A sender no client matches is not one (the
// relay refuses it before any message, and through an MTA it is most
// mail from outside).
type Refusals interface {
	Unauthorized(client, fromDomain string)
}

// Observer is told of every message the milter decided on at its end.
// Messages let go at MAIL FROM (an unknown client with on_unauthorized:
// accept) are not reported.
type Observer interface {
	Message(Report)
}

// Outcome is what became of a message. The values are the relay's, so
// that one metric can count both.
type Outcome string

const (
	OutcomeSigned   Outcome = "signed"           // accepted with signatures
	OutcomeUnsigned Outcome = "relayed-unsigned" // accepted unchanged
	OutcomeTempfail Outcome = "tempfailed"       // 4xx through the MTA
	OutcomeRefused  Outcome = "refused"          // 5xx through the MTA
)

// Report is one message's outcome. Its names come from the
// configuration, never from the message.
type Report struct {
	// Client is the configured name of the client; "" for none.
	Client string
	// Domain is the signing domain the policy picked; "" when the From
	// domain has none or could not be read.
	Domain     string
	Outcome    Outcome
	Signatures []Signature
}

// Signature is one DKIM signature made.
type Signature struct {
	Domain, Selector string
	// Algorithm is the a= tag: "rsa-sha256" or "ed25519-sha256".
	Algorithm string
}

// Server is a milter server. Its configuration can be replaced while it
// serves ([Server.Reload]); the timeouts of the milter section are read
// once, by New.
type Server struct {
	cfg  atomic.Pointer[policy.Config]
	keys Keys
	log  *slog.Logger
	now  func() time.Time
	obs  Observer
	ref  Refusals
	srv  *gomilter.Server
}

// actions are what the milter may do: add (and so insert) header fields.
const actions = gomilter.OptAddHeader

// protocol asks the MTA to leave out what the milter never reads (HELO,
// each RCPT, unknown commands, DATA), to expect no reply to each header
// field, and to pass header values with their leading space, as written.
const protocol = gomilter.OptNoHelo | gomilter.OptNoRcptTo | gomilter.OptNoUnknown | gomilter.OptNoData |
	gomilter.OptNoHeaderReply | gomilter.OptHeaderLeadingSpace

// New returns a Server; Serve starts it.
func New(opts Options) (*Server, error) {
	if opts.Config == nil || opts.Keys == nil {
		return nil, errors.New("milter: Config and Keys are required")
	}
	s := &Server{keys: opts.Keys, log: opts.Logger, now: opts.Now, obs: opts.Observer, ref: opts.Refusals}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "milter")
	if s.now == nil {
		s.now = time.Now
	}
	s.cfg.Store(opts.Config)
	m := opts.Config.Milter
	s.srv = gomilter.NewServer(
		gomilter.WithMilter(func() gomilter.Milter { return &session{srv: s} }),
		gomilter.WithActions(actions),
		gomilter.WithProtocols(protocol),
		gomilter.WithNegotiationCallback(negotiate),
		// {auth_authen} says who logged in; i is the queue ID, for the log.
		gomilter.WithMacroRequest(gomilter.StageMail, []gomilter.MacroName{gomilter.MacroAuthAuthen, gomilter.MacroQueueId}),
		gomilter.WithMacroRequest(gomilter.StageEOM, []gomilter.MacroName{gomilter.MacroQueueId}),
		gomilter.WithReadTimeout(m.ReadTimeout),
		gomilter.WithWriteTimeout(m.WriteTimeout),
	)
	return s, nil
}

// negotiate takes what the milter wants and the MTA offers: an MTA
// without some protocol option (an older Sendmail without leading-space
// headers) still gets a working milter. Only adding header fields is
// indispensable.
func negotiate(mtaVersion, milterVersion uint32, mtaActions, milterActions gomilter.OptAction, mtaProtocol, milterProtocol gomilter.OptProtocol, offered gomilter.DataSize) (uint32, gomilter.OptAction, gomilter.OptProtocol, gomilter.DataSize, error) {
	if mtaActions&gomilter.OptAddHeader == 0 {
		return 0, 0, 0, 0, errors.New("milter: the MTA does not let milters add header fields (SMFIF_ADDHDRS)")
	}
	return min(mtaVersion, milterVersion), milterActions & mtaActions, milterProtocol & mtaProtocol, offered, nil
}

// Reload replaces the configuration for the messages that start from
// now on.
func (s *Server) Reload(cfg *policy.Config) { s.cfg.Store(cfg) }

// Serve serves milter connections on l until Shutdown or Close.
func (s *Server) Serve(l net.Listener) error {
	err := s.srv.Serve(l)
	if errors.Is(err, gomilter.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting connections and waits, until ctx is done, for
// the open ones to finish their message; then it closes them.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		_ = s.srv.Close() // the grace is over; the MTA applies its default action
	}
	return err
}

// session is the state of one milter connection, and of its message.
type session struct {
	gomilter.NoOpMilter
	srv *Server

	addr netip.Addr // the SMTP client's address; invalid when unknown

	cfg     *policy.Config // the configuration of this message
	client  *policy.Client // nil: not one of the clients
	who     string         // how the client was recognised, for the log
	stream  *signer.Stream
	leadSpc bool
	queueID string
	started time.Time
}

var _ gomilter.Milter = (*session)(nil)

func (m *session) Connect(host, family string, port uint16, addr string, _ gomilter.Modifier) (*gomilter.Response, error) {
	m.addr = netip.Addr{}
	if family == "tcp4" || family == "tcp6" {
		if a, err := netip.ParseAddr(strings.Trim(addr, "[]")); err == nil {
			m.addr = a.Unmap()
		}
	}
	return gomilter.RespContinue, nil
}

func (m *session) MailFrom(_, _ string, mod gomilter.Modifier) (*gomilter.Response, error) {
	m.reset()
	m.cfg = m.srv.cfg.Load()
	m.started = time.Now()
	m.queueID = mod.Get(gomilter.MacroQueueId)
	if user := mod.Get(gomilter.MacroAuthAuthen); user != "" {
		// The MTA checked the password; the user must still be allowed
		// from where it logged in (require_auth networks).
		m.client, m.who = m.cfg.ClientByUser(user, m.addr), "user "+user
	}
	if m.client == nil && m.addr.IsValid() {
		m.client, m.who = m.cfg.ClientByAddr(m.addr), "address "+m.addr.String()
	}
	if m.client == nil && m.cfg.Milter.OnUnauthorized == policy.MilterAccept {
		// Nothing of this message will be signed or refused: the MTA can
		// stop sending it here.
		return gomilter.RespAccept, nil
	}
	m.leadSpc = mod.Protocol()&gomilter.OptHeaderLeadingSpace != 0
	m.stream = signer.NewStream(signer.SpoolOptions{MaxHeaderBytes: m.cfg.Spool.MaxHeaderBytes})
	return gomilter.RespContinue, nil
}

func (m *session) Header(name, value string, _ gomilter.Modifier) (*gomilter.Response, error) {
	if m.stream == nil {
		return gomilter.RespContinue, nil
	}
	// The field as the MTA will write it: name, colon, value. Without
	// leading-space mode the MTA took the one space after the colon off.
	sep := ":"
	if !m.leadSpc {
		sep = ": "
	}
	// Errors stick in the stream; EndOfMessage reads them.
	_, _ = m.stream.Write([]byte(name + sep + value + "\r\n"))
	return gomilter.RespContinue, nil
}

func (m *session) Headers(_ gomilter.Modifier) (*gomilter.Response, error) {
	if m.stream != nil {
		_, _ = m.stream.Write([]byte("\r\n"))
	}
	return gomilter.RespContinue, nil
}

func (m *session) BodyChunk(chunk []byte, _ gomilter.Modifier) (*gomilter.Response, error) {
	if m.stream != nil {
		_, _ = m.stream.Write(chunk)
	}
	return gomilter.RespContinue, nil
}

func (m *session) EndOfMessage(mod gomilter.Modifier) (*gomilter.Response, error) {
	defer m.reset()
	if m.stream == nil {
		return gomilter.RespAccept, nil
	}
	if id := mod.Get(gomilter.MacroQueueId); id != "" {
		m.queueID = id
	}
	rep := Report{Client: m.clientName()}
	resp, fields, outcome, err := m.decide(&rep)
	attrs := []any{"queue_id", m.queueID, "client", m.clientName(), "recognised_by", m.who, "outcome", outcome, "duration_s", time.Since(m.started).Seconds()}
	if err != nil {
		attrs = append(attrs, "error", err)
	}
	// Insert in reverse at index 0, so that the fields end up first and
	// in Sign's order.
	for i := len(fields) - 1; i >= 0; i-- {
		name, value, _ := strings.Cut(strings.TrimSuffix(fields[i], "\r\n"), ":")
		if !m.leadSpc {
			value = strings.TrimPrefix(value, " ")
		}
		if ierr := mod.InsertHeader(0, name, value); ierr != nil {
			// The connection to the MTA broke: it applies its default
			// action.
			m.srv.log.Warn("milter: message not signed", append(attrs, "insert_error", ierr)...)
			return nil, fmt.Errorf("milter: insert DKIM-Signature: %w", ierr)
		}
	}
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelWarn
	}
	m.srv.log.Log(context.Background(), level, "message", attrs...)
	if m.srv.obs != nil {
		m.srv.obs.Message(rep)
	}
	return resp, nil
}

// decide returns the answer to a whole message, the DKIM-Signature
// fields to insert, the outcome for the log, and the error behind an
// unsigned outcome.
func (m *session) decide(rep *Report) (*gomilter.Response, []string, string, error) {
	cfg := m.cfg
	rep.Outcome = OutcomeUnsigned
	msg, err := m.stream.Finish()
	if err != nil {
		if ref, ok := errors.AsType[*signer.RefusedError](err); ok && m.client != nil {
			// One of the clients sent it: like the relay, refuse what
			// cannot carry a meaningful signature.
			rep.Outcome = OutcomeRefused
			return reply(550, "5.6.0 Message not signed: "+ref.Reason), nil, "refused: malformed", err
		}
		// Not ours to judge.
		return gomilter.RespAccept, nil, "passed unsigned: malformed, not from a client", err
	}
	d, ok := cfg.SigningDomain(msg.FromDomain())
	if !ok {
		return gomilter.RespAccept, nil, "passed unsigned: From domain has no keys", nil
	}
	rep.Domain = d
	signing, err := cfg.Sign(m.client, msg.FromDomain())
	if ue, ok := errors.AsType[*policy.UnauthorizedError](err); ok && m.client != nil && m.srv.ref != nil {
		m.srv.ref.Unauthorized(ue.Client, ue.FromDomain)
	}
	if err != nil {
		switch cfg.Milter.OnUnauthorized {
		case policy.MilterReject:
			rep.Outcome = OutcomeRefused
			return reply(550, "5.7.1 Not authorized to send mail From domain "+msg.FromDomain()), nil, "refused: unauthorized", err
		case policy.MilterTempfail:
			rep.Outcome = OutcomeTempfail
			return reply(451, "4.7.1 Not authorized to send mail From domain "+msg.FromDomain()+" now"), nil, "tempfailed: unauthorized", err
		}
		return gomilter.RespAccept, nil, "passed unsigned: unauthorized (milter.on_unauthorized: accept)", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Milter.SignTimeout)
	defer cancel()
	fields, sigs, err := m.sign(ctx, msg, signing)
	if err != nil {
		if cfg.Milter.OnTokenError == policy.MilterAccept {
			return gomilter.RespAccept, nil, "passed unsigned: signing failed (milter.on_token_error: accept)", err
		}
		rep.Outcome = OutcomeTempfail
		return reply(451, "4.7.0 Cannot sign the message now, try again later"), nil, "tempfailed: signing failed", err
	}
	rep.Outcome, rep.Signatures = OutcomeSigned, sigs
	return gomilter.RespAccept, fields, "signed d=" + signing.Domain, nil
}

func (m *session) sign(ctx context.Context, msg *signer.Message, signing policy.Signing) ([]string, []Signature, error) {
	ids, err := m.signers(ctx, signing)
	if err != nil {
		return nil, nil, err
	}
	fields, err := signer.Sign(ctx, msg, ids, signer.Options{Expire: signing.Expire, Now: m.srv.now})
	if err != nil {
		return nil, nil, err
	}
	sigs := make([]Signature, len(ids))
	for i, id := range ids {
		sigs[i] = Signature{Domain: id.Domain, Selector: id.Selector, Algorithm: signer.Algorithm(id.Key)}
	}
	return fields, sigs, nil
}

func (m *session) signers(ctx context.Context, signing policy.Signing) ([]signer.Identity, error) {
	var ids []signer.Identity
	if signing.Rotating {
		var err error
		if ids, err = m.srv.keys.Signers(ctx, signing.Domain); err != nil {
			return nil, err
		}
		if len(ids) == 0 {
			return nil, fmt.Errorf("milter: domain %s has no active key yet", signing.Domain)
		}
	} else {
		for _, sel := range signing.Selectors {
			key, err := m.srv.keys.Key(ctx, signing.Domain, sel)
			if err != nil {
				return nil, err
			}
			ids = append(ids, signer.Identity{Domain: signing.Domain, Selector: sel, Key: key})
		}
	}
	return ids, nil
}

func (m *session) clientName() string {
	if m.client == nil {
		return ""
	}
	return m.client.Name
}

func (m *session) Abort(_ gomilter.Modifier) error {
	m.reset()
	return nil
}

func (m *session) reset() {
	m.stream, m.client, m.who, m.queueID, m.cfg = nil, nil, "", "", nil
}

// reply is a 4xx or 5xx for the MTA to give its client.
func reply(code uint16, text string) *gomilter.Response {
	r, err := gomilter.RejectWithCodeAndReason(code, text)
	if err != nil {
		// Only a bad code or an over-long text fails, and ours are fixed.
		panic(err)
	}
	return r
}
