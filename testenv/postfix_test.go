package testenv

import (
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
