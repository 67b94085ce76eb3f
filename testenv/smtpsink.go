package testenv

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// SinkMessage is one message an SMTPSink accepted.
type SinkMessage struct {
	From     string
	MailOpts smtp.MailOptions
	To       []string // the recipients the sink accepted, in order
	RcptOpts []smtp.RcptOptions
	Data     []byte // exactly as received (CRLF line endings, dots unstuffed)
	TLS      bool   // the message came over a STARTTLS session
}

// SMTPSink is an in-process SMTP server on 127.0.0.1 that records every
// message it accepts. It advertises 8BITMIME, SMTPUTF8, DSN and SIZE, so
// that a relay in front of it can pass every parameter through. Tests
// tell it to reject recipients, to refuse DATA, to be slow, or to go away
// and come back on the same address.
type SMTPSink struct {
	t    testing.TB
	addr string

	mu        sync.Mutex
	srv       *smtp.Server
	listener  net.Listener
	serveDone chan struct{}
	msgs      []SinkMessage
	rcptErr   map[string]*smtp.SMTPError
	mailErr   *smtp.SMTPError
	dataErr   *smtp.SMTPError
	dataDelay time.Duration
	tlsConfig *tls.Config
	sessions  int
	changed   chan struct{} // closed and replaced whenever msgs grows
}

// NewSMTPSink starts a sink on a free 127.0.0.1 port; it is stopped when
// the test ends.
func NewSMTPSink(t testing.TB) *SMTPSink {
	t.Helper()
	s := &SMTPSink{t: t, rcptErr: map[string]*smtp.SMTPError{}, changed: make(chan struct{})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: sink: listen: %v", err)
	}
	s.addr = l.Addr().String()
	s.serve(l)
	t.Cleanup(s.Stop)
	return s
}

// Addr is the sink's host:port; it stays the same across Stop and Start.
func (s *SMTPSink) Addr() string { return s.addr }

func (s *SMTPSink) serve(l net.Listener) {
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		s.mu.Lock()
		s.sessions++
		s.mu.Unlock()
		return &sinkSession{sink: s, conn: c}, nil
	}))
	s.mu.Lock()
	srv.TLSConfig = s.tlsConfig
	s.mu.Unlock()
	srv.Domain = "sink.test"
	srv.EnableSMTPUTF8 = true
	srv.EnableDSN = true
	srv.MaxMessageBytes = 200 << 20
	srv.ReadTimeout = time.Minute
	srv.WriteTimeout = time.Minute
	srv.ErrorLog = log.New(io.Discard, "", 0)
	done := make(chan struct{})
	s.mu.Lock()
	s.srv, s.listener, s.serveDone = srv, l, done
	s.mu.Unlock()
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
}

// Stop closes the listener and every connection: the address then
// refuses connections, as a down MTA does. Stopping a stopped sink does
// nothing.
func (s *SMTPSink) Stop() {
	s.mu.Lock()
	srv, l, done := s.srv, s.listener, s.serveDone
	s.srv, s.listener = nil, nil
	s.mu.Unlock()
	if srv == nil {
		return
	}
	// Close the listener ourselves too: go-smtp's Close only closes the
	// listeners Serve has registered, and Serve may not have run yet.
	_ = l.Close()
	_ = srv.Close()
	<-done
}

// Start listens again on the sink's address after Stop.
func (s *SMTPSink) Start() {
	s.t.Helper()
	s.mu.Lock()
	running := s.srv != nil
	s.mu.Unlock()
	if running {
		return
	}
	var l net.Listener
	var err error
	// The port was ours a moment ago; retry briefly in case the kernel
	// has not released it yet.
	for range 50 {
		if l, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("testenv: sink: listen again on %s: %v", s.addr, err)
	}
	s.serve(l)
}

// EnableSTARTTLS makes the sink offer STARTTLS with cfg (nil: stop
// offering it). It restarts the sink, closing its connections.
func (s *SMTPSink) EnableSTARTTLS(cfg *tls.Config) {
	s.t.Helper()
	s.Stop()
	s.mu.Lock()
	s.tlsConfig = cfg
	s.mu.Unlock()
	s.Start()
}

// RejectRecipient makes RCPT TO:<addr> fail with err (nil: accept again).
func (s *SMTPSink) RejectRecipient(addr string, err *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		delete(s.rcptErr, strings.ToLower(addr))
		return
	}
	s.rcptErr[strings.ToLower(addr)] = err
}

// FailMail makes every MAIL FROM fail with err (nil: accept again).
func (s *SMTPSink) FailMail(err *smtp.SMTPError) {
	s.mu.Lock()
	s.mailErr = err
	s.mu.Unlock()
}

// FailData makes the reply to the end of DATA err, e.g. a 451 or a 554
// (nil: accept again). The message is not recorded.
func (s *SMTPSink) FailData(err *smtp.SMTPError) {
	s.mu.Lock()
	s.dataErr = err
	s.mu.Unlock()
}

// DelayData makes the sink wait d after reading a message before it
// answers, as a slow upstream does.
func (s *SMTPSink) DelayData(d time.Duration) {
	s.mu.Lock()
	s.dataDelay = d
	s.mu.Unlock()
}

// Sessions is how many SMTP sessions the sink has seen (EHLO/HELO, and
// each STARTTLS starts another); a relay that pools its connections
// opens few.
func (s *SMTPSink) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions
}

// Messages returns a copy of the messages accepted so far.
func (s *SMTPSink) Messages() []SinkMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SinkMessage(nil), s.msgs...)
}

// WaitMessages waits until the sink has accepted at least n messages and
// returns them, failing the test after timeout.
func (s *SMTPSink) WaitMessages(t testing.TB, n int, timeout time.Duration) []SinkMessage {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		got, changed := len(s.msgs), s.changed
		s.mu.Unlock()
		if got >= n {
			return s.Messages()
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("testenv: sink: %d message(s) after %v, want %d", got, timeout, n)
		}
	}
}

type sinkSession struct {
	sink     *SMTPSink
	conn     *smtp.Conn
	msg      *SinkMessage
	mailSeen bool
}

func (ss *sinkSession) Reset()        { ss.msg = nil }
func (ss *sinkSession) Logout() error { return nil }

func (ss *sinkSession) Mail(from string, opts *smtp.MailOptions) error {
	ss.sink.mu.Lock()
	err := ss.sink.mailErr
	ss.sink.mu.Unlock()
	if err != nil {
		return err
	}
	ss.msg = &SinkMessage{From: from}
	if opts != nil {
		ss.msg.MailOpts = *opts
	}
	return nil
}

func (ss *sinkSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	if ss.msg == nil {
		return &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "MAIL first"}
	}
	ss.sink.mu.Lock()
	err := ss.sink.rcptErr[strings.ToLower(to)]
	ss.sink.mu.Unlock()
	if err != nil {
		return err
	}
	ss.msg.To = append(ss.msg.To, to)
	var o smtp.RcptOptions
	if opts != nil {
		o = *opts
	}
	ss.msg.RcptOpts = append(ss.msg.RcptOpts, o)
	return nil
}

func (ss *sinkSession) Data(r io.Reader) error {
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, r); err != nil {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: fmt.Sprintf("sink: read: %v", err)}
	}
	s := ss.sink
	s.mu.Lock()
	delay, dataErr := s.dataDelay, s.dataErr
	s.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	if dataErr != nil {
		return dataErr
	}
	if ss.msg == nil {
		return errors.New("sink: DATA without MAIL")
	}
	m := *ss.msg
	m.Data = buf.Bytes()
	_, m.TLS = ss.conn.TLSConnectionState()
	s.mu.Lock()
	s.msgs = append(s.msgs, m)
	n := len(s.msgs)
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: fmt.Sprintf("Ok: queued as SINK%d", n)}
}
