package smtpproxy

import (
	"context"
	"crypto"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

// fuzzConfig serves example.com with one Ed25519 selector (cheap to
// sign with), short timeouts, and no TLS; %s is the sink.
const fuzzConfig = `
hsm: {uri: "pkcs11:token=test"}
smtp:
  hostname: dkimgw.test
  max_message_bytes: 65536
  max_recipients: 5
  read_timeout: 2s
  data_timeout: 5s
upstream: {address: "%s", timeout: 5s, connect_timeout: 2s}
clients:
  - name: fuzz
    networks: ["127.0.0.0/8"]
    domains: [example.com]
domains:
  example.com: {selectors: [ed1]}
`

// replyLine is a well-formed SMTP reply line: a code from 200 to 599,
// then a space or a hyphen and printable text (UTF-8 allowed).
var replyLine = regexp.MustCompile(`^[2-5][0-9][0-9]([ -][^\x00-\x1f\x7f]*)?$`)

// goSMTPEcho are the replies go-smtp (v0.25) makes of client bytes
// without escaping them: an unknown four-byte command, and the EHLO or
// HELO argument, are quoted back as they came, control characters
// included. Only the client that sent them sees them (the upstream never
// gets them: dkimgw greets it with its own name); the fix (quoting)
// belongs in go-smtp. MAIL and RCPT echo their addresses too, which
// dkimgw refuses before go-smtp replies when they hold controls.
var goSMTPEcho = regexp.MustCompile(`(?s)^(500 5\.5\.2 Syntax errors, .{4} command unrecognized|250[ -](2\.0\.0 )?Hello .*)$`)

// FuzzSMTPSession sends arbitrary bytes, as a client would after the
// greeting, to a real Server in front of a recording sink. Whatever the
// bytes: no panic, every reply line is well-formed, the server closes
// the connection once the client has stopped sending (no hang), nothing
// reaches the upstream unsigned, and a well-behaved client is served
// right after. Seeds: testdata/fuzz/FuzzSMTPSession, run by `go test`.
func FuzzSMTPSession(f *testing.F) {
	f.Add([]byte("EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nFrom: a@example.com\r\n\r\nhi\r\n.\r\nQUIT\r\n"))
	sink := testenv.NewSMTPSink(f)
	_, ek := testKeys(f)
	cfg, err := policy.Parse("fuzz.yaml", []byte(fmt.Sprintf(fuzzConfig, sink.Addr())), nil)
	if err != nil {
		f.Fatal(err)
	}
	srv, err := New(Options{Policy: cfg, Settings: settingsOf(cfg),
		Keys:   &memKeys{keys: map[string]crypto.Signer{"ed1._domainkey.example.com": ek}},
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	addr := l.Addr().String()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-served
	})

	f.Fuzz(func(t *testing.T, script []byte) {
		if len(script) > 256<<10 {
			t.Skip("longer than a fuzzer's useful input")
		}
		before := len(sink.Messages())
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		// Write while reading: the server may answer (and close) before
		// it has read everything.
		go func() {
			_, _ = conn.Write(script)
			_ = conn.(*net.TCPConn).CloseWrite()
		}()
		all, err := io.ReadAll(conn)
		if err != nil {
			t.Fatalf("the server did not close the connection after the client stopped: %v (replies %.300q)", err, all)
		}
		lines := strings.Split(string(all), "\r\n")
		if last := lines[len(lines)-1]; last != "" {
			t.Errorf("reply not ended by CRLF: %.200q", last)
		}
		for _, ln := range lines[:len(lines)-1] {
			if !replyLine.MatchString(ln) && !goSMTPEcho.MatchString(ln) {
				t.Errorf("malformed reply line %.200q", ln)
			}
		}
		if !strings.HasPrefix(string(all), "220 ") {
			t.Errorf("no greeting: %.200q", all)
		}

		// Nothing unsigned reached the upstream.
		for _, m := range sink.Messages()[before:] {
			if !strings.HasPrefix(string(m.Data), "DKIM-Signature: ") || dkimTag(strings.SplitN(string(m.Data), "\r\n\r\n", 2)[0], "d") == "" {
				t.Errorf("the upstream got a message without a signature first: %.200q", m.Data)
			}
		}

		// A well-behaved client is still served.
		c, err := dialSMTP(addr)
		if err != nil {
			t.Fatalf("well-behaved client: %v", err)
		}
		defer c.Close()
		if _, err := send(c, "news@mail.example.com", []string{"x@example.net"}, testMsg); err != nil {
			t.Fatalf("well-behaved client after the script: %v", err)
		}
	})
}

// dialSMTP opens a session as a well-behaved client, within 10 seconds.
func dialSMTP(addr string) (*smtp.Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	c := smtp.NewClient(conn)
	if err := c.Hello("client.test"); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}
