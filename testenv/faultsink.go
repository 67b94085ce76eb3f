package testenv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// UpstreamFault is how a FaultSink misbehaves.
type UpstreamFault int

const (
	// UpstreamOK accepts every message.
	UpstreamOK UpstreamFault = iota
	// Upstream421 greets new connections with 421 and closes them, and
	// answers MAIL on open ones with 421 and closes them (RFC 5321 4.2.2:
	// the service is shutting down).
	Upstream421
	// UpstreamStall reads nothing: new connections get no greeting, and a
	// message in DATA is not read, until the fault ends.
	UpstreamStall
	// UpstreamDropMidData reads part of a message and closes the
	// connection.
	UpstreamDropMidData
	// UpstreamDropAfterDot reads the whole message, records it, and
	// closes the connection before replying: the sender cannot know that
	// the message arrived (RFC 1047), and a retry duplicates it.
	UpstreamDropAfterDot
)

func (f UpstreamFault) String() string {
	switch f {
	case UpstreamOK:
		return "ok"
	case Upstream421:
		return "421"
	case UpstreamStall:
		return "stall"
	case UpstreamDropMidData:
		return "drop-mid-data"
	case UpstreamDropAfterDot:
		return "drop-after-dot"
	}
	return fmt.Sprintf("UpstreamFault(%d)", int(f))
}

// FaultSink is an upstream MTA on 127.0.0.1 that records every message it
// accepts and misbehaves on demand (SetFault), or goes away and comes
// back on the same address (Stop, Start). A message is recorded when it
// has been read completely, before the reply (or the missing reply) is
// sent.
type FaultSink struct {
	t    testing.TB
	addr string

	mu        sync.Mutex
	fault     UpstreamFault
	faultChg  chan struct{} // closed and replaced when fault changes
	delay     time.Duration
	srv       *smtp.Server
	listener  net.Listener
	serveDone chan struct{}
	msgs      []SinkMessage
	inData    int
	maxInData int
	faulted   int // transactions the fault was applied to
}

// NewFaultSink starts a sink on a free 127.0.0.1 port; it is stopped when
// the test ends.
func NewFaultSink(t testing.TB) *FaultSink {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: fault sink: listen: %v", err)
	}
	s := &FaultSink{t: t, addr: l.Addr().String(), faultChg: make(chan struct{})}
	s.serve(l)
	t.Cleanup(func() {
		s.SetFault(UpstreamOK) // releases stalled sessions
		s.Stop()
	})
	return s
}

// Addr is the sink's host:port; it stays the same across Stop and Start.
func (s *FaultSink) Addr() string { return s.addr }

// SetFault changes how the sink behaves from now on; UpstreamOK ends a
// fault (and releases what a stall holds).
func (s *FaultSink) SetFault(f UpstreamFault) {
	s.mu.Lock()
	s.fault = f
	close(s.faultChg)
	s.faultChg = make(chan struct{})
	s.mu.Unlock()
}

// DelayData makes the sink wait d after reading a message before it
// answers.
func (s *FaultSink) DelayData(d time.Duration) {
	s.mu.Lock()
	s.delay = d
	s.mu.Unlock()
}

// InData is the number of messages being read or held before their reply
// right now.
func (s *FaultSink) InData() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inData
}

// Faulted is the number of connections and transactions a fault has
// been applied to so far: a test checks that its fault was hit.
func (s *FaultSink) Faulted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.faulted
}

// Messages returns a copy of the messages recorded so far.
func (s *FaultSink) Messages() []SinkMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SinkMessage(nil), s.msgs...)
}

func (s *FaultSink) current() (UpstreamFault, chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fault, s.faultChg
}

func (s *FaultSink) countFault() {
	s.mu.Lock()
	s.faulted++
	s.mu.Unlock()
}

// Stop closes the listener and every connection, abruptly: the address
// then refuses connections, as a killed MTA's does.
func (s *FaultSink) Stop() {
	s.mu.Lock()
	srv, l, done := s.srv, s.listener, s.serveDone
	s.srv, s.listener = nil, nil
	s.mu.Unlock()
	if srv == nil {
		return
	}
	_ = l.Close()
	_ = srv.Close()
	<-done
}

// Start listens again on the sink's address after Stop.
func (s *FaultSink) Start() {
	s.t.Helper()
	s.mu.Lock()
	running := s.srv != nil
	s.mu.Unlock()
	if running {
		return
	}
	var l net.Listener
	var err error
	for range 100 {
		if l, err = net.Listen("tcp", s.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Errorf("testenv: fault sink: listen again on %s: %v", s.addr, err)
		return
	}
	s.serve(l)
}

func (s *FaultSink) serve(l net.Listener) {
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &faultSession{sink: s, conn: c}, nil
	}))
	srv.Domain = "faultsink.test"
	srv.MaxMessageBytes = 200 << 20
	srv.ReadTimeout = 2 * time.Minute
	srv.WriteTimeout = time.Minute
	srv.ErrorLog = log.New(io.Discard, "", 0)
	fl := &faultListener{Listener: l, sink: s, conns: make(chan net.Conn), closed: make(chan struct{})}
	done := make(chan struct{})
	s.mu.Lock()
	s.srv, s.listener, s.serveDone = srv, fl, done
	s.mu.Unlock()
	go fl.acceptLoop()
	go func() {
		defer close(done)
		_ = srv.Serve(fl)
	}()
}

// faultListener applies the connection-level faults (421 greeting, no
// greeting) before go-smtp sees a connection.
type faultListener struct {
	net.Listener
	sink      *FaultSink
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func (fl *faultListener) acceptLoop() {
	for {
		c, err := fl.Listener.Accept()
		if err != nil {
			fl.Close()
			return
		}
		go fl.admit(c)
	}
}

func (fl *faultListener) admit(c net.Conn) {
	for {
		fault, changed := fl.sink.current()
		switch fault {
		case Upstream421:
			fl.sink.countFault()
			_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = io.WriteString(c, "421 4.3.2 faultsink.test service not available, closing channel\r\n")
			_ = c.Close()
			return
		case UpstreamStall:
			fl.sink.countFault()
			select {
			case <-changed:
				continue
			case <-fl.closed:
				_ = c.Close()
				return
			}
		}
		select {
		case fl.conns <- c:
		case <-fl.closed:
			_ = c.Close()
		}
		return
	}
}

func (fl *faultListener) Accept() (net.Conn, error) {
	select {
	case c := <-fl.conns:
		return c, nil
	case <-fl.closed:
		return nil, net.ErrClosed
	}
}

func (fl *faultListener) Close() error {
	fl.closeOnce.Do(func() { close(fl.closed) })
	return fl.Listener.Close()
}

type faultSession struct {
	sink *FaultSink
	conn *smtp.Conn
	msg  *SinkMessage
}

func (ss *faultSession) Reset()        { ss.msg = nil }
func (ss *faultSession) Logout() error { return nil }

func (ss *faultSession) Mail(from string, opts *smtp.MailOptions) error {
	if f, _ := ss.sink.current(); f == Upstream421 {
		ss.sink.countFault()
		// Reply, then close: go-smtp writes the reply before the next read,
		// which then fails on the closed connection.
		go func(c net.Conn) {
			time.Sleep(50 * time.Millisecond)
			_ = c.Close()
		}(ss.conn.Conn())
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "faultsink.test service not available, closing channel"}
	}
	ss.msg = &SinkMessage{From: from}
	return nil
}

func (ss *faultSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if ss.msg == nil {
		return &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "MAIL first"}
	}
	ss.msg.To = append(ss.msg.To, to)
	return nil
}

var errDropped = errors.New("faultsink: connection dropped on purpose")

func (ss *faultSession) Data(r io.Reader) error {
	s := ss.sink
	s.mu.Lock()
	s.inData++
	s.maxInData = max(s.maxInData, s.inData)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inData--
		s.mu.Unlock()
	}()
	for {
		fault, changed := s.current()
		if fault != UpstreamStall {
			break
		}
		s.countFault()
		<-changed
	}
	if f, _ := s.current(); f == UpstreamDropMidData {
		s.countFault()
		// Read into the message, then hang up.
		_, _ = io.CopyN(io.Discard, bufio.NewReader(r), 64)
		_ = ss.conn.Conn().Close()
		return errDropped
	}
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, r); err != nil {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "faultsink: read failed"}
	}
	if ss.msg == nil {
		return errors.New("faultsink: DATA without MAIL")
	}
	m := *ss.msg
	m.Data = buf.Bytes()
	s.mu.Lock()
	s.msgs = append(s.msgs, m)
	n := len(s.msgs)
	delay := s.delay
	s.mu.Unlock()
	if f, _ := s.current(); f == UpstreamDropAfterDot {
		s.countFault()
		_ = ss.conn.Conn().Close()
		return errDropped
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: fmt.Sprintf("Ok: queued as FAULT%d", n)}
}
