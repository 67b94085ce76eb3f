package smtpproxy

import (
	"context"
	"crypto"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

// fakePolicy stands behind Policy: loopback sources are its one client,
// which may send mail From mail.example.com only, signed by ed1 alone
// (the YAML configurations of the other tests sign with rsa1 and ed1).
type fakePolicy struct {
	client         *policy.Client
	onUnauthorized policy.UnauthorizedAction

	mu    sync.Mutex
	asked []string // the From domains Sign was asked about
}

func newFakePolicy(name string, onUnauthorized policy.UnauthorizedAction) *fakePolicy {
	return &fakePolicy{client: &policy.Client{Name: name}, onUnauthorized: onUnauthorized}
}

func (f *fakePolicy) ClientByAddr(ip netip.Addr) *policy.Client {
	if ip.IsLoopback() {
		return f.client
	}
	return nil
}

func (f *fakePolicy) ClientByUser(string, netip.Addr) *policy.Client { return nil }

func (f *fakePolicy) Authenticate(string, string) (*policy.Client, error) {
	return nil, policy.ErrBadCredentials
}

func (f *fakePolicy) HasUsers() bool { return false }

func (f *fakePolicy) Sign(cl *policy.Client, fromDomain string) (policy.Signing, error) {
	f.mu.Lock()
	f.asked = append(f.asked, fromDomain)
	f.mu.Unlock()
	if cl != f.client {
		return policy.Signing{}, errors.New("fake: Sign got a client this policy did not return")
	}
	if fromDomain != "mail.example.com" {
		return policy.Signing{}, &policy.UnauthorizedError{Client: cl.Name, FromDomain: fromDomain}
	}
	return policy.Signing{Domain: "example.com", Selectors: []string{"ed1"}}, nil
}

func (f *fakePolicy) ActionOnTokenError() policy.TokenErrorAction { return policy.TokenErrorTempfail }

func (f *fakePolicy) ActionOnUnauthorized() policy.UnauthorizedAction { return f.onUnauthorized }

func (f *fakePolicy) askedAbout() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.asked)
}

var _ Policy = (*fakePolicy)(nil)

// plainSettings are settings written out, not read from a configuration.
func plainSettings(upstream string) Settings {
	return Settings{
		Hostname: "dkimgw.test", MaxMessageBytes: 1 << 16, MaxRecipients: 10, MaxLineLength: 1000,
		MaxConnections: 10, MaxConnectionsPerIP: 10, MaxAuthFailures: 3,
		ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second, DataTimeout: 30 * time.Second,
		MaxSessionDuration: time.Minute,
		Upstream: UpstreamSettings{
			Address: upstream, Timeout: 10 * time.Second, ConnectTimeout: 5 * time.Second,
			IdleTimeout: 10 * time.Second, Keepalive: 5 * time.Second, MaxConnections: 10, MaxIdle: 2,
		},
	}
}

// TestRelayDrivenByPolicy runs the relay on a Policy that is no
// *policy.Config and on settings that come from no configuration: the
// relay asks the policy who the client is and who signs, follows its
// action for a refused From domain, and Reload swaps the policy.
func TestRelayDrivenByPolicy(t *testing.T) {
	sink := testenv.NewSMTPSink(t)
	rk, ek := testKeys(t)
	keys := &memKeys{keys: map[string]crypto.Signer{
		"rsa1._domainkey.example.com": rk,
		"ed1._domainkey.example.com":  ek,
	}}
	logs := &testenv.LogBuffer{}
	first := newFakePolicy("fake-first", policy.UnauthorizedReject)
	set := plainSettings(sink.Addr())
	srv, err := New(Options{Policy: first, Settings: set, Keys: keys, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
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
			t.Logf("proxy log:\n%s", logs.String())
		}
	})
	dial := func() *smtp.Client {
		c, err := smtp.Dial(l.Addr().String())
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.Hello("client.test"); err != nil {
			t.Fatalf("EHLO: %v", err)
		}
		return c
	}

	// Signed as the policy says: one signature, ed1, d=example.com.
	c := dial()
	if _, err := send(c, "b@mail.example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("send From mail.example.com: %v", err)
	}
	m := sink.WaitMessages(t, 1, 5*time.Second)[0]
	if ids := verify(t, m.Data); !slices.Equal(ids, []string{"example.com"}) {
		t.Errorf("signatures by %q, want exactly one by example.com", ids)
	}
	if n := strings.Count(string(m.Data), "DKIM-Signature:"); n != 1 || !strings.Contains(string(m.Data), "s=ed1") {
		t.Errorf("relayed message has %d DKIM-Signature fields, want one with s=ed1:\n%s", n, m.Data)
	}
	if !strings.Contains(logs.String(), "client=fake-first") {
		t.Errorf("the transaction log does not name the policy's client:\n%s", logs.String())
	}

	// A From domain the policy refuses, with its action reject.
	other := strings.Replace(testMsg, "news@mail.example.com", "news@example.org", 1)
	_, err = send(c, "b@example.org", []string{"a@example.net"}, other)
	wantCode(t, err, 550, smtp.EnhancedCode{5, 7, 1})
	if got := first.askedAbout(); !slices.Equal(got, []string{"mail.example.com", "example.org"}) {
		t.Errorf("the policy was asked about %q, want the two From domains", got)
	}

	// A reload that needs a restart changes nothing.
	third := newFakePolicy("fake-third", policy.UnauthorizedRelayUnsigned)
	moved := set
	moved.Listen = "127.0.0.1:1"
	if err := srv.Reload(third, moved); err == nil || !strings.Contains(err.Error(), "smtp.listen") {
		t.Fatalf("Reload with a new listen address = %v, want a refusal naming smtp.listen", err)
	}
	if srv.Policy() != first {
		t.Fatal("a refused reload swapped the policy")
	}

	// Reload swaps the policy: the same From domain now goes unsigned.
	second := newFakePolicy("fake-second", policy.UnauthorizedRelayUnsigned)
	if err := srv.Reload(second, set); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if _, err := send(dial(), "b@example.org", []string{"a@example.net"}, other); err != nil {
		t.Fatalf("send From example.org after the reload: %v", err)
	}
	if m := sink.WaitMessages(t, 2, 5*time.Second)[1]; string(m.Data) != other {
		t.Errorf("relayed %q, want the message unchanged and unsigned", m.Data)
	}
	if got := second.askedAbout(); !slices.Equal(got, []string{"example.org"}) {
		t.Errorf("the new policy was asked about %q, want [example.org]", got)
	}
	if got := third.askedAbout(); len(got) != 0 {
		t.Errorf("the refused policy was asked about %q", got)
	}
}

// TestSettingsUnset: settings not filled in are refused with the keys
// they lack, at New and at Reload (which then keeps the old ones).
func TestSettingsUnset(t *testing.T) {
	p := newFakePolicy("fake", policy.UnauthorizedReject)
	_, err := New(Options{Policy: p, Keys: &memKeys{}})
	if err == nil || !strings.Contains(err.Error(), "smtp.max_connections") || !strings.Contains(err.Error(), "upstream.address") {
		t.Fatalf("New with no settings = %v, want an error naming the unset keys", err)
	}
	if _, err := New(Options{Settings: plainSettings("127.0.0.1:1"), Keys: &memKeys{}}); err == nil {
		t.Fatal("New without a policy succeeded")
	}
	srv, err := New(Options{Policy: p, Settings: plainSettings("127.0.0.1:1"), Keys: &memKeys{}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	broken := plainSettings("127.0.0.1:1")
	broken.Upstream.Timeout = 0
	other := newFakePolicy("other", policy.UnauthorizedReject)
	if err := srv.Reload(other, broken); err == nil || !strings.Contains(err.Error(), "upstream.timeout") {
		t.Fatalf("Reload with upstream.timeout unset = %v, want a refusal naming it", err)
	}
	if srv.Policy() != p {
		t.Error("a refused reload swapped the policy")
	}
}
