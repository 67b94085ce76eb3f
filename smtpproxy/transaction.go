package smtpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/signer"
)

// transaction is one mail transaction, MAIL to the end of DATA (or RSET),
// relayed to one upstream connection.
type transaction struct {
	ss     *session
	st     *state // the policy and settings the transaction started with
	client *policy.Client
	start  time.Time
	ctx    context.Context
	cancel context.CancelFunc

	up       *upConn
	inData   atomic.Bool
	declared int64 // the message's size by MAIL's SIZE= (0: not given)

	// For the log line.
	mailFrom     string
	rcptOK       int
	rcptRejected int
	fromDomain   string
	signing      policy.Signing
	signed       bool
	size         int64
	upstream     string // the upstream's reply to the final dot
	upClass      string // its class ("2xx"), for metrics
	sigs         []SignatureReport
	captureDir   string // upstream.address capture:DIR: stored here, not relayed
	note         string // why it was relayed unsigned, or what failed inside
	internal     error  // detail of a local failure (never sent to the client)
	done         bool   // the upstream accepted the message

	once sync.Once
}

// mail takes an upstream connection and relays MAIL FROM. A reused
// connection can have died while idle (the upstream restarted, or closed
// it after its own idle timeout): if it fails before the upstream has
// committed to anything, it is closed with the rest of the idle ones and
// MAIL is retried once on a new connection, whose failure is the one the
// client gets.
func (tx *transaction) mail(from string, opts *smtp.MailOptions) error {
	if dir := captureDir(tx.st.set.Upstream); dir != "" {
		tx.captureDir = dir
		return nil
	}
	pool := tx.st.pool
	up, err := pool.get(tx.ctx, false)
	if err != nil {
		return tx.upstreamUnavailable(err)
	}
	err = tx.upstreamMail(up, from, opts)
	if err != nil && up.reused && !healthy(err) && tx.ctx.Err() == nil {
		pool.logger.Debug("pooled upstream connection dead, reconnecting", "upstream", pool.cfg.Address, "error", err)
		pool.put(up, connBroken)
		pool.dropIdle()
		if up, err = pool.get(tx.ctx, true); err != nil {
			return tx.upstreamUnavailable(err)
		}
		err = tx.upstreamMail(up, from, opts)
	}
	if err != nil {
		state := connClean // a refused MAIL starts no transaction
		if !healthy(err) {
			state = connBroken
			tx.internal = err
		}
		pool.put(up, state)
		return upstreamReply(err)
	}
	tx.up = up
	return nil
}

func (tx *transaction) upstreamMail(up *upConn, from string, opts *smtp.MailOptions) error {
	var o *smtp.MailOptions
	if opts != nil {
		// Relay what describes the message and its DSNs; AUTH= is about
		// our client, not something the upstream should trust from us.
		o = &smtp.MailOptions{Body: opts.Body, Size: opts.Size, UTF8: opts.UTF8, Return: opts.Return, EnvelopeID: opts.EnvelopeID}
	}
	release := up.dc.bind(tx.ctx)
	err := up.c.Mail(from, o)
	up.lastUsed = time.Now()
	if !release() && err == nil {
		err = context.Cause(tx.ctx)
	}
	return err
}

func (tx *transaction) upstreamUnavailable(err error) error {
	tx.internal = err
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se // errUpstreamBusy
	}
	if errors.Is(err, errNoSTARTTLS) {
		return errUpstreamNoTLS
	}
	return errUpstreamUnavailable
}

func (tx *transaction) rcpt(to string, opts *smtp.RcptOptions) error {
	if tx.captureDir != "" {
		// Nothing is delivered, so every recipient is accepted.
		tx.rcptOK++
		return nil
	}
	if tx.up == nil {
		return errUpstreamBroken
	}
	var o *smtp.RcptOptions
	if opts != nil {
		o = &smtp.RcptOptions{Notify: opts.Notify, OriginalRecipientType: opts.OriginalRecipientType, OriginalRecipient: opts.OriginalRecipient}
	}
	release := tx.up.dc.bind(tx.ctx)
	err := tx.up.c.Rcpt(to, o)
	tx.up.lastUsed = time.Now()
	ok := release()
	if err == nil && !ok {
		err = context.Cause(tx.ctx)
	}
	if err != nil {
		tx.rcptRejected++
		if !healthy(err) || !ok {
			tx.st.pool.put(tx.up, connBroken)
			tx.up = nil
		}
		return upstreamReply(err)
	}
	tx.rcptOK++
	return nil
}

// data receives, spools, signs and relays the message, and returns the
// reply to DATA: the upstream's, or one of ours for a failure before it.
func (tx *transaction) data(r io.Reader) error {
	tx.inData.Store(true)
	set := tx.st.set
	if tx.captureDir != "" {
		return tx.spoolSign(r, func(fields []string, msg *signer.Message) error {
			return tx.capture(tx.captureDir, fields, msg)
		})
	}
	if tx.up == nil {
		return errUpstreamBroken
	}
	ka := startKeepalive(tx.ctx, tx.up, set.Upstream.Keepalive)
	defer func() {
		// Not through relay (the message was refused, or never came):
		// the connection goes back to the pool only if the NOOPs left
		// it usable.
		if err := ka.end(); err != nil && !healthy(err) {
			tx.breakUp()
		}
	}()

	return tx.spoolSign(r, func(fields []string, msg *signer.Message) error {
		if err := ka.end(); err != nil && !healthy(err) {
			// The upstream dropped the connection (or stopped answering)
			// while the client was sending: the recipients' answers are
			// given, so the transaction cannot move to another connection.
			tx.breakUp()
			tx.internal = fmt.Errorf("smtpproxy: keeping the upstream connection alive (NOOP): %w", err)
			return errUpstreamBroken
		}
		return tx.relay(fields, msg)
	})
}

// spoolSign receives and spools the message, signs it and hands the
// fields and message to deliver, whose reply it returns; a failure before
// that is the reply.
func (tx *transaction) spoolSign(r io.Reader, deliver func(fields []string, msg *signer.Message) error) error {
	set := tx.st.set
	// Each read may wait read_timeout; the whole transfer data_timeout,
	// which the client connection enforces on go-smtp's reads of BDAT
	// commands and chunks too.
	deadline := time.Now().Add(set.DataTimeout)
	tx.ss.cc.startData(deadline)
	defer tx.ss.cc.endData()
	dr := &deadlineReader{r: r, conn: tx.ss.conn, idle: set.ReadTimeout, deadline: deadline}
	msg, err := signer.Spool(tx.ctx, dr, signer.SpoolOptions{
		Dir:             set.Spool.Dir,
		MemoryLimit:     set.Spool.MemoryLimit,
		Budget:          tx.ss.srv.spoolBudget,
		MaxHeaderBytes:  set.Spool.MaxHeaderBytes,
		MaxMessageBytes: set.MaxMessageBytes,
		SizeHint:        tx.declared,
	})
	if err != nil {
		// go-smtp reads (and discards) the rest of the message before it
		// sends our reply: give a client that is still sending until
		// data_timeout, and one that has stopped nothing more.
		if isTimeout(err) || errors.Is(err, errDataTimeout) || errors.Is(err, errDataIncomplete) {
			deadline = past
		}
		_ = tx.ss.conn.Conn().SetReadDeadline(deadline)
		return tx.spoolError(err)
	}
	defer msg.Close()
	tx.size = msg.Size()
	spooled := &tx.ss.srv.spoolMem
	if msg.OnDisk() {
		spooled = &tx.ss.srv.spoolDisk
	}
	spooled.Add(tx.size)
	defer spooled.Add(-tx.size)
	tx.fromDomain = msg.FromDomain()

	fields, err := tx.sign(msg)
	if err != nil {
		return err
	}
	return deliver(fields, msg)
}
func (tx *transaction) spoolError(err error) error {
	tx.internal = err
	var refusedErr *signer.RefusedError
	var se *smtp.SMTPError
	switch {
	case errors.As(err, &refusedErr):
		return refused(refusedErr.Reason)
	case errors.Is(err, signer.ErrTooLarge), errors.As(err, &se) && se.Code == 552:
		return errTooLarge
	case errors.Is(err, smtp.ErrTooLongLine):
		return errLineTooLong
	case errors.Is(err, errDataIncomplete):
		return errDataIncomplete
	case isTimeout(err), errors.Is(err, errDataTimeout), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, smtp.ErrDataReset):
		return errDataTimeout
	}
	return errLocal
}

// sign applies the policy: the DKIM-Signature fields to prepend, none
// when the message goes unsigned, or the reply refusing it.
func (tx *transaction) sign(msg *signer.Message) ([]string, error) {
	p := tx.st.policy
	signing, err := p.Sign(tx.client, tx.fromDomain)
	if err != nil {
		var ue *policy.UnauthorizedError
		if !errors.As(err, &ue) {
			tx.internal = err
			return nil, errLocal
		}
		if p.ActionOnUnauthorized() == policy.UnauthorizedRelayUnsigned {
			tx.note = "relayed unsigned: client may not use the From domain (on_unauthorized: relay-unsigned)"
			return nil, nil
		}
		tx.internal = err
		return nil, unauthorizedDomain(ue.FromDomain)
	}
	tx.signing = signing

	ctx, cancel := context.WithTimeout(tx.ctx, signTimeout)
	defer cancel()
	ids, err := tx.signers(ctx, signing)
	if err != nil {
		return nil, tx.tokenError(err)
	}
	fields, err := signer.Sign(ctx, msg, ids, signer.Options{Expire: signing.Expire, Now: tx.ss.srv.now})
	if err != nil {
		return nil, tx.tokenError(err)
	}
	tx.signed = true
	for _, id := range ids {
		tx.sigs = append(tx.sigs, SignatureReport{Domain: id.Domain, Selector: id.Selector, Algorithm: signer.Algorithm(id.Key)})
	}
	return fields, nil
}

// signers returns the identities that sign for signing: its selectors'
// keys, or a rotating domain's active keys.
func (tx *transaction) signers(ctx context.Context, signing policy.Signing) ([]signer.Identity, error) {
	keys := tx.ss.srv.keys
	if signing.Rotating {
		src, ok := keys.(SignerSource)
		if !ok {
			return nil, fmt.Errorf("smtpproxy: domain %s rotates its keys, and the key source does not know rotated keys", signing.Domain)
		}
		ids, err := src.Signers(ctx, signing.Domain)
		if err == nil && len(ids) == 0 {
			err = fmt.Errorf("smtpproxy: domain %s: %w", signing.Domain, ErrNoActiveKey)
		}
		if err != nil {
			return nil, err
		}
		tx.signing.Selectors = make([]string, len(ids))
		for i, id := range ids {
			tx.signing.Selectors[i] = id.Selector
		}
		return ids, nil
	}
	ids := make([]signer.Identity, 0, len(signing.Selectors))
	for _, sel := range signing.Selectors {
		key, err := keys.Key(ctx, signing.Domain, sel)
		if err != nil {
			return nil, err
		}
		ids = append(ids, signer.Identity{Domain: signing.Domain, Selector: sel, Key: key})
	}
	return ids, nil
}

// tokenError handles a key that could not be had or used. Temporary or
// not, the sender should keep the message (a missing key is an operator's
// mistake to fix, not the message's fault), unless the policy prefers
// unsigned mail to delayed mail.
func (tx *transaction) tokenError(err error) error {
	tx.internal = err
	if tx.ctx.Err() != nil {
		return errShuttingDown
	}
	if tx.st.policy.ActionOnTokenError() == policy.TokenErrorRelayUnsigned {
		tx.note = "relayed unsigned: signing failed (on_token_error: relay-unsigned)"
		return nil
	}
	return errTokenUnavailable
}

// temporary reports whether err says it is temporary (hsm's token errors
// do), for the log.
func temporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// relay sends the (signed) message upstream and returns the upstream's
// reply to the final dot.
func (tx *transaction) relay(fields []string, msg *signer.Message) error {
	up := tx.up
	release := up.dc.bind(tx.ctx)
	defer func() {
		if !release() {
			tx.breakUp()
		}
	}()
	w, err := up.c.Data()
	if err != nil {
		if !healthy(err) {
			tx.breakUp()
		}
		tx.internal = err
		return upstreamReply(err)
	}
	// go-smtp's client sets no deadline while the message is written.
	_ = up.dc.SetDeadline(time.Now().Add(tx.st.set.Upstream.Timeout))
	if _, err := signer.WriteSigned(w, fields, msg); err != nil {
		tx.breakUp()
		tx.internal = err
		return errUpstreamBroken
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		if !healthy(err) {
			tx.breakUp()
		}
		tx.internal = err
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			tx.upClass = replyClass(se.Code)
		}
		reply := upstreamReply(err)
		tx.upstream = replyCode(reply)
		return reply
	}
	tx.done = true
	tx.upClass = "2xx" // go-smtp gives no code with a success
	up.junk = 0        // an upstream forgives junk commands once a message is delivered
	reply := okReply(resp.StatusText)
	tx.upstream = replyCode(reply)
	return reply
}

// breakUp marks the upstream connection unusable.
func (tx *transaction) breakUp() {
	if tx.up != nil {
		tx.st.pool.put(tx.up, connBroken)
		tx.up = nil
	}
}

// abort ends a transaction that did not reach the end of DATA.
func (tx *transaction) abort(why string) {
	tx.note = why
	tx.finish(nil)
}

// finish gives the upstream connection back and writes the transaction's
// log line; reply is what the client got (nil: the transaction was
// aborted before DATA).
func (tx *transaction) finish(reply error) {
	tx.once.Do(func() {
		tx.cancel()
		if tx.up != nil {
			state := connDirty
			if tx.done {
				state = connClean
			}
			tx.st.pool.put(tx.up, state)
			tx.up = nil
		}
		tx.log(reply)
		tx.report(reply)
	})
}

// report tells the server's Observer the outcome of a transaction that
// got a reply to its message.
func (tx *transaction) report(reply error) {
	out, ok := outcomeOf(reply, tx.signed)
	if !ok {
		return
	}
	r := TransactionReport{Domain: tx.signing.Domain, Outcome: out, UpstreamClass: tx.upClass}
	if tx.client != nil {
		r.Client = tx.client.Name
	}
	if out == OutcomeSigned {
		r.Signatures = tx.sigs
	}
	tx.ss.srv.obs.Transaction(r)
}

func (tx *transaction) log(reply error) {
	level := slog.LevelInfo
	attrs := append(tx.ss.logAttrs(),
		slog.String("client", tx.client.Name),
		slog.String("mail_from", tx.mailFrom),
		slog.Int("rcpts", tx.rcptOK),
		slog.Int("rcpts_rejected", tx.rcptRejected),
	)
	if tx.fromDomain != "" {
		attrs = append(attrs, slog.String("from_domain", tx.fromDomain), slog.Int64("size", tx.size))
	}
	if tx.signed {
		attrs = append(attrs, slog.String("d", tx.signing.Domain), slog.Any("selectors", tx.signing.Selectors))
	}
	attrs = append(attrs, slog.Bool("signed", tx.signed))
	var se *smtp.SMTPError
	switch {
	case reply == nil:
		attrs = append(attrs, slog.String("reply", "none"))
	case errors.As(reply, &se):
		attrs = append(attrs, slog.String("reply", replyCode(se)))
		if se.Code >= 400 {
			level = slog.LevelWarn
		}
	}
	if tx.upstream != "" {
		attrs = append(attrs, slog.String("upstream", tx.upstream))
	}
	if tx.note != "" {
		attrs = append(attrs, slog.String("note", tx.note))
		if !tx.signed && tx.fromDomain != "" {
			level = slog.LevelWarn
		}
	}
	if tx.internal != nil {
		attrs = append(attrs, slog.String("error", tx.internal.Error()), slog.Bool("temporary", temporary(tx.internal)))
	}
	attrs = append(attrs, slog.Float64("duration_s", time.Since(tx.start).Seconds()))
	tx.ss.srv.logger.Log(context.Background(), level, "transaction", attrs...)
}

// deadlineReader reads DATA, giving each read idle more time but never
// beyond deadline: go-smtp sets one read deadline for the DATA command
// and none for the message that follows it.
type deadlineReader struct {
	r        io.Reader
	conn     *smtp.Conn
	idle     time.Duration
	deadline time.Time
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	t := time.Now().Add(d.idle)
	if t.After(d.deadline) {
		t = d.deadline
	}
	_ = d.conn.Conn().SetReadDeadline(t)
	return d.r.Read(p)
}
