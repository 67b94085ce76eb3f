package smtpproxy

import (
	"errors"
	"io"
	"net"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// TestEnvelopeRepliesAreGoSMTPs pins what a client gets for an accepted
// MAIL FROM and RCPT TO: go-smtp's own fixed 250 texts, since a backend
// that accepts returns nil and go-smtp writes the reply itself (see
// TestGoSMTPRcpt250IsNotAcceptance for why the upstream's text cannot be
// passed on). docs/cli.md's reply table quotes them.
func TestEnvelopeRepliesAreGoSMTPs(t *testing.T) {
	h := newHarness(t, "")
	conn, err := net.Dial("tcp", h.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	tp := textproto.NewConn(conn)
	expect := func(cmd string, want string) {
		t.Helper()
		if cmd != "" {
			if err := tp.PrintfLine("%s", cmd); err != nil {
				t.Fatal(err)
			}
		}
		_, msg, err := tp.ReadResponse(0)
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		if want != "" && msg != want {
			t.Errorf("%s: reply %q, want %q", cmd, msg, want)
		}
	}
	expect("", "")
	expect("EHLO client.test", "")
	expect("MAIL FROM:<bounce@mail.example.com>", "2.0.0 Roger, accepting mail from <bounce@mail.example.com>")
	expect("RCPT TO:<a@example.net>", "2.0.0 I'll make sure <a@example.net> gets this")
	expect("QUIT", "")
}

// rcpt250Session is a go-smtp backend session whose Rcpt answers with a
// *smtp.SMTPError of code 250, as a relay passing on its upstream's text
// would.
type rcpt250Session struct{}

func (rcpt250Session) Mail(string, *smtp.MailOptions) error { return nil }
func (rcpt250Session) Rcpt(string, *smtp.RcptOptions) error {
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 1, 5}, Message: "upstream says ok"}
}
func (rcpt250Session) Data(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }
func (rcpt250Session) Reset()                 {}
func (rcpt250Session) Logout() error          { return nil }

// TestGoSMTPRcpt250IsNotAcceptance measures go-smtp (v0.25): a 250
// *SMTPError returned by Rcpt is written as the reply, but go-smtp does
// not count the recipient, so DATA is then refused with 502 "Missing
// RCPT TO command". (Its client does not return the text of a 250 either.)
// This is why dkimgw cannot relay the upstream's own 250 to RCPT TO,
// while it does for DATA, where go-smtp takes a 250 *SMTPError as success.
func TestGoSMTPRcpt250IsNotAcceptance(t *testing.T) {
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return rcpt250Session{}, nil }))
	srv.Domain = "test"
	srv.AllowInsecureAuth = true
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	c, err := smtp.Dial(l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("a@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("b@example.net", nil); err != nil {
		t.Fatalf("RCPT: %v (the 250 reply should read as success to a client)", err)
	}
	_, err = c.Data()
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 502 || !strings.Contains(se.Message, "Missing RCPT TO") {
		t.Fatalf("DATA after a 250 *SMTPError from Rcpt: %v; go-smtp changed: the upstream's RCPT text could now be relayed", err)
	}
}
