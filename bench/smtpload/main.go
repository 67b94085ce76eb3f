// Command smtpload is the load client of `make bench`: S sessions send
// messages of a given size to an SMTP server for a fixed time (or a fixed
// count), each message on a new connection as Postfix's smtp-source does,
// and it reports what smtp-source cannot: the latency of every message,
// seen from the client, from connect to the reply to the final dot.
//
//	smtpload -addr 127.0.0.1:10025 -sessions 20 -size 102400 -duration 5s
//
// Output, one line of key=value: sent (messages that got 250), failed,
// secs, msgs_per_s, mb_per_s, p50_ms, p90_ms, p99_ms, max_ms. It exits 1
// if any message failed. Messages are built once per size (76-byte
// lines, no line starts with a dot, so no dot-stuffing is needed) and
// written in large blocks, so that the client costs little CPU next to
// the server it measures.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	addr := flag.String("addr", "", "server host:port")
	sessions := flag.Int("sessions", 20, "concurrent sessions")
	size := flag.Int("size", 4096, "message size in bytes (header and body)")
	duration := flag.Duration("duration", 5*time.Second, "how long to send (ignored with -count)")
	count := flag.Int("count", 0, "send this many messages, then stop")
	rate := flag.Float64("rate", 0, "messages per second in all (0: as fast as the server takes them)")
	perConn := flag.Int("per-conn", 1, "messages per connection")
	from := flag.String("from", "news@example.com", "envelope and header From")
	to := flag.String("to", "reader@example.net", "recipient")
	timeout := flag.Duration("timeout", 60*time.Second, "bound on each message's transaction")
	flag.Parse()
	if *addr == "" || *sessions < 1 || *size < 200 || *perConn < 1 {
		fmt.Fprintln(os.Stderr, "smtpload: -addr is required; -sessions and -per-conn at least 1, -size at least 200")
		os.Exit(2)
	}
	l := &load{addr: *addr, from: *from, to: *to, timeout: *timeout, perConn: *perConn, body: body(*size)}
	if *count > 0 {
		l.left.Store(int64(*count))
	} else {
		l.left.Store(1 << 62)
		l.until = time.Now().Add(*duration)
	}
	if *rate > 0 {
		l.pace = time.NewTicker(time.Duration(float64(time.Second) / *rate))
		defer l.pace.Stop()
	}
	start := time.Now()
	var wg sync.WaitGroup
	lats := make([][]time.Duration, *sessions)
	for i := range *sessions {
		wg.Go(func() { lats[i] = l.session(i) })
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	all := slices.Concat(lats...)
	slices.Sort(all)
	q := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[min(len(all)-1, int(p*float64(len(all))))].Microseconds()) / 1000
	}
	sent := len(all)
	fmt.Printf("sent=%d failed=%d secs=%.3f msgs_per_s=%.1f mb_per_s=%.2f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
		sent, l.failed.Load(), secs, float64(sent)/secs, float64(sent)*float64(*size)/secs/1e6, q(.5), q(.9), q(.99), q(1))
	if msg := l.firstErr.Load(); msg != nil {
		fmt.Fprintf(os.Stderr, "smtpload: %d failed; first: %s\n", l.failed.Load(), *msg)
		os.Exit(1)
	}
}

type load struct {
	addr, from, to string
	timeout        time.Duration
	perConn        int
	body           []byte
	until          time.Time
	pace           *time.Ticker
	left           atomic.Int64
	seq            atomic.Int64
	failed         atomic.Int64
	firstErr       atomic.Pointer[string]
}

// next reports whether another message is to be sent, waiting for its
// turn under -rate.
func (l *load) next() bool {
	if !l.until.IsZero() && time.Now().After(l.until) {
		return false
	}
	if l.left.Add(-1) < 0 {
		return false
	}
	if l.pace != nil {
		<-l.pace.C
	}
	return true
}

// session sends messages until there are none left and returns their
// latencies.
func (l *load) session(id int) []time.Duration {
	var lats []time.Duration
	for l.next() {
		start := time.Now()
		c, err := l.dial()
		if err == nil {
			for i := 0; err == nil; i++ {
				err = c.send(l, start)
				if err != nil {
					break
				}
				lats = append(lats, time.Since(start))
				if i+1 == l.perConn || !l.next() {
					c.quit()
					break
				}
				start = time.Now()
			}
		}
		if err != nil {
			l.failed.Add(1)
			msg := err.Error()
			l.firstErr.CompareAndSwap(nil, &msg)
			time.Sleep(10 * time.Millisecond) // do not spin on a server that refuses
		}
	}
	return lats
}

type conn struct {
	nc net.Conn
	r  *bufio.Reader
	w  *bufio.Writer
}

func (l *load) dial() (*conn, error) {
	nc, err := net.DialTimeout("tcp", l.addr, l.timeout)
	if err != nil {
		return nil, err
	}
	c := &conn{nc: nc, r: bufio.NewReader(nc), w: bufio.NewWriterSize(nc, 64<<10)}
	_ = nc.SetDeadline(time.Now().Add(l.timeout))
	if err := c.expect("220"); err != nil {
		nc.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if err := c.cmd("EHLO smtpload.test", "250"); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

func (c *conn) send(l *load, start time.Time) error {
	_ = c.nc.SetDeadline(start.Add(l.timeout))
	for _, step := range []struct{ line, want string }{
		{"MAIL FROM:<" + l.from + ">", "250"},
		{"RCPT TO:<" + l.to + ">", "250"},
		{"DATA", "354"},
	} {
		if err := c.cmd(step.line, step.want); err != nil {
			c.nc.Close()
			return err
		}
	}
	n := l.seq.Add(1)
	fmt.Fprintf(c.w, "From: News <%s>\r\nTo: <%s>\r\nSubject: smtpload message %d\r\nDate: %s\r\nMessage-ID: <%d.%d@smtpload.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
		l.from, l.to, n, time.Now().Format(time.RFC1123Z), time.Now().UnixNano(), n)
	c.w.Write(l.body)
	c.w.WriteString(".\r\n")
	if err := c.flush(); err != nil {
		return err
	}
	if err := c.expect("250"); err != nil {
		c.nc.Close()
		return fmt.Errorf("end of data: %w", err)
	}
	return nil
}

func (c *conn) quit() {
	_ = c.cmd("QUIT", "221")
	c.nc.Close()
}

func (c *conn) flush() error {
	if err := c.w.Flush(); err != nil {
		c.nc.Close()
		return err
	}
	return nil
}

func (c *conn) cmd(line, want string) error {
	c.w.WriteString(line + "\r\n")
	if err := c.flush(); err != nil {
		return err
	}
	if err := c.expect(want); err != nil {
		return fmt.Errorf("%s: %w", strings.Fields(line)[0], err)
	}
	return nil
}

// expect reads one (possibly multi-line) reply and wants its code.
func (c *conn) expect(code string) error {
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("connection closed")
			}
			return err
		}
		if len(line) < 4 {
			return fmt.Errorf("bad reply %q", line)
		}
		if line[3] == '-' {
			continue
		}
		if line[:3] != code {
			return fmt.Errorf("reply %q, want %s", strings.TrimSpace(line), code)
		}
		return nil
	}
}

// body returns the body that makes a message of about size bytes with
// the header send writes (~250 bytes): 76-byte lines of letters.
func body(size int) []byte {
	n := max(size-250, 78)
	var b strings.Builder
	line := 0
	for b.Len()+78 <= n {
		for i := range 76 {
			b.WriteByte("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "[(line*7+i)%63])
		}
		b.WriteString("\r\n")
		line++
	}
	return []byte(b.String())
}
