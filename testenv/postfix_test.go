package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPostfixRelaysAndDefers proves the instance is a pure relay to its
// relayhost, and that a relayhost which is down leaves mail deferred
// until a flush after it is back.
func TestPostfixRelaysAndDefers(t *testing.T) {
	sink := NewSMTPSink(t)
	pf := StartPostfix(t, PostfixOptions{Relayhost: sink.Addr()})

	if err := pf.Submit(t.Context(), "a@example.com", []string{"b@example.net"}, []byte(sinkTestMsg)); err != nil {
		t.Fatalf("submit: %v", err)
	}
	msgs := sink.WaitMessages(t, 1, 20*time.Second)
	if !strings.Contains(string(msgs[0].Data), "Subject: hi") {
		t.Errorf("relayed message = %q", msgs[0].Data)
	}
	pf.WaitEmpty(10 * time.Second)

	sink.Stop()
	if err := pf.Submit(t.Context(), "a@example.com", []string{"b@example.net"}, []byte(sinkTestMsg)); err != nil {
		t.Fatalf("submit: %v", err)
	}
	pf.WaitDeferred(1, 20*time.Second)
	sink.Start()
	pf.Flush()
	sink.WaitMessages(t, 2, 20*time.Second)
	pf.WaitEmpty(10 * time.Second)
}

// TestPostfixRunsTheDocumentedRelayLines: an instance's main.cf holds the
// relay lines of deploy/postfix/main.cf (the documented ones), with the
// test's relayhost.
func TestPostfixRunsTheDocumentedRelayLines(t *testing.T) {
	want, err := PostfixRelaySettings()
	if err != nil {
		t.Fatal(err)
	}
	if want["relayhost"] != "[dkimgw]:10025" || want["smtp_tls_security_level"] == "" {
		t.Fatalf("relay lines = %q; want relayhost [dkimgw]:10025 and smtp_tls_security_level", want)
	}
	sink := NewSMTPSink(t)
	pf := StartPostfix(t, PostfixOptions{Relayhost: sink.Addr()})
	data, err := os.ReadFile(filepath.Join(pf.ConfigDir(), "main.cf"))
	if err != nil {
		t.Fatal(err)
	}
	want["relayhost"] = "[127.0.0.1]:" + strings.Split(sink.Addr(), ":")[1]
	for k, v := range want {
		if line := k + " = " + v + "\n"; !strings.Contains(string(data), line) {
			t.Errorf("main.cf lacks %q:\n%s", line, data)
		}
	}
}
