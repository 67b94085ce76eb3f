package smtpproxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
)

// dialFrom connects to addr from the loopback address src (all of
// 127.0.0.0/8 is local on Linux), so that tests can play two hosts.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readLine reads one reply line within 5 seconds.
func readLine(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b []byte
	one := make([]byte, 1)
	for !strings.HasSuffix(string(b), "\n") {
		if _, err := c.Read(one); err != nil {
			t.Fatalf("read after %q: %v", b, err)
		}
		b = append(b, one[0])
	}
	return string(b)
}

// TestUnknownClientIsClosedAfter530: a host that is no client sees its
// 530 and then loses the connection, instead of holding a connection slot
// until read_timeout.
func TestUnknownClientIsClosedAfter530(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, `["127.0.0.0/8"]`, `["192.0.2.0/24"]`, 1))
	conn := dialFrom(t, "127.0.0.1", h.addr)
	if l := readLine(t, conn); !strings.HasPrefix(l, "220 ") {
		t.Fatalf("greeting %q", l)
	}
	fmt.Fprintf(conn, "EHLO stranger\r\nMAIL FROM:<x@example.com>\r\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	all, err := readAll(conn)
	if !errors.Is(err, io.EOF) {
		t.Fatalf("after the 530 the connection stayed open (read: %v); got %q", err, all)
	}
	i530, i421 := strings.Index(all, "\r\n530 5.7.0 "), strings.Index(all, "\r\n421 4.7.0 ")
	if i530 < 0 || i421 < i530 {
		t.Errorf("replies %q: want 530 5.7.0, then 421 4.7.0, then the close", all)
	}
}

func TestMaxConnectionsPerIP(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  max_connections_per_ip: 2\n", 1))
	for range 2 {
		if l := readLine(t, dialFrom(t, "127.0.0.1", h.addr)); !strings.HasPrefix(l, "220 ") {
			t.Fatalf("connection within the limit got %q", l)
		}
	}
	third := dialFrom(t, "127.0.0.1", h.addr)
	third.SetReadDeadline(time.Now().Add(5 * time.Second))
	all, _ := readAll(third)
	if !strings.HasPrefix(all, "421 4.7.0 ") {
		t.Errorf("connection over the per-address limit got %q, want 421 4.7.0 and the close", all)
	}
	h.obs.mu.Lock()
	if !slices.Equal(h.obs.refused, []string{RefusedMaxConnectionsPerIP}) {
		t.Errorf("refusals reported = %q, want [%s]", h.obs.refused, RefusedMaxConnectionsPerIP)
	}
	h.obs.mu.Unlock()
	// Another host still gets in.
	other := dialFrom(t, "127.0.0.2", h.addr)
	if l := readLine(t, other); !strings.HasPrefix(l, "220 ") {
		t.Errorf("connection from 127.0.0.2 got %q, want the greeting", l)
	}
}

// authHarness serves a TLS configuration whose user tenant (password
// s3cret) belongs to a client with the given extra settings.
func authHarness(t *testing.T, clientExtra string) *harness {
	dir := t.TempDir()
	cert, key := tlsFiles(t, dir)
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	pw := filepath.Join(dir, "tenant.bcrypt")
	os.WriteFile(pw, hash, 0o600)
	return newHarness(t, fmt.Sprintf(`
hsm: {uri: "pkcs11:token=test"}
smtp:
  hostname: dkimgw.test
  tls: {cert_file: %s, key_file: %s}
  max_auth_failures: 2
upstream: {address: "%%s", timeout: 5s}
clients:
  - name: tenant
    users: [{name: tenant, password_file: %s}]
    domains: [example.com]
%s
domains:
  example.com: {selectors: [ed1]}
`, cert, key, pw, clientExtra))
}

// startTLSFrom opens an SMTP session over STARTTLS from the loopback
// address src.
func startTLSFrom(t *testing.T, src, addr string) *smtp.Client {
	t.Helper()
	c, err := smtp.NewClientStartTLS(dialFrom(t, src, addr), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("STARTTLS: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestAuthFailuresSlowDownAcrossConnections: each failed AUTH from one
// address waits longer before its reply, even on a new connection.
func TestAuthFailuresSlowDownAcrossConnections(t *testing.T) {
	h := authHarness(t, "")
	base := 100 * time.Millisecond
	h.srv.auth.setDelays(base, 10*time.Second)
	for i := range 4 {
		c := startTLSFrom(t, "127.0.0.1", h.addr) // a new connection each time
		start := time.Now()
		wantCode(t, c.Auth(sasl.NewPlainClient("", "tenant", fmt.Sprintf("guess%d", i))), 535, smtp.EnhancedCode{5, 7, 8})
		took := time.Since(start)
		// The delay doubles: 100ms, 200ms, 400ms, 800ms. A loaded machine
		// only makes replies later, so the lower bound is safe.
		if want := base << i; took < want {
			t.Errorf("failure %d answered after %v, want at least %v", i+1, took, want)
		}
		c.Close()
	}
	// The right password still works: only failures wait.
	c := startTLSFrom(t, "127.0.0.1", h.addr)
	if err := c.Auth(sasl.NewPlainClient("", "tenant", "s3cret")); err != nil {
		t.Fatalf("AUTH with the right password: %v", err)
	}
}

func TestAuthThrottle(t *testing.T) {
	now := time.Unix(1e9, 0)
	a := newAuthThrottle()
	a.now = func() time.Time { return now }
	src := netip.MustParsePrefix("192.0.2.1/32")
	var got []time.Duration
	for range 7 {
		d, _ := a.failed(src)
		got = append(got, d)
		now = now.Add(time.Second)
	}
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("delays = %v, want %v", got, want)
	}
	if d, _ := a.failed(netip.MustParsePrefix("192.0.2.2/32")); d != authDelayBase {
		t.Errorf("another source's first failure waits %v, want %v", d, authDelayBase)
	}
	now = now.Add(authQuiet + time.Second)
	if d, n := a.failed(src); d != authDelayBase || n != 1 {
		t.Errorf("after a quiet period: delay %v, count %d; want a fresh start", d, n)
	}
	// Memory stays bounded however many sources fail.
	for i := range authMaxSources + 50 {
		a.failed(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32))
	}
	if n := len(a.sources); n > authMaxSources {
		t.Errorf("%d sources tracked, want at most %d", n, authMaxSources)
	}
}

func TestSourceOf(t *testing.T) {
	for _, tt := range []struct{ addr, want string }{
		{"192.0.2.1:25", "192.0.2.1/32"},
		{"[::ffff:192.0.2.1]:25", "192.0.2.1/32"},
		{"[2001:db8:1:2:3:4:5:6]:25", "2001:db8:1:2::/64"},
	} {
		ap := netip.MustParseAddrPort(tt.addr)
		if got := sourceOf(net.TCPAddrFromAddrPort(ap)); got.String() != tt.want {
			t.Errorf("sourceOf(%s) = %s, want %s", tt.addr, got, tt.want)
		}
	}
}

// TestRequireAuth: a require_auth client relays only after AUTH, and
// only from its networks; its address alone is not enough.
func TestRequireAuth(t *testing.T) {
	h := authHarness(t, "    require_auth: true\n    networks: [\"127.0.0.2\"]")
	h.srv.auth.setDelays(time.Millisecond, time.Millisecond)

	t.Run("address alone", func(t *testing.T) {
		c := smtp.NewClient(dialFrom(t, "127.0.0.2", h.addr))
		defer c.Close()
		wantCode(t, c.Mail("b@example.com", nil), 530, smtp.EnhancedCode{5, 7, 0})
	})
	t.Run("AUTH from outside its networks", func(t *testing.T) {
		c := startTLSFrom(t, "127.0.0.1", h.addr)
		wantCode(t, c.Auth(sasl.NewPlainClient("", "tenant", "s3cret")), 535, smtp.EnhancedCode{5, 7, 8})
		wantCode(t, c.Mail("b@example.com", nil), 530, smtp.EnhancedCode{5, 7, 0})
	})
	t.Run("AUTH from its networks", func(t *testing.T) {
		c := startTLSFrom(t, "127.0.0.2", h.addr)
		if err := c.Auth(sasl.NewPlainClient("", "tenant", "s3cret")); err != nil {
			t.Fatalf("AUTH: %v", err)
		}
		if _, err := send(c, "b@example.com", []string{"a@example.net"}, testMsg); err != nil {
			t.Fatalf("send: %v", err)
		}
		verify(t, h.sink.WaitMessages(t, 1, 5*time.Second)[0].Data)
	})
}

// TestClientRemovedMidTransactionIsClosed: a client that a reload removed
// while its transaction was open gets 530 at its next MAIL and is closed
// too, although that MAIL came without RSET.
func TestClientRemovedMidTransactionIsClosed(t *testing.T) {
	h := newHarness(t, "")
	conn := dialFrom(t, "127.0.0.1", h.addr)
	readLine(t, conn)
	fmt.Fprintf(conn, "HELO c\r\n")
	readLine(t, conn)
	fmt.Fprintf(conn, "MAIL FROM:<b@example.com>\r\n")
	if l := readLine(t, conn); !strings.HasPrefix(l, "250 ") {
		t.Fatalf("MAIL: %q", l)
	}
	gone := strings.Replace(fmt.Sprintf(baseConfig, h.sink.Addr()), `["127.0.0.0/8"]`, `["192.0.2.0/24"]`, 1)
	if err := h.reload(h.parse(gone)); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "MAIL FROM:<b@example.com>\r\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	all, err := readAll(conn)
	if !errors.Is(err, io.EOF) || !strings.HasPrefix(all, "530 5.7.0 ") {
		t.Errorf("MAIL after the client was removed: %q, %v; want 530 5.7.0 and the close", all, err)
	}
}
