package smtpproxy

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

// rawClient speaks SMTP over a plain socket, the way go-smtp's own server
// tests do, so that a test can send what no well-behaved client would.
type rawClient struct {
	t       *testing.T
	conn    net.Conn
	replies chan string // one complete reply per value, lines joined by "|"; closed when the server closes
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &rawClient{t: t, conn: conn, replies: make(chan string, 100)}
	go func() {
		defer close(c.replies)
		r := bufio.NewReader(conn)
		var lines []string
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				return
			}
			lines = append(lines, strings.TrimRight(l, "\r\n"))
			if len(l) < 4 || l[3] == ' ' {
				c.replies <- strings.Join(lines, "|")
				lines = nil
			}
		}
	}()
	if g := c.reply(); !strings.HasPrefix(g, "220") {
		t.Fatalf("greeting %q", g)
	}
	return c
}

// reply waits for the next reply ("" when the server closed).
func (c *rawClient) reply() string {
	c.t.Helper()
	select {
	case r := <-c.replies:
		return r
	case <-time.After(10 * time.Second):
		c.t.Fatal("no reply within 10s")
		return ""
	}
}

func (c *rawClient) write(s string) error {
	_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := c.conn.Write([]byte(s))
	return err
}

// cmd sends one command line and wants a reply starting with want.
func (c *rawClient) cmd(line, want string) string {
	c.t.Helper()
	return c.send(line+"\r\n", want)
}

// send writes s as is and wants a reply starting with want.
func (c *rawClient) send(s, want string) string {
	c.t.Helper()
	if err := c.write(s); err != nil {
		c.t.Fatalf("%.40q: %v", s, err)
	}
	r := c.reply()
	if !strings.HasPrefix(r, want) {
		c.t.Fatalf("%.40q: reply %q, want %s", s, r, want)
	}
	return r
}

// bdat is a BDAT command with its chunk.
func bdat(chunk string, last bool) string {
	if last {
		return fmt.Sprintf("BDAT %d LAST\r\n%s", len(chunk), chunk)
	}
	return fmt.Sprintf("BDAT %d\r\n%s", len(chunk), chunk)
}

// trickle sends piece every interval, up to n times, collecting the
// replies; it stops early when the server answers 4xx or 5xx or closes.
// It returns every reply, and whether the server closed the connection.
func (c *rawClient) trickle(n int, interval time.Duration, piece func() string) (replies []string, closed bool) {
	for range n {
		time.Sleep(interval)
		if c.write(piece()) != nil {
			break
		}
		failed := false
	drain:
		for {
			select {
			case r, ok := <-c.replies:
				if !ok {
					return replies, true
				}
				replies = append(replies, r)
				failed = failed || r[0] == '4' || r[0] == '5'
			default:
				break drain
			}
		}
		if failed {
			break
		}
	}
	return replies, false
}

// rest collects what the server still says until it closes (or 10s).
func (c *rawClient) rest() (replies []string, closed bool) {
	timeout := time.After(10 * time.Second)
	for {
		select {
		case r, ok := <-c.replies:
			if !ok {
				return replies, true
			}
			replies = append(replies, r)
		case <-timeout:
			return replies, false
		}
	}
}

// checkTrickleRefused checks that a trickled transaction got a 4xx, was
// not accepted, cost the connection and reached nobody.
func checkTrickleRefused(t *testing.T, h *harness, replies []string, closed bool) {
	t.Helper()
	failed := false
	for _, r := range replies {
		if strings.Contains(r, "queued") || strings.HasPrefix(r, "5") {
			t.Errorf("reply %q to a transaction that should have timed out (all: %q)", r, replies)
		}
		failed = failed || strings.HasPrefix(r, "4")
	}
	if !failed {
		t.Errorf("replies %q, want a 4xx", replies)
	}
	if !closed {
		t.Errorf("the connection is still open after %q", replies)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(h.sink.Messages()); n != 0 {
		t.Errorf("%d messages reached the upstream", n)
	}
}

const trickleLine = "a line of a message that arrives slowly\r\n"

// TestDataTimeoutCoversTheWholeTransfer trickles a message, 41 bytes every
// 300ms, for longer than data_timeout (2s): over DATA and over BDAT (where
// go-smtp sets a new read deadline before each chunk) the transfer fails
// with a 4xx and the connection closes.
func TestDataTimeoutCoversTheWholeTransfer(t *testing.T) {
	t.Parallel() // mostly waiting
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  data_timeout: 2s\n", 1)
	for _, chunking := range []bool{false, true} {
		name := map[bool]string{false: "DATA", true: "BDAT"}[chunking]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, conf)
			c := dialRaw(t, h.addr)
			if ehlo := c.cmd("EHLO client.test", "250"); !strings.Contains(ehlo, "CHUNKING") {
				t.Fatalf("EHLO reply lacks CHUNKING: %q", ehlo)
			}
			c.cmd("MAIL FROM:<b@example.com>", "250")
			c.cmd("RCPT TO:<a@example.net>", "250")
			piece := func() string { return trickleLine }
			if chunking {
				c.send(bdat(testMsg, false), "250")
				piece = func() string { return bdat(trickleLine, false) }
			} else {
				c.cmd("DATA", "354")
				c.write(testMsg)
			}
			// 30 × 300ms is 9s, far past the 2s.
			replies, closed := c.trickle(30, 300*time.Millisecond, piece)
			if !closed {
				if chunking {
					c.write("BDAT 0 LAST\r\n")
				} else {
					c.write(".\r\n")
				}
				more, cl := c.rest()
				replies, closed = append(replies, more...), cl
			}
			checkTrickleRefused(t, h, replies, closed)
		})
	}
}

// TestMaxSessionDurationBoundsATransaction keeps a transaction going past
// max_session_duration (1s) with commands, then with BDAT chunks: the
// transaction in flight may finish, but gets at most data_timeout (2s)
// more, so trickling cannot keep a session open for ever.
func TestMaxSessionDurationBoundsATransaction(t *testing.T) {
	t.Parallel() // mostly waiting
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  data_timeout: 2s\n  max_session_duration: 1s\n", 1)
	for _, chunking := range []bool{false, true} {
		name := map[bool]string{false: "commands", true: "BDAT"}[chunking]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, conf)
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<b@example.com>", "250")
			c.cmd("RCPT TO:<a@example.net>", "250")
			var replies []string
			closed := false
			if chunking {
				// Past the session's end with commands, then the message
				// (whose own data_timeout would end later).
				for range 5 {
					time.Sleep(300 * time.Millisecond)
					c.cmd("NOOP", "250")
				}
				c.send(bdat(testMsg, false), "250")
				replies, closed = c.trickle(30, 300*time.Millisecond, func() string {
					return bdat(trickleLine, false)
				})
			} else {
				replies, closed = c.trickle(30, 300*time.Millisecond, func() string { return "NOOP\r\n" })
			}
			if !closed {
				if chunking {
					c.write("BDAT 0 LAST\r\n")
				} else {
					c.write("DATA\r\n" + testMsg + ".\r\n")
				}
				more, cl := c.rest()
				replies, closed = append(replies, more...), cl
			}
			checkTrickleRefused(t, h, replies, closed)
		})
	}
}

// TestBDAT sends a message in several chunks, the last with LAST: it is
// relayed signed, byte for byte.
func TestBDAT(t *testing.T) {
	h := newHarness(t, "")
	c := dialRaw(t, h.addr)
	c.cmd("EHLO client.test", "250")
	c.cmd("MAIL FROM:<b@example.com>", "250")
	c.cmd("RCPT TO:<a@example.net>", "250")
	cut1, cut2 := 50, len(testMsg)-10
	c.send(bdat(testMsg[:cut1], false), "250")
	c.send(bdat(testMsg[cut1:cut2], false), "250")
	if r := c.send(bdat(testMsg[cut2:], true), "250 2.0.0"); !strings.Contains(r, "queued as SINK1") {
		t.Errorf("reply to BDAT LAST = %q, want the upstream's", r)
	}
	c.cmd("QUIT", "221")
	m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]
	if !strings.HasSuffix(string(m.Data), testMsg) {
		t.Errorf("relayed message does not end with the original:\n%s", m.Data)
	}
	if ids := verify(t, m.Data); len(ids) != 2 {
		t.Errorf("verified %v, want two signatures", ids)
	}
}

// TestMessageCutShortIsNotRelayed: a client whose connection ends in the
// middle of its message must not have the part that arrived relayed. Over
// BDAT this needs care: go-smtp reads a chunk through an io.LimitReader
// and takes an early EOF for the end of the chunk, so a LAST chunk cut
// short looked complete.
func TestMessageCutShortIsNotRelayed(t *testing.T) {
	for _, chunking := range []bool{false, true} {
		name := map[bool]string{false: "DATA", true: "BDAT"}[chunking]
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, "")
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<b@example.com>", "250")
			c.cmd("RCPT TO:<a@example.net>", "250")
			if chunking {
				// 1000 bytes of the chunk never come.
				c.write(fmt.Sprintf("BDAT %d LAST\r\n%s", len(testMsg)+1000, testMsg))
			} else {
				c.cmd("DATA", "354")
				c.write(testMsg) // no final dot
			}
			// The client is gone (half-closed, so that it sees any reply).
			if err := c.conn.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			replies, _ := c.rest()
			failed := false
			for _, r := range replies {
				if !strings.HasPrefix(r, "4") {
					t.Errorf("reply %q to a message cut short (all: %q)", r, replies)
				}
				failed = failed || strings.HasPrefix(r, "451 4.4.2")
			}
			if !failed {
				t.Errorf("replies %q, want a 451 4.4.2", replies)
			}
			time.Sleep(200 * time.Millisecond)
			if n := len(h.sink.Messages()); n != 0 {
				t.Errorf("%d messages reached the upstream: a truncated message was relayed", n)
			}
		})
	}
}
