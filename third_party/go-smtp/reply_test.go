package smtp

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"
)

// origWriteResponse is v0.25.1's Conn.writeResponse, unchanged but for
// writing to w: one PrintfLine, so one flush and one write system call,
// per line of the reply.
func origWriteResponse(w *textproto.Writer, code int, enhCode EnhancedCode, text ...string) {
	if enhCode == EnhancedCodeNotSet {
		cat := code / 100
		switch cat {
		case 2, 4, 5:
			enhCode = EnhancedCode{cat, 0, 0}
		default:
			enhCode = NoEnhancedCode
		}
	}
	text = strings.Split(strings.Join(text, "\n"), "\n")
	lastLineIndex := len(text) - 1
	for i := 0; i < lastLineIndex; i++ {
		w.PrintfLine("%d-%v", code, text[i])
	}
	if enhCode == NoEnhancedCode {
		w.PrintfLine("%d %v", code, text[lastLineIndex])
	} else {
		w.PrintfLine("%d %v.%v.%v %v", code, enhCode[0], enhCode[1], enhCode[2], text[lastLineIndex])
	}
}

// writeCounter records each Write it is given, as the network would see
// the write system calls.
type writeCounter struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (w *writeCounter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.writes = append(w.writes, bytes.Clone(p))
	w.mu.Unlock()
	return w.Conn.Write(p)
}

func (w *writeCounter) snapshot() [][]byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([][]byte(nil), w.writes...)
}

// TestWriteResponseMatchesOriginal holds the reply writer to v0.25.1's
// bytes, and checks that each reply, however many lines, leaves in one
// write.
func TestWriteResponseMatchesOriginal(t *testing.T) {
	cases := []struct {
		name string
		code int
		enh  EnhancedCode
		text []string
	}{
		{"greeting", 220, NoEnhancedCode, []string{"localhost ESMTP Service Ready"}},
		{"default enhanced 2xx", 250, EnhancedCodeNotSet, []string{"OK"}},
		{"default enhanced 4xx", 451, EnhancedCodeNotSet, []string{"try later"}},
		{"default enhanced 5xx", 554, EnhancedCodeNotSet, []string{"no"}},
		{"default enhanced 3xx", 354, EnhancedCodeNotSet, []string{"Go ahead"}},
		{"explicit enhanced", 250, EnhancedCode{2, 1, 5}, []string{"recipient ok"}},
		{"EHLO", 250, NoEnhancedCode, []string{"Hello x", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "SIZE 1000", "LIMITS RCPTMAX=1000"}},
		{"embedded newlines", 550, EnhancedCode{5, 7, 1}, []string{"first\nsecond", "third"}},
		{"empty text", 250, EnhancedCodeNotSet, []string{""}},
		{"percent signs", 250, NoEnhancedCode, []string{"100% %d %v"}},
		{"long", 250, NoEnhancedCode, []string{strings.Repeat("a", 5000), strings.Repeat("b", 3000)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var want bytes.Buffer
			ow := textproto.NewWriter(bufio.NewWriter(&want))
			origWriteResponse(ow, tc.code, tc.enh, tc.text...)

			a, b := net.Pipe()
			defer a.Close()
			defer b.Close()
			wc := &writeCounter{Conn: a}
			c := newConn(wc, NewServer(nil))
			got := make(chan []byte, 1)
			go func() {
				p, _ := io.ReadAll(b)
				got <- p
			}()
			c.writeResponse(tc.code, tc.enh, tc.text...)
			a.Close()
			if g := <-got; !bytes.Equal(g, want.Bytes()) {
				t.Fatalf("reply\n%q\nwant (v0.25.1)\n%q", g, want.Bytes())
			}
			if n, max := len(wc.snapshot()), (want.Len()+4095)/4096; n > max {
				t.Errorf("reply of %d bytes left in %d writes, want at most %d", want.Len(), n, max)
			}
		})
	}
}

// TestEhloReplyOneWrite checks through a real connection that the
// multi-line EHLO reply reaches the network in one write, not one per
// capability.
func TestEhloReplyOneWrite(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan *writeCounter, 1)
	s := NewServer(new(countBackend))
	s.Domain = "localhost"
	go s.Serve(&countingListener{Listener: l, conns: conns})
	defer s.Close()

	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := textproto.NewReader(bufio.NewReader(c))
	if _, _, err := r.ReadResponse(220); err != nil {
		t.Fatal(err)
	}
	wc := <-conns
	before := len(wc.snapshot())
	io.WriteString(c, "EHLO client.test\r\n")
	_, msg, err := r.ReadResponse(250)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Count(msg, "\n") + 1
	if lines < 3 {
		t.Fatalf("EHLO reply has %d lines, want several: %q", lines, msg)
	}
	if n := len(wc.snapshot()) - before; n != 1 {
		t.Errorf("EHLO reply of %d lines left in %d writes, want 1", lines, n)
	}

	// The rest of a transaction: one write per reply.
	for _, step := range []struct {
		send string
		code int
	}{
		{"MAIL FROM:<a@example.com>\r\n", 250},
		{"RCPT TO:<b@example.net>\r\n", 250},
		{"DATA\r\n", 354},
		{"From: a@example.com\r\n\r\nbody\r\n.\r\n", 250},
		{"QUIT\r\n", 221},
	} {
		before := len(wc.snapshot())
		io.WriteString(c, step.send)
		if _, msg, err := r.ReadResponse(step.code); err != nil {
			t.Fatalf("%q: %v %q", step.send, err, msg)
		}
		if n := len(wc.snapshot()) - before; n != 1 {
			t.Errorf("reply to %q left in %d writes, want 1", step.send, n)
		}
	}
}

type countBackend struct{}

func (countBackend) NewSession(*Conn) (Session, error) { return discardSession{}, nil }

type discardSession struct{}

func (discardSession) Reset()                          {}
func (discardSession) Logout() error                   { return nil }
func (discardSession) Mail(string, *MailOptions) error { return nil }
func (discardSession) Rcpt(string, *RcptOptions) error { return nil }
func (discardSession) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

type countingListener struct {
	net.Listener
	conns chan *writeCounter
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	wc := &writeCounter{Conn: c}
	select {
	case l.conns <- wc:
	default:
	}
	return wc, nil
}

// TestPipelinedRepliesOneWrite checks that the replies to commands a
// client pipelines (RFC 2920) leave together once the server has read
// them all, and that a reply held back is never lost: not before the
// server waits for input, not when it closes the connection.
func TestPipelinedRepliesOneWrite(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan *writeCounter, 1)
	s := NewServer(new(countBackend))
	s.Domain = "localhost"
	go s.Serve(&countingListener{Listener: l, conns: conns})
	defer s.Close()

	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := textproto.NewReader(bufio.NewReader(c))
	expect := func(codes ...int) {
		t.Helper()
		for _, code := range codes {
			if _, msg, err := r.ReadResponse(code); err != nil {
				t.Fatalf("want %d: %v %q", code, err, msg)
			}
		}
	}
	expect(220)
	wc := <-conns
	io.WriteString(c, "EHLO client.test\r\n")
	expect(250)

	before := len(wc.snapshot())
	io.WriteString(c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
	expect(250, 250, 250, 354)
	if n := len(wc.snapshot()) - before; n != 1 {
		t.Errorf("replies to MAIL, RCPT, RCPT, DATA in one packet left in %d writes, want 1", n)
	}

	// The end of the message, then a pipelined RSET and NOOP: the reply
	// to the message leaves at once, on its own, not held back behind the
	// commands after it; those two leave together.
	before = len(wc.snapshot())
	io.WriteString(c, "From: a@example.com\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n")
	expect(250, 250, 250)
	if w := wc.snapshot()[before:]; len(w) < 2 || !strings.HasPrefix(string(w[0]), "250 ") || strings.Count(string(w[0]), "\r\n") != 1 {
		t.Errorf("end of message with RSET and NOOP pipelined after it: writes %q, want the message's 250 alone first", w)
	}

	// A QUIT with junk after it: the 221 is held back behind the junk,
	// and must still reach the client before the connection closes.
	io.WriteString(c, "QUIT\r\nNOOP\r\n")
	expect(221)
	if _, err := r.ReadLine(); err != io.EOF {
		t.Errorf("after 221: %v, want the connection closed (EOF)", err)
	}
}
