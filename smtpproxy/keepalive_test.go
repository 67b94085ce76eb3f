package smtpproxy

import (
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// keepaliveConfig is baseConfig with a short keepalive, a data_timeout
// that allows it, and upstream as the upstream.
func keepaliveConfig(upstream, keepalive, dataTimeout string) string {
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  data_timeout: "+dataTimeout+"\n", 1)
	conf = strings.Replace(conf, "  timeout: 5s\n", "  timeout: 5s\n  keepalive: "+keepalive+"\n", 1)
	if upstream != "" {
		conf = strings.Replace(conf, `address: "%s"`, `address: "`+upstream+`"`, 1)
	}
	return conf
}

// slowData sends one message over DATA, its body a line every interval,
// n lines, and returns the reply to the final dot.
func slowData(t *testing.T, addr string, n int, interval time.Duration) string {
	t.Helper()
	c := dialRaw(t, addr)
	c.cmd("EHLO client.test", "250")
	c.cmd("MAIL FROM:<b@example.com>", "250")
	c.cmd("RCPT TO:<a@example.net>", "250")
	c.cmd("DATA", "354")
	if err := c.write(testMsg); err != nil {
		t.Fatal(err)
	}
	for range n {
		time.Sleep(interval)
		if err := c.write(trickleLine); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	if err := c.write(".\r\n"); err != nil {
		t.Fatal(err)
	}
	return c.reply()
}

// TestKeepaliveHoldsPostfix relays through a real Postfix that drops a
// client silent for 3s (smtpd_timeout), from a client whose DATA takes
// 7s: the NOOPs dkimgw sends meanwhile keep the upstream session, and the
// message is accepted and delivered signed. Then, after the pooled
// connection has idled past smtpd_timeout (Postfix says 421 and closes),
// the next message still goes through, on a new connection.
func TestKeepaliveHoldsPostfix(t *testing.T) {
	t.Parallel() // mostly waiting
	sink := testenv.NewSMTPSink(t)
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{
		Relayhost: sink.Addr(),
		Settings:  map[string]string{"smtpd_timeout": "3s"},
	})
	h := newHarness(t, keepaliveConfig(pf.Addr(), "1s", "30s"))

	reply := slowData(t, h.addr, 14, 500*time.Millisecond)
	if !strings.HasPrefix(reply, "250 2.0.0") || !strings.Contains(reply, "queued as") {
		t.Fatalf("reply to a 7s DATA through Postfix = %q, want Postfix's 250", reply)
	}
	m := sink.WaitMessages(t, 1, 30*time.Second)[0]
	if !strings.Contains(string(m.Data), strings.Repeat(trickleLine, 14)) {
		t.Errorf("the message arrived incomplete:\n%s", m.Data)
	}
	verify(t, m.Data)

	// The connection is back in the pool; Postfix times it out.
	time.Sleep(4 * time.Second)
	if _, err := send(h.dial(), "b@example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("after the pooled connection timed out at the upstream: %v", err)
	}
	sink.WaitMessages(t, 2, 30*time.Second)
	pf.WaitEmpty(30 * time.Second)
}

// TestKeepaliveFailureIsTemporary stops the upstream while the client is
// still sending: the failed NOOP turns into 451 4.4.2 at the end of DATA
// (nothing can move to another connection once the recipients were
// answered), nothing is delivered, and the next message goes through.
func TestKeepaliveFailureIsTemporary(t *testing.T) {
	t.Parallel() // mostly waiting
	h := newHarness(t, keepaliveConfig("", "200ms", "5s"))
	go func() {
		time.Sleep(500 * time.Millisecond)
		h.sink.Stop()
	}()
	reply := slowData(t, h.addr, 10, 150*time.Millisecond)
	if !strings.HasPrefix(reply, "451 4.4.2") {
		t.Fatalf("reply = %q, want 451 4.4.2", reply)
	}
	if line := grepLine(h.logs.String(), "reply=\"451 4.4.2"); !strings.Contains(line, "NOOP") {
		t.Errorf("the transaction log does not say the keepalive failed: %q", line)
	}
	if n := len(h.sink.Messages()); n != 0 {
		t.Fatalf("%d messages delivered", n)
	}
	h.sink.Start()
	if _, err := send(h.dial(), "b@example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("next message: %v", err)
	}
}

// TestJunkRetiresConnection: a connection that has sent maxJunk NOOPs and
// RSETs without delivering a message is not reused, so that a Postfix
// upstream never reaches its junk command limit on it.
func TestJunkRetiresConnection(t *testing.T) {
	h := newHarness(t, "")
	p := h.srv.state.Load().pool
	for _, tt := range []struct {
		junk     int
		wantIdle int
	}{{maxJunk - 1, 1}, {maxJunk, 1}} {
		up, err := p.get(t.Context(), true)
		if err != nil {
			t.Fatal(err)
		}
		up.junk = tt.junk
		p.put(up, connClean)
		if got := p.idleCount(); got != tt.wantIdle {
			t.Errorf("after a connection with %d junk commands: %d idle, want %d", tt.junk, got, tt.wantIdle)
		}
	}
}

// TestKeepaliveStartsNoGoroutine: a message that ends before its first
// NOOP is due (almost all of them) costs a timer, not a goroutine and the
// hand-offs to start and stop it.
func TestKeepaliveStartsNoGoroutine(t *testing.T) {
	const n = 200
	sample := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
	metrics.Read(sample)
	before := sample[0].Value.Uint64()
	up := &upConn{lastUsed: time.Now()}
	for range n {
		ka := startKeepalive(t.Context(), up, time.Hour)
		if err := ka.end(); err != nil {
			t.Fatalf("end: %v", err)
		}
	}
	metrics.Read(sample)
	// Other tests' servers may start a few goroutines meanwhile; one per
	// keepalive would be n.
	if created := sample[0].Value.Uint64() - before; created >= n/4 {
		t.Errorf("%d keepalives started %d goroutines, want none", n, created)
	}
	if up.junk != 0 {
		t.Errorf("%d NOOPs sent, want none before one is due", up.junk)
	}
}
