package smtpproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

var (
	keysOnce sync.Once
	rsaKey   *rsa.PrivateKey
	edKey    ed25519.PrivateKey
)

func testKeys(t testing.TB) (*rsa.PrivateKey, ed25519.PrivateKey) {
	t.Helper()
	keysOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
		if _, edKey, err = ed25519.GenerateKey(rand.Reader); err != nil {
			panic(err)
		}
	})
	return rsaKey, edKey
}

// memKeys is a KeySource of in-memory keys; fail, when set, is returned
// instead.
type memKeys struct {
	mu   sync.Mutex
	keys map[string]crypto.Signer
	fail error
}

func (m *memKeys) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return nil, m.fail
	}
	k, ok := m.keys[selector+"._domainkey."+domain]
	if !ok {
		return nil, fmt.Errorf("test: no key %s/%s", domain, selector)
	}
	return k, nil
}

func (m *memKeys) setFail(err error) {
	m.mu.Lock()
	m.fail = err
	m.mu.Unlock()
}

// tokenDown is what hsm returns while the token is unreachable.
type tokenDown struct{}

func (tokenDown) Error() string   { return "hsm: token unreachable" }
func (tokenDown) Temporary() bool { return true }

// lookupTXT serves the DKIM records of the test keys.
func lookupTXT(t testing.TB) func(string) ([]string, error) {
	rk, ek := testKeys(t)
	der, err := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	records := map[string]string{
		"rsa1._domainkey.example.com": "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der),
		"ed1._domainkey.example.com":  "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(ek.Public().(ed25519.PublicKey)),
	}
	return func(name string) ([]string, error) {
		if r, ok := records[name]; ok {
			return []string{r}, nil
		}
		return nil, fmt.Errorf("no TXT for %s", name)
	}
}

type harness struct {
	t    *testing.T
	srv  *Server
	addr string
	sink *testenv.SMTPSink
	keys *memKeys
	logs *testenv.LogBuffer
	dir  string
	obs  *recordingObserver
}

// baseConfig is the configuration of most tests; %s is the sink.
const baseConfig = `
hsm: {uri: "pkcs11:token=test"}
smtp:
  hostname: dkimgw.test
  max_message_bytes: 65536
upstream:
  address: "%s"
  timeout: 5s
  connect_timeout: 2s
clients:
  - name: campaigns
    networks: ["127.0.0.0/8"]
    domains: [example.com]
domains:
  example.com:
    selectors: [rsa1, ed1]
    expire: 120h
`

// newHarness starts a sink and a proxy in front of it. conf, if
// non-empty, replaces baseConfig; its %s, if any, is the sink's address
// (a conf without one names another upstream).
func newHarness(t *testing.T, conf string) *harness {
	t.Helper()
	return newHarnessKeys(t, conf, nil)
}

// newHarnessKeys is newHarness with the key source wrap makes of the
// test keys (nil: the keys themselves).
func newHarnessKeys(t *testing.T, conf string, wrap func(*memKeys) KeySource) *harness {
	t.Helper()
	h := &harness{t: t, sink: testenv.NewSMTPSink(t), logs: &testenv.LogBuffer{}, dir: t.TempDir(), obs: &recordingObserver{}}
	rk, ek := testKeys(t)
	h.keys = &memKeys{keys: map[string]crypto.Signer{
		"rsa1._domainkey.example.com": rk,
		"ed1._domainkey.example.com":  ek,
	}}
	if conf == "" {
		conf = baseConfig
	}
	if strings.Contains(conf, "%s") {
		conf = fmt.Sprintf(conf, h.sink.Addr())
	}
	cfg := h.parse(conf)
	var keys KeySource = h.keys
	if wrap != nil {
		keys = wrap(h.keys)
	}
	srv, err := New(Options{Policy: cfg, Settings: settingsOf(cfg), Keys: keys, Observer: h.obs, Logger: slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.srv, h.addr = srv, l.Addr().String()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", h.logs.String())
		}
	})
	return h
}

func (h *harness) parse(text string) *policy.Config {
	h.t.Helper()
	path := filepath.Join(h.dir, fmt.Sprintf("dkimgw-%d.yaml", time.Now().UnixNano()))
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		h.t.Fatal(err)
	}
	cfg, err := policy.Load(path)
	if err != nil {
		h.t.Fatalf("config: %v", err)
	}
	return cfg
}

// reload swaps in cfg as cmd/dkimgw does: its policy and its settings.
func (h *harness) reload(cfg *policy.Config) error {
	return h.srv.Reload(cfg, settingsOf(cfg))
}

// settingsOf fills Settings from a configuration, as cmd/dkimgw does.
func settingsOf(cfg *policy.Config) Settings {
	s, u := cfg.SMTP, cfg.Upstream
	set := Settings{
		Listen: s.Listen, Hostname: s.Hostname,
		MaxMessageBytes: s.MaxMessageBytes, MaxRecipients: s.MaxRecipients, MaxLineLength: s.MaxLineLength,
		MaxConnections: s.MaxConnections, MaxConnectionsPerIP: s.MaxConnectionsPerIP,
		ReadTimeout: s.ReadTimeout, WriteTimeout: s.WriteTimeout, DataTimeout: s.DataTimeout,
		MaxSessionDuration: s.MaxSessionDuration, MaxAuthFailures: s.MaxAuthFailures,
		Upstream: UpstreamSettings{
			Address: u.Address, TLS: u.TLS, TLSServerName: u.TLSServerName, RootCAs: u.RootCAs(),
			Timeout: u.Timeout, ConnectTimeout: u.ConnectTimeout, IdleTimeout: u.IdleTimeout,
			Keepalive: u.Keepalive, MaxConnections: u.MaxConnections, MaxIdle: u.MaxIdle,
		},
		Spool: SpoolSettings{Dir: cfg.Spool.Dir, MemoryLimit: cfg.Spool.MemoryLimit, MemoryTotal: cfg.Spool.MemoryTotal, MaxHeaderBytes: cfg.Spool.MaxHeaderBytes},
	}
	if s.TLS != nil {
		set.Certificate = s.TLS.Certificate()
	}
	return set
}

func (h *harness) dial() *smtp.Client {
	h.t.Helper()
	c, err := smtp.Dial(h.addr)
	if err != nil {
		h.t.Fatalf("dial: %v", err)
	}
	h.t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		h.t.Fatalf("EHLO: %v", err)
	}
	return c
}

const testMsg = "From: News <news@mail.example.com>\r\n" +
	"To: someone@example.net\r\n" +
	"Subject: Hello\r\n" +
	"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n" +
	"Message-ID: <1@mail.example.com>\r\n" +
	"MIME-Version: 1.0\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\n" +
	"\r\n" +
	"Hello,\r\n.leading dot\r\nbye\r\n"

// send runs one transaction and returns the reply to DATA (nil for 250).
func send(c *smtp.Client, from string, to []string, msg string) (*smtp.DataResponse, error) {
	if err := c.Mail(from, nil); err != nil {
		return nil, err
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return nil, err
		}
	}
	w, err := c.Data()
	if err != nil {
		return nil, err
	}
	if _, err := w.Write([]byte(msg)); err != nil {
		return nil, err
	}
	return w.CloseWithResponse()
}

func wantCode(t *testing.T, err error, code int, ec smtp.EnhancedCode) *smtp.SMTPError {
	t.Helper()
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		t.Fatalf("got %v, want an SMTP reply %d %v", err, code, ec)
	}
	if se.Code != code || se.EnhancedCode != ec {
		t.Fatalf("got %d %v %q, want %d %v", se.Code, se.EnhancedCode, se.Message, code, ec)
	}
	return se
}

// verify checks that every DKIM signature of msg verifies and returns
// their d=/s= pairs.
func verify(t *testing.T, msg []byte) []string {
	t.Helper()
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(msg), &dkim.VerifyOptions{LookupTXT: lookupTXT(t)})
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	var ids []string
	for _, v := range vs {
		if v.Err != nil {
			t.Errorf("signature d=%s: %v", v.Domain, v.Err)
		}
		ids = append(ids, v.Domain)
	}
	return ids
}

func TestRelaySignsAndVerifies(t *testing.T) {
	h := newHarness(t, "")
	c := h.dial()
	resp, err := send(c, "bounce@mail.example.com", []string{"someone@example.net"}, testMsg)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	// The reply to DATA is the upstream's, queue ID included.
	if !strings.Contains(resp.StatusText, "queued as SINK1") {
		t.Errorf("DATA reply = %q, want the upstream's text", resp.StatusText)
	}
	msgs := h.sink.WaitMessages(t, 1, 5*time.Second)
	m := msgs[0]
	if m.From != "bounce@mail.example.com" || len(m.To) != 1 || m.To[0] != "someone@example.net" {
		t.Errorf("envelope = %q -> %q", m.From, m.To)
	}
	if !bytes.HasSuffix(m.Data, []byte(testMsg)) {
		t.Errorf("relayed message does not end with the original bytes:\n%s", m.Data)
	}
	if n := bytes.Count(m.Data[:len(m.Data)-len(testMsg)], []byte("DKIM-Signature:")); n != 2 {
		t.Errorf("%d DKIM-Signature fields prepended, want 2 (rsa1, ed1)", n)
	}
	if ids := verify(t, m.Data); len(ids) != 2 {
		t.Errorf("verified %v, want two signatures", ids)
	}
	for _, want := range []string{"s=rsa1", "s=ed1", "d=example.com", "x="} {
		if !bytes.Contains(m.Data, []byte(want)) {
			t.Errorf("signatures lack %q", want)
		}
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
	// One log line for the transaction, with what an operator needs.
	waitFor(t, func() bool { return strings.Contains(h.logs.String(), "msg=transaction") })
	line := grepLine(h.logs.String(), "msg=transaction")
	for _, want := range []string{"client=campaigns", "from_domain=mail.example.com", "d=example.com", "signed=true", "reply=\"250 2.0.0", "duration_s="} {
		if !strings.Contains(line, want) {
			t.Errorf("log line lacks %q: %s", want, line)
		}
	}
}

func grepLine(s, sub string) string {
	for l := range strings.Lines(s) {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for range 200 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met within 2s")
}

func TestPerRecipientAnswers(t *testing.T) {
	h := newHarness(t, "")
	h.sink.RejectRecipient("bad@example.net", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "sink: no such user here"})
	c := h.dial()
	if err := c.Mail("bounce@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("a@example.net", nil); err != nil {
		t.Errorf("RCPT a: %v", err)
	}
	se := wantCode(t, c.Rcpt("bad@example.net", nil), 550, smtp.EnhancedCode{5, 1, 1})
	if se.Message != "sink: no such user here" {
		t.Errorf("RCPT text = %q, want the upstream's", se.Message)
	}
	if err := c.Rcpt("c@example.net", nil); err != nil {
		t.Errorf("RCPT c: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(testMsg))
	if err := w.Close(); err != nil {
		t.Fatalf("DATA: %v", err)
	}
	msgs := h.sink.WaitMessages(t, 1, 5*time.Second)
	if got := strings.Join(msgs[0].To, ","); got != "a@example.net,c@example.net" {
		t.Errorf("sink recipients = %s", got)
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(h.sink.Messages()); n != 1 {
		t.Errorf("sink got %d messages, want 1", n)
	}
}

func TestUnknownClientIsRefusedAtMail(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, `["127.0.0.0/8"]`, `["192.0.2.0/24"]`, 1))
	c := h.dial()
	wantCode(t, c.Mail("x@example.com", nil), 530, smtp.EnhancedCode{5, 7, 0})
	if n := h.sink.Sessions(); n != 0 {
		t.Errorf("the upstream saw %d sessions for a refused client", n)
	}
}

func TestPolicyReplies(t *testing.T) {
	h := newHarness(t, "")
	tests := []struct {
		name string
		msg  string
		code int
		ec   smtp.EnhancedCode
		text string
		// closes: go-smtp cannot resynchronise after an over-long line, so
		// it closes the connection after the reply.
		closes bool
	}{
		{"From domain not allowed", strings.Replace(testMsg, "news@mail.example.com", "news@example.org", 1), 550, smtp.EnhancedCode{5, 7, 1}, `"example.org"`, false},
		{"look-alike domain", strings.Replace(testMsg, "news@mail.example.com", "news@badexample.com", 1), 550, smtp.EnhancedCode{5, 7, 1}, `"badexample.com"`, false},
		{"no From", strings.Replace(testMsg, "From: News <news@mail.example.com>\r\n", "", 1), 550, smtp.EnhancedCode{5, 6, 0}, "Message refused", false},
		{"line too long", testMsg + strings.Repeat("x", 5000) + "\r\n", 500, smtp.EnhancedCode{5, 5, 2}, "Line too long", true},
		{"two From", "From: a@example.com\r\n" + testMsg, 550, smtp.EnhancedCode{5, 6, 0}, "Message refused", false},
		{"too large", testMsg + strings.Repeat(strings.Repeat("x", 70)+"\r\n", 1000), 552, smtp.EnhancedCode{5, 3, 4}, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := h.dial()
			_, err := send(c, "bounce@example.com", []string{"a@example.net"}, tt.msg)
			se := wantCode(t, err, tt.code, tt.ec)
			if !strings.Contains(se.Message, tt.text) {
				t.Errorf("reply %q lacks %q", se.Message, tt.text)
			}
			if tt.closes {
				return
			}
			// The connection stays usable, and the next message goes through.
			if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
				t.Errorf("next transaction: %v", err)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	for _, m := range h.sink.Messages() {
		if !bytes.HasSuffix(m.Data, []byte(testMsg)) {
			t.Errorf("a refused message reached the upstream:\n%.300s", m.Data)
		}
	}
	if got := len(h.sink.Messages()); got != len(tests)-1 {
		t.Errorf("sink got %d messages, want %d (only the good ones)", got, len(tests)-1)
	}
}

func TestSizeRefusedAtMail(t *testing.T) {
	h := newHarness(t, "")
	c := h.dial()
	wantCode(t, c.Mail("bounce@example.com", &smtp.MailOptions{Size: 1 << 20}), 552, smtp.EnhancedCode{5, 3, 4})
}

func TestUnauthorizedRelayUnsigned(t *testing.T) {
	h := newHarness(t, baseConfig+"on_unauthorized: relay-unsigned\n")
	msg := strings.Replace(testMsg, "news@mail.example.com", "news@example.org", 1)
	if _, err := send(h.dial(), "b@example.org", []string{"a@example.net"}, msg); err != nil {
		t.Fatalf("send: %v", err)
	}
	m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]
	if string(m.Data) != msg {
		t.Errorf("relayed %q, want the message unchanged and unsigned", m.Data)
	}
}

func TestTokenFailure(t *testing.T) {
	t.Run("tempfail", func(t *testing.T) {
		h := newHarness(t, "")
		h.keys.setFail(fmt.Errorf("hsm: sign: %w", tokenDown{}))
		c := h.dial()
		_, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg)
		wantCode(t, err, 451, smtp.EnhancedCode{4, 7, 0})
		// The token comes back: the retry is signed.
		h.keys.setFail(nil)
		if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
			t.Fatalf("retry: %v", err)
		}
		msgs := h.sink.WaitMessages(t, 1, 5*time.Second)
		time.Sleep(50 * time.Millisecond)
		if n := len(h.sink.Messages()); n != 1 {
			t.Fatalf("sink got %d messages, want exactly 1", n)
		}
		verify(t, msgs[0].Data)
		if line := grepLine(h.logs.String(), "reply=\"451 4.7.0"); !strings.Contains(line, "temporary=true") {
			t.Errorf("log of the failed transaction lacks the cause: %q", line)
		}
	})
	t.Run("relay-unsigned", func(t *testing.T) {
		h := newHarness(t, baseConfig+"on_token_error: relay-unsigned\n")
		h.keys.setFail(tokenDown{})
		if _, err := send(h.dial(), "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
			t.Fatalf("send: %v", err)
		}
		if m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Data) != testMsg {
			t.Errorf("relayed %q, want unsigned original", m.Data)
		}
	})
}

func TestUpstreamFailures(t *testing.T) {
	h := newHarness(t, "")
	c := h.dial()

	h.sink.FailData(&smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "sink: disk full"})
	_, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg)
	if se := wantCode(t, err, 452, smtp.EnhancedCode{4, 3, 1}); se.Message != "sink: disk full" {
		t.Errorf("text = %q", se.Message)
	}
	h.sink.FailData(&smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "sink: spam"})
	_, err = send(c, "bounce@example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 554, smtp.EnhancedCode{5, 7, 1})
	h.sink.FailData(nil)

	h.sink.FailMail(&smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "sink: going away"})
	// 421 from the upstream becomes 451: dkimgw itself is not closing.
	wantCode(t, c.Mail("bounce@example.com", nil), 451, smtp.EnhancedCode{4, 3, 2})
	h.sink.FailMail(nil)

	h.sink.Stop()
	wantCode(t, c.Mail("bounce@example.com", nil), 451, smtp.EnhancedCode{4, 4, 1})
	h.sink.Start()
	if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("after the upstream is back: %v", err)
	}
	if n := len(h.sink.WaitMessages(t, 1, 5*time.Second)); n != 1 {
		t.Errorf("sink got %d messages, want 1", n)
	}
}

func TestUpstreamTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := tlsFiles(t, dir) // for dkimgw.test, self-signed
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	sinkTLS := &tls.Config{Certificates: []tls.Certificate{pair}}
	upstream := func(settings string) string {
		return strings.Replace(baseConfig, "  timeout: 5s\n", "  timeout: 5s\n"+settings, 1)
	}
	required := upstream(fmt.Sprintf("  tls: required\n  tls_server_name: dkimgw.test\n  tls_ca_file: %s\n", certFile))
	tests := []struct {
		name      string
		conf      string
		sinkTLS   bool
		wantCode  int // 0: delivered
		wantEC    smtp.EnhancedCode
		wantOnTLS bool
	}{
		{"required, verified", required, true, 0, smtp.EnhancedCode{}, true},
		{"required, upstream without STARTTLS", required, false, 451, smtp.EnhancedCode{4, 7, 10}, false},
		{"required, wrong name", strings.Replace(required, "tls_server_name: dkimgw.test", "tls_server_name: other.test", 1), true, 451, smtp.EnhancedCode{4, 4, 1}, false},
		{"required, unknown CA", upstream("  tls: required\n  tls_server_name: dkimgw.test\n"), true, 451, smtp.EnhancedCode{4, 4, 1}, false},
		{"opportunistic, offered", upstream("  tls: opportunistic\n"), true, 0, smtp.EnhancedCode{}, true},
		{"opportunistic, not offered", upstream("  tls: opportunistic\n"), false, 0, smtp.EnhancedCode{}, false},
		{"none, offered", upstream("  tls: none\n"), true, 0, smtp.EnhancedCode{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, tt.conf)
			if tt.sinkTLS {
				h.sink.EnableSTARTTLS(sinkTLS)
			}
			c := h.dial()
			if tt.wantCode != 0 {
				// The upstream connection is opened at MAIL: that is where
				// a TLS failure shows, as a 4xx (the sender retries).
				wantCode(t, c.Mail("bounce@example.com", nil), tt.wantCode, tt.wantEC)
				if got := len(h.sink.Messages()); got != 0 {
					t.Fatalf("%d messages reached the upstream", got)
				}
				return
			}
			if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
				t.Fatalf("send: %v", err)
			}
			msgs := h.sink.WaitMessages(t, 1, 5*time.Second)
			if msgs[0].TLS != tt.wantOnTLS {
				t.Errorf("message went upstream with TLS=%v, want %v", msgs[0].TLS, tt.wantOnTLS)
			}
			verify(t, msgs[0].Data)
		})
	}
}

func TestUpstreamTimeoutIsTemporary(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, "timeout: 5s", "timeout: 300ms", 1))
	h.sink.DelayData(time.Second)
	_, err := send(h.dial(), "bounce@example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 451, smtp.EnhancedCode{4, 4, 2})
}

func TestUpstreamConnectionsAreReused(t *testing.T) {
	h := newHarness(t, "")
	for i := range 5 {
		c := h.dial()
		if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		c.Quit()
	}
	// An aborted transaction (RSET) leaves the connection reusable too.
	c := h.dial()
	c.Mail("bounce@example.com", nil)
	c.Rcpt("a@example.net", nil)
	c.Reset()
	time.Sleep(100 * time.Millisecond) // the RSET upstream runs in the background
	if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	h.sink.WaitMessages(t, 6, 5*time.Second)
	if n := h.sink.Sessions(); n != 1 {
		t.Errorf("upstream saw %d sessions for 6 transactions, want 1", n)
	}
}

func TestPipelining(t *testing.T) {
	h := newHarness(t, "")
	conn, err := net.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	readReply := func() string {
		var lines []string
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("read: %v (so far %q)", err, lines)
			}
			lines = append(lines, strings.TrimRight(l, "\r\n"))
			if len(l) < 4 || l[3] == ' ' {
				return strings.Join(lines, "|")
			}
		}
	}
	readReply() // greeting
	fmt.Fprintf(conn, "EHLO client.test\r\n")
	if ehlo := readReply(); !strings.Contains(ehlo, "PIPELINING") || !strings.Contains(ehlo, "SMTPUTF8") || !strings.Contains(ehlo, "8BITMIME") || !strings.Contains(ehlo, "SIZE 65536") || strings.Contains(ehlo, "AUTH") {
		t.Errorf("EHLO reply = %s", ehlo)
	}
	// One write: the whole transaction, as a pipelining client sends it.
	fmt.Fprintf(conn, "MAIL FROM:<b@example.com> BODY=8BITMIME\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<c@example.net> NOTIFY=FAILURE\r\nDATA\r\n")
	for i, want := range []string{"250", "250", "250", "354"} {
		if got := readReply(); !strings.HasPrefix(got, want) {
			t.Fatalf("reply %d = %q, want %s", i, got, want)
		}
	}
	fmt.Fprintf(conn, "%s.\r\nQUIT\r\n", strings.ReplaceAll(testMsg, "\r\n.", "\r\n.."))
	if got := readReply(); !strings.HasPrefix(got, "250 2.0.0") {
		t.Fatalf("DATA reply = %q", got)
	}
	if got := readReply(); !strings.HasPrefix(got, "221") {
		t.Fatalf("QUIT reply = %q", got)
	}
	m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]
	if len(m.RcptOpts) != 2 || len(m.RcptOpts[1].Notify) != 1 || m.RcptOpts[1].Notify[0] != smtp.DSNNotifyFailure {
		t.Errorf("NOTIFY not relayed: %+v", m.RcptOpts)
	}
	if !bytes.HasSuffix(m.Data, []byte(testMsg)) {
		t.Errorf("dot-unstuffing broke the message")
	}
}

func TestUTF8AndEightBitPassThrough(t *testing.T) {
	h := newHarness(t, "")
	msg := "From: Jürgen <jürgen@mail.example.com>\r\nTo: zoë@example.net\r\nSubject: Grüße ✉\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" +
		"Schöne Grüße — ünïcödé\r\n\xff\xfe raw 8-bit bytes\r\n"
	c := h.dial()
	if err := c.Mail("jürgen@mail.example.com", &smtp.MailOptions{UTF8: true, Body: smtp.Body8BitMIME}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("zoë@example.net", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(msg))
	if err := w.Close(); err != nil {
		t.Fatalf("DATA: %v", err)
	}
	m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]
	if !m.MailOpts.UTF8 || m.From != "jürgen@mail.example.com" || m.To[0] != "zoë@example.net" {
		t.Errorf("envelope = %q %q utf8=%v", m.From, m.To, m.MailOpts.UTF8)
	}
	if !bytes.HasSuffix(m.Data, []byte(msg)) {
		t.Errorf("message not relayed byte for byte")
	}
	verify(t, m.Data)
}

// tlsFiles writes a self-signed certificate and key for dkimgw.test.
func tlsFiles(t *testing.T, dir string) (cert, key string) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dkimgw.test"}, DNSNames: []string{"dkimgw.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(k)
	cert, key = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return cert, key
}

func TestAuth(t *testing.T) {
	dir := t.TempDir()
	cert, key := tlsFiles(t, dir)
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	pw := filepath.Join(dir, "tenant.bcrypt")
	os.WriteFile(pw, hash, 0o600)
	conf := fmt.Sprintf(`
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
domains:
  example.com: {selectors: [ed1]}
`, cert, key, pw)
	h := newHarness(t, conf)

	t.Run("no AUTH over plain text", func(t *testing.T) {
		c := h.dial()
		if ok, _ := c.Extension("AUTH"); ok {
			t.Error("AUTH advertised before STARTTLS")
		}
		if ok, _ := c.Extension("STARTTLS"); !ok {
			t.Error("STARTTLS not advertised")
		}
		err := c.Auth(sasl.NewPlainClient("", "tenant", "s3cret"))
		var se *smtp.SMTPError
		if !errors.As(err, &se) || se.Code/100 != 5 {
			t.Errorf("AUTH over plain text = %v, want a 5xx", err)
		}
		// Not authenticated, not in a network: refused.
		wantCode(t, c.Mail("x@example.com", nil), 530, smtp.EnhancedCode{5, 7, 0})
	})

	startTLS := func(t *testing.T) *smtp.Client {
		c, err := smtp.DialStartTLS(h.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("STARTTLS: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	t.Run("AUTH PLAIN over STARTTLS", func(t *testing.T) {
		c := startTLS(t)
		if err := c.Auth(sasl.NewPlainClient("", "tenant", "s3cret")); err != nil {
			t.Fatalf("AUTH PLAIN: %v", err)
		}
		if _, err := send(c, "b@example.com", []string{"a@example.net"}, testMsg); err != nil {
			t.Fatalf("send: %v", err)
		}
		verify(t, h.sink.WaitMessages(t, 1, 5*time.Second)[0].Data)
	})
	t.Run("AUTH LOGIN over STARTTLS", func(t *testing.T) {
		c := startTLS(t)
		if err := c.Auth(sasl.NewLoginClient("tenant", "s3cret")); err != nil {
			t.Fatalf("AUTH LOGIN: %v", err)
		}
		if err := c.Mail("b@example.com", nil); err != nil {
			t.Fatalf("MAIL: %v", err)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		c := startTLS(t)
		wantCode(t, c.Auth(sasl.NewPlainClient("", "tenant", "guess")), 535, smtp.EnhancedCode{5, 7, 8})
		wantCode(t, c.Auth(sasl.NewPlainClient("", "tenant", "guess2")), 421, smtp.EnhancedCode{4, 7, 0})
	})
}

func TestSlowClientMidData(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  read_timeout: 300ms\n", 1))
	conn, err := net.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "EHLO c\r\nMAIL FROM:<b@example.com>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n%s", testMsg[:60])
	// The client now stalls. dkimgw must give up and close the connection.
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	all, _ := readAll(conn)
	if !strings.Contains(all, "451 4.4.2") {
		t.Errorf("replies = %q, want a 451 4.4.2 for the stalled DATA", all)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(h.sink.Messages()); n != 0 {
		t.Errorf("a half-received message reached the upstream")
	}
}

func readAll(c net.Conn) (string, error) {
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			return b.String(), err
		}
	}
}

func TestConcurrentClients(t *testing.T) {
	const n = 200
	// All from 127.0.0.1: lift the per-source limit (default 100).
	conf := strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  max_connections_per_ip: 1000\n", 1)
	h := newHarness(t, strings.Replace(conf, "[rsa1, ed1]", "[ed1]", 1))
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			c, err := smtp.Dial(h.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if _, err := send(c, "b@example.com", []string{fmt.Sprintf("r%d@example.net", i)}, testMsg); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	msgs := h.sink.WaitMessages(t, n, 30*time.Second)
	seen := map[string]bool{}
	for _, m := range msgs {
		seen[m.To[0]] = true
	}
	if len(seen) != n || len(msgs) != n {
		t.Errorf("sink got %d messages for %d recipients, want %d each", len(msgs), len(seen), n)
	}
}

func TestShutdownFinishesTransactionsInFlight(t *testing.T) {
	h := newHarness(t, "")
	h.sink.DelayData(500 * time.Millisecond)
	idle := h.dial() // a connection with no transaction: closed at once

	busy := h.dial()
	result := make(chan error, 1)
	go func() {
		_, err := send(busy, "b@example.com", []string{"a@example.net"}, testMsg)
		result <- err
	}()
	time.Sleep(200 * time.Millisecond) // the message is now with the slow upstream

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-result; err != nil {
		t.Errorf("transaction in flight: %v, want it to complete", err)
	}
	h.sink.WaitMessages(t, 1, time.Second)
	if err := idle.Noop(); err == nil {
		t.Error("idle connection still open after Shutdown")
	}
	if _, err := net.DialTimeout("tcp", h.addr, time.Second); err == nil {
		t.Error("still accepting connections after Shutdown")
	}
}

func TestReload(t *testing.T) {
	h := newHarness(t, "")
	// A configuration that no longer lets campaigns use example.com.
	stricter := strings.Replace(fmt.Sprintf(baseConfig, h.sink.Addr()), "domains: [example.com]", "domains: [other.example.com]", 1)
	if err := h.reload(h.parse(stricter)); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	_, err := send(h.dial(), "b@example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 550, smtp.EnhancedCode{5, 7, 1})

	moved := strings.Replace(stricter, "hostname: dkimgw.test", "hostname: other.test\n  listen: 127.0.0.1:2525", 1)
	err = h.reload(h.parse(moved))
	if err == nil || !strings.Contains(err.Error(), "smtp.listen") || !strings.Contains(err.Error(), "smtp.hostname") {
		t.Fatalf("Reload with a new listen address = %v, want a refusal naming the keys", err)
	}
	if got := h.srv.Policy().(*policy.Config).Clients[0].Domains[0]; got != "other.example.com" {
		t.Errorf("a refused reload changed the configuration: %s", got)
	}
}

func TestMaxConnections(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, "  max_message_bytes: 65536\n", "  max_message_bytes: 65536\n  max_connections: 1\n", 1))
	h.dial()
	conn, err := net.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	all, _ := readAll(conn)
	if !strings.HasPrefix(all, "421 4.3.2") {
		t.Errorf("second connection got %q, want 421 4.3.2", all)
	}
	if n := h.srv.Connections(); n != 1 {
		t.Errorf("Connections() = %d, want 1", n)
	}
	h.obs.mu.Lock()
	defer h.obs.mu.Unlock()
	if !slices.Equal(h.obs.refused, []string{RefusedMaxConnections}) {
		t.Errorf("refusals reported = %q, want [%s]", h.obs.refused, RefusedMaxConnections)
	}
}

// TestShutdownRacingServe: a Shutdown that comes while Serve is still
// starting (a SIGTERM during start-up; every short test's cleanup) stops
// it. go-smtp registers a listener only inside its own Serve, so a
// Shutdown in between used to leave Serve accepting forever.
func TestShutdownRacingServe(t *testing.T) {
	h := newHarness(t, "")
	cfg := h.parse(fmt.Sprintf(baseConfig, h.sink.Addr()))
	for i := range 300 {
		srv, err := New(Options{Policy: cfg, Settings: settingsOf(cfg), Keys: h.keys, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- srv.Serve(l) }()
		for range i % 4 {
			runtime.Gosched() // vary where Shutdown lands
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = srv.Shutdown(ctx)
		cancel()
		if err != nil {
			t.Fatalf("iteration %d: Shutdown: %v", i, err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("iteration %d: Serve returned %v after Shutdown, want nil", i, err)
			}
		case <-time.After(5 * time.Second):
			l.Close()
			t.Fatalf("iteration %d: Serve still accepting 5 s after Shutdown returned", i)
		}
	}
}
