package smtpproxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Hostile input: what a client that means harm sends, and what it must
// not achieve. The heavy forms (a whole 1 GB DATA stream) run when
// DKIMGW_HOSTILE_FULL=1 (`make test-faults`); `make test` runs the same
// checks on a stream cut short by data_timeout.

// hostileFull reports whether the long forms of the hostile tests run.
func hostileFull() bool { return os.Getenv("DKIMGW_HOSTILE_FULL") == "1" }

// recordingUpstream is an upstream MTA that says yes to everything and
// records every line it receives, so that a test can see what dkimgw
// passed on, not only what arrived as a message.
type recordingUpstream struct {
	l     net.Listener
	mu    sync.Mutex
	lines []string
	msgs  int
	wg    sync.WaitGroup
}

func newRecordingUpstream(t *testing.T) *recordingUpstream {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &recordingUpstream{l: l}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		u.wg.Wait()
	})
	return u
}

func (u *recordingUpstream) addr() string { return u.l.Addr().String() }

func (u *recordingUpstream) serve(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReaderSize(c, 64<<10)
	io.WriteString(c, "220 up.test ESMTP\r\n")
	inData := false
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line := strings.TrimSuffix(l, "\r\n")
		u.mu.Lock()
		if !inData {
			u.lines = append(u.lines, line)
		}
		u.mu.Unlock()
		if inData {
			if line == "." {
				inData = false
				u.mu.Lock()
				u.msgs++
				u.mu.Unlock()
				io.WriteString(c, "250 2.0.0 queued\r\n")
			}
			continue
		}
		verb := strings.ToUpper(line)
		switch {
		case strings.HasPrefix(verb, "EHLO"):
			io.WriteString(c, "250-up.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-PIPELINING\r\n250 SIZE 1000000000\r\n")
		case verb == "DATA":
			inData = true
			io.WriteString(c, "354 go ahead\r\n")
		case verb == "QUIT":
			io.WriteString(c, "221 bye\r\n")
			return
		default:
			io.WriteString(c, "250 2.0.0 ok\r\n")
		}
	}
}

// commands returns the command lines received so far.
func (u *recordingUpstream) commands() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.lines...)
}

func (u *recordingUpstream) messages() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.msgs
}

// TestSmuggledControlCharactersRefused: CR, LF or NUL inside an envelope
// address or a MAIL/RCPT parameter is refused with a 5xx, and nothing of
// it reaches the upstream (where a CR or LF would start a command of the
// attacker's choosing, and a NUL cuts a string short in C MTAs).
func TestSmuggledControlCharactersRefused(t *testing.T) {
	up := newRecordingUpstream(t)
	h := newHarness(t, strings.Replace(baseConfig, `"%s"`, `"`+up.addr()+`"`, 1))
	const mark = "SMUGGLED"
	mails := []string{
		"MAIL FROM:<a\r" + mark + "@example.com>",
		"MAIL FROM:<a\x00" + mark + "@example.com>",
		"MAIL FROM:<a@example.com> ENVID=x\r" + mark,
		"MAIL FROM:<a@example.com> ENVID=x\x00" + mark,
		"MAIL FROM:<a@example.com> ENVID=x+0D+0A" + mark,
		"MAIL FROM:<a@example.com> ENVID=x+00" + mark,
		"MAIL FROM:<a@example.com> RET=HDRS\r" + mark,
		"MAIL FROM:<a@example.com> BODY=8BITMIME\x00" + mark,
	}
	rcpts := []string{
		"RCPT TO:<b\r" + mark + "@example.net>",
		"RCPT TO:<b\x00" + mark + "@example.net>",
		"RCPT TO:<b@example.net> ORCPT=rfc822;b\r" + mark,
		"RCPT TO:<b@example.net> ORCPT=rfc822;b+0D+0A" + mark,
		"RCPT TO:<b@example.net> ORCPT=rfc822;b+00" + mark,
		"RCPT TO:<b@example.net> NOTIFY=NEVER\x00" + mark,
		"RCPT TO:<b@example.net> ORCPT=utf-8;b\\x{0D}" + mark,
	}
	c := dialRaw(t, h.addr)
	c.cmd("EHLO client.test", "250")
	for _, m := range mails {
		if r := c.send(m+"\r\n", ""); !strings.HasPrefix(r, "5") {
			t.Errorf("%q: reply %q, want 5xx", m, r)
			c.cmd("RSET", "250")
		}
	}
	// A bare LF ends a line: the rest becomes a second command, and both
	// halves must be refused.
	if err := c.write("MAIL FROM:<a\n" + mark + "@example.com>\r\n"); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if r := c.reply(); !strings.HasPrefix(r, "5") {
			t.Errorf("MAIL split by a bare LF, part %d: reply %q, want 5xx", i+1, r)
		}
	}
	c.cmd("RSET", "250")
	c.cmd("MAIL FROM:<a@example.com>", "250")
	for _, r := range rcpts {
		if got := c.send(r+"\r\n", ""); !strings.HasPrefix(got, "5") {
			t.Errorf("%q: reply %q, want 5xx", r, got)
		}
	}
	// The session still works for a clean transaction.
	c.cmd("RCPT TO:<b@example.net>", "250")
	c.cmd("DATA", "354")
	c.send(strings.ReplaceAll(testMsg, "\r\n.", "\r\n..")+".\r\n", "250")
	c.cmd("QUIT", "221")

	waitFor(t, func() bool { return up.messages() == 1 })
	for _, l := range up.commands() {
		if strings.Contains(l, mark) || strings.ContainsAny(l, "\x00\r") || strings.Contains(strings.ToUpper(l), "+0D") ||
			strings.Contains(strings.ToUpper(l), "+00") || strings.Contains(strings.ToUpper(l), "+0A") {
			t.Errorf("the upstream received %q", l)
		}
	}
}

// heapSampler records the peak of the heap while it runs. It lowers
// GOGC meanwhile, so that garbage not yet collected does not pass for
// growth.
type heapSampler struct {
	gogc int
	base uint64
	peak atomic.Uint64
	stop chan struct{}
	done chan struct{}
}

func heapObjects() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

func startHeapSampler() *heapSampler {
	gogc := debug.SetGCPercent(10)
	runtime.GC()
	hs := &heapSampler{gogc: gogc, base: heapObjects(), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(hs.done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if v := heapObjects(); v > hs.peak.Load() {
				hs.peak.Store(v)
			}
			select {
			case <-hs.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return hs
}

// growth stops sampling and returns the peak over the baseline.
func (hs *heapSampler) growth() uint64 {
	close(hs.stop)
	<-hs.done
	debug.SetGCPercent(hs.gogc)
	if p := hs.peak.Load(); p > hs.base {
		return p - hs.base
	}
	return 0
}

// maxHeapGrowth is how much the heap may grow while one hostile message
// is received: well above what a flat process needs (the spool keeps
// spool.memory_limit, 1 MiB, in memory; measured: 3.5 MiB at most) and
// below the sizes sent (10 MB header lines, streams of 16 MiB and more).
const maxHeapGrowth = 8 << 20

// streamData sends DATA's content from gen until limit bytes are sent,
// then the final dot, reading the reply concurrently (the server may
// reply while the client is still sending). Everything must be done
// before deadline. It returns the reply and how many bytes went out.
func streamData(t *testing.T, c *rawClient, limit int64, deadline time.Time, gen func(buf []byte) []byte) (string, int64) {
	t.Helper()
	var sent atomic.Int64
	writeErr := make(chan error, 1)
	// The write deadline ends a write the server stopped reading, so
	// the writer always returns.
	_ = c.conn.SetWriteDeadline(deadline)
	go func() {
		buf := make([]byte, 0, 256<<10)
		for sent.Load() < limit {
			buf = gen(buf[:0])
			n, err := c.conn.Write(buf)
			sent.Add(int64(n))
			if err != nil {
				writeErr <- err
				return
			}
		}
		_, err := io.WriteString(c.conn, "\r\n.\r\n")
		writeErr <- err
	}()
	var reply string
	select {
	case reply = <-c.replies:
	case <-time.After(time.Until(deadline) + 10*time.Second):
		t.Fatalf("no reply to the stream by the deadline (%d bytes sent)", sent.Load())
	}
	if err := <-writeErr; err != nil {
		t.Logf("writing the stream: %v (after the reply: the server may close first)", err)
	}
	return reply, sent.Load()
}

// bodyLines fills buf with ordinary 78-octet body lines.
func bodyLines(buf []byte) []byte {
	line := strings.Repeat("x", 76) + "\r\n"
	for len(buf)+len(line) <= cap(buf) {
		buf = append(buf, line...)
	}
	return buf
}

// TestHugeDataCutAtSizeLimit: a DATA stream far over max_message_bytes
// (generated as it is sent) is answered 552 5.3.4, nothing reaches the
// upstream, and the heap does not grow with the stream. go-smtp reads and
// discards the rest of a message before it replies, so the client sends
// it all: 16 MiB over a 1 MiB limit in the short form (the race
// detector makes go-smtp's byte-by-byte reader slow: seconds), 1 GiB over a
// 10 MiB limit in the full form (DKIMGW_HOSTILE_FULL=1).
func TestHugeDataCutAtSizeLimit(t *testing.T) {
	// Bounds well inside go test's default -timeout of 10 minutes.
	limit, stream, dataTimeout := "1048576", int64(16<<20), 4*time.Minute
	if hostileFull() {
		limit, stream, dataTimeout = "10485760", 1<<30, 20*time.Minute
	}
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n",
		"  max_message_bytes: "+limit+"\n  data_timeout: "+dataTimeout.String()+"\n", 1)
	h := newHarness(t, conf)
	c := dialRaw(t, h.addr)
	c.cmd("EHLO client.test", "250")
	c.cmd("MAIL FROM:<news@mail.example.com>", "250")
	c.cmd("RCPT TO:<x@example.net>", "250")
	c.cmd("DATA", "354")
	hs := startHeapSampler()
	start := time.Now()
	first := true
	reply, sent := streamData(t, c, stream, time.Now().Add(dataTimeout), func(buf []byte) []byte {
		if first {
			first = false
			buf = append(buf, "From: news@mail.example.com\r\nSubject: big\r\n\r\n"...)
		}
		return bodyLines(buf)
	})
	grew := hs.growth()
	t.Logf("sent %d MB in %v; reply %q; heap grew %d KiB at most", sent>>20, time.Since(start).Round(time.Millisecond), reply, grew>>10)
	if !strings.HasPrefix(reply, "552 5.3.4") {
		t.Errorf("reply %q, want 552 5.3.4", reply)
	}
	if sent < stream {
		t.Errorf("only %d of %d bytes were sent before the reply", sent, stream)
	}
	if grew > maxHeapGrowth {
		t.Errorf("the heap grew by %d MiB while receiving the stream, want at most %d MiB", grew>>20, maxHeapGrowth>>20)
	}
	if n := len(h.sink.Messages()); n != 0 {
		t.Errorf("the upstream got %d messages", n)
	}
}

// TestHeaderBombsRefused: a header section of 100,000 fields, and a
// header line of 10 MB, are refused with a 5xx without the heap growing
// with them, and nothing reaches the upstream.
func TestHeaderBombsRefused(t *testing.T) {
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 52428800\n", 1)
	h := newHarness(t, conf)
	bombs := []struct {
		name string
		body func(w io.Writer) error
	}{
		{"100,000 small fields", func(w io.Writer) error {
			bw := bufio.NewWriter(w)
			bw.WriteString("From: news@mail.example.com\r\n")
			for i := range 100000 {
				fmt.Fprintf(bw, "X%d: y\r\n", i%10)
			}
			bw.WriteString("\r\nbody\r\n")
			return bw.Flush()
		}},
		{"100,000 fields of 20 octets", func(w io.Writer) error {
			bw := bufio.NewWriter(w)
			bw.WriteString("From: news@mail.example.com\r\n")
			for range 100000 {
				bw.WriteString("X-Bomb: 0123456789\r\n")
			}
			bw.WriteString("\r\nbody\r\n")
			return bw.Flush()
		}},
		{"a header line of 10 MB", func(w io.Writer) error {
			bw := bufio.NewWriter(w)
			bw.WriteString("From: news@mail.example.com\r\nSubject: ")
			chunk := strings.Repeat("a", 64<<10)
			for range 160 {
				bw.WriteString(chunk)
			}
			bw.WriteString("\r\n\r\nbody\r\n")
			return bw.Flush()
		}},
		{"a folded field of 10 MB", func(w io.Writer) error {
			bw := bufio.NewWriter(w)
			bw.WriteString("From: news@mail.example.com\r\nSubject: x")
			fold := "\r\n " + strings.Repeat("a", 70)
			for range (10 << 20) / len(fold) {
				bw.WriteString(fold)
			}
			bw.WriteString("\r\n\r\nbody\r\n")
			return bw.Flush()
		}},
	}
	for _, b := range bombs {
		t.Run(b.name, func(t *testing.T) {
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<news@mail.example.com>", "250")
			c.cmd("RCPT TO:<x@example.net>", "250")
			c.cmd("DATA", "354")
			hs := startHeapSampler()
			wrote := make(chan error, 1)
			go func() {
				_ = c.conn.SetWriteDeadline(time.Now().Add(time.Minute))
				err := b.body(c.conn)
				if err == nil {
					_, err = io.WriteString(c.conn, ".\r\n")
				}
				wrote <- err
			}()
			// go-smtp reads the whole bomb before it replies; the race
			// detector makes that seconds.
			var reply string
			select {
			case reply = <-c.replies:
			case <-time.After(2 * time.Minute):
				t.Fatal("no reply to the bomb within 2 minutes")
			}
			<-wrote
			grew := hs.growth()
			t.Logf("reply %q; heap grew %d KiB at most", reply, grew>>10)
			if !strings.HasPrefix(reply, "5") {
				t.Errorf("reply %q, want a 5xx refusal", reply)
			}
			if grew > maxHeapGrowth {
				t.Errorf("the heap grew by %d MiB, want at most %d MiB", grew>>20, maxHeapGrowth>>20)
			}
		})
	}
	if n := len(h.sink.Messages()); n != 0 {
		t.Errorf("the upstream got %d messages", n)
	}
}

// raiseFileLimit lifts the soft RLIMIT_NOFILE to at least n (both ends of
// every test connection live in this process), or skips the test where
// the hard limit does not allow it.
func raiseFileLimit(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		t.Fatalf("RLIMIT_NOFILE hard limit %d: the test needs %d file descriptors (raise it with ulimit -Hn)", lim.Max, n)
	}
	old := lim
	lim.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// TestSlowLorisAndIdleConnectionsDoNotStarve: 1,000 idle connections
// from 20 source addresses (within max_connections_per_ip each), some
// half-way through a command, and clients sending a byte a second (one
// in a command, one in DATA) leave a well-behaved client served at once.
// Functional, not a benchmark: the bound is generous; the time taken is
// logged.
func TestSlowLorisAndIdleConnectionsDoNotStarve(t *testing.T) {
	const idle, sources = 1000, 20
	raiseFileLimit(t, 2*idle+500)
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n",
		"  max_message_bytes: 65536\n  max_connections: 1100\n  max_connections_per_ip: 60\n", 1)
	h := newHarness(t, conf)

	// The slow lorises: a byte a second, until the test ends.
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(done); wg.Wait() }()
	loris := func(src, prefix, trickle string) {
		conn := dialFrom(t, src, h.addr)
		readLine(t, conn)
		io.WriteString(conn, prefix)
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				case <-tick.C:
				}
				conn.SetWriteDeadline(time.Now().Add(time.Second))
				if _, err := conn.Write([]byte{trickle[i%len(trickle)]}); err != nil {
					return
				}
			}
		}()
	}
	loris("127.0.0.200", "", "EHLO slowly-but-surely.example\r\n")
	loris("127.0.0.201", "EHLO l\r\nMAIL FROM:<news@mail.example.com>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nFrom: news@mail.example.com\r\n\r\n", "x")

	// The idle crowd.
	conns := make([]net.Conn, 0, idle)
	for i := range idle {
		src := fmt.Sprintf("127.0.0.%d", 2+i%sources)
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", h.addr)
		if err != nil {
			t.Fatalf("idle connection %d from %s: %v", i, src, err)
		}
		conns = append(conns, c)
		switch i % 3 {
		case 1:
			io.WriteString(c, "EHLO idle.example\r\n")
		case 2:
			io.WriteString(c, "MAIL FROM:<half-way")
		}
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Every idle connection got its greeting: each holds a slot.
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		var b [4]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || string(b[:]) != "220 " {
			t.Fatalf("idle connection %d: greeting %q, %v", i, b, err)
		}
	}
	waitFor(t, func() bool { return h.srv.connCount() >= idle+2 })
	time.Sleep(2 * time.Second) // the lorises trickle on

	// The well-behaved client.
	start := time.Now()
	c := h.dial()
	if _, err := send(c, "news@mail.example.com", []string{"x@example.net"}, testMsg); err != nil {
		t.Fatalf("the well-behaved client: %v", err)
	}
	took := time.Since(start)
	t.Logf("well-behaved client served in %v with %d connections open", took.Round(time.Millisecond), h.srv.connCount())
	if took > 5*time.Second {
		t.Errorf("the well-behaved client took %v (want about a second at most)", took)
	}
	if n := len(h.sink.Messages()); n != 1 {
		t.Errorf("the upstream got %d messages, want 1", n)
	}
}
