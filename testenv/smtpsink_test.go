package testenv

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

const sinkTestMsg = "From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"

func sendTo(t *testing.T, addr string, to ...string) error {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Mail("a@example.com", nil); err != nil {
		return err
	}
	var rcptErr error
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			rcptErr = err
		}
	}
	w, err := c.Data()
	if err != nil {
		return errors.Join(rcptErr, err)
	}
	if _, err := w.Write([]byte(sinkTestMsg)); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return rcptErr
}

func TestSMTPSinkRecordsAndRejects(t *testing.T) {
	s := NewSMTPSink(t)
	s.RejectRecipient("bad@example.net", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"})
	err := sendTo(t, s.Addr(), "b@example.net", "bad@example.net", "c@example.net")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 550 {
		t.Fatalf("send = %v, want the 550 of the rejected recipient", err)
	}
	msgs := s.WaitMessages(t, 1, 5*time.Second)
	if got := strings.Join(msgs[0].To, ","); got != "b@example.net,c@example.net" {
		t.Errorf("recipients = %s", got)
	}
	if !bytes.Equal(msgs[0].Data, []byte(sinkTestMsg)) {
		t.Errorf("data = %q", msgs[0].Data)
	}

	s.FailData(&smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"})
	if err := sendTo(t, s.Addr(), "b@example.net"); !errors.As(err, &se) || se.Code != 451 {
		t.Fatalf("send with FailData = %v, want 451", err)
	}
	if n := len(s.Messages()); n != 1 {
		t.Errorf("%d messages after a refused DATA, want 1", n)
	}
}

func TestSMTPSinkStopStart(t *testing.T) {
	s := NewSMTPSink(t)
	s.Stop()
	if err := sendTo(t, s.Addr(), "b@example.net"); err == nil {
		t.Fatal("send to a stopped sink succeeded")
	}
	s.Start()
	if err := sendTo(t, s.Addr(), "b@example.net"); err != nil {
		t.Fatalf("send after Start: %v", err)
	}
	s.WaitMessages(t, 1, 5*time.Second)
}
