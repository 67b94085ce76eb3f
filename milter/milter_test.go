package milter

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gomilter "github.com/d--j/go-milter"
	"github.com/emersion/go-msgauth/dkim"
	"golang.org/x/crypto/bcrypt"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/signer"
)

const testConfig = `hsm: {uri: "pkcs11:token=dkim"}
clients:
  - name: campaigns
    networks: ["192.0.2.0/24"]
    domains: [example.com]
domains:
  example.com: {selectors: [s1, s2]}
  example.org: {selectors: [s1]}
milter:
  listen: "inet:127.0.0.1:0"
`

// testKeys is a Keys of in-memory RSA keys; down makes every call fail
// as a lost token does. It is the test server's Observer too.
type testKeys struct {
	key  *rsa.PrivateKey
	down atomic.Bool

	mu      sync.Mutex
	reports []Report
	refused []string // "client domain", as Refusals is told
}

func (k *testKeys) Unauthorized(client, fromDomain string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refused = append(k.refused, client+" "+fromDomain)
}

func (k *testKeys) Message(r Report) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reports = append(k.reports, r)
}

// report returns the one report made, failing the test when there is
// not exactly one.
func (k *testKeys) report(t *testing.T) Report {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.reports) != 1 {
		t.Fatalf("%d reports %+v, want 1", len(k.reports), k.reports)
	}
	return k.reports[0]
}

type tokenDown struct{}

func (tokenDown) Error() string   { return "hsm: token not present" }
func (tokenDown) Temporary() bool { return true }

func (k *testKeys) Key(_ context.Context, domain, selector string) (crypto.Signer, error) {
	if k.down.Load() {
		return nil, tokenDown{}
	}
	return k.key, nil
}

func (k *testKeys) Signers(ctx context.Context, domain string) ([]signer.Identity, error) {
	return nil, errors.New("no rotation here")
}

func (k *testKeys) lookupTXT(string) ([]string, error) {
	der, err := x509.MarshalPKIXPublicKey(k.key.Public())
	if err != nil {
		return nil, err
	}
	return []string{"v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)}, nil
}

// startMilter serves a milter with testConfig plus extra.
func startMilter(t *testing.T, extra string) (*Server, *testKeys, string) {
	t.Helper()
	cfg, err := policy.Parse("/etc/dkimgw/dkimgw.yaml", []byte(testConfig+extra), nil)
	if err != nil {
		t.Fatal(err)
	}
	return serveMilter(t, cfg)
}

// serveMilter serves a milter with cfg on loopback, with a new key.
func serveMilter(t *testing.T, cfg *policy.Config) (*Server, *testKeys, string) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keys := &testKeys{key: k}
	s, err := New(Options{Config: cfg, Keys: keys, Observer: keys, Refusals: keys, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, keys, l.Addr().String()
}

// mta plays Postfix: one message through the milter from client ip,
// as a user when user is set. It returns the message as the MTA would
// deliver it (inserted fields applied) and the final action.
func mta(t *testing.T, addr, ip, user, msg string) (string, *gomilter.Action) {
	t.Helper()
	c := gomilter.NewClient("tcp", addr, gomilter.WithReadTimeout(30*time.Second))
	macros := gomilter.NewMacroBag()
	macros.Set(gomilter.MacroQueueId, "4XQID")
	if user != "" {
		macros.Set(gomilter.MacroAuthAuthen, user)
	}
	s, err := c.Session(macros)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if act, err := s.Conn("client.example", gomilter.FamilyInet, 25000, ip); err != nil || act.Type != gomilter.ActionContinue {
		t.Fatalf("Conn: %v %v", act, err)
	}
	if _, err := s.Helo("client.example"); err != nil {
		t.Fatal(err)
	}
	act, err := s.Mail("<joe@example.com>", "")
	if err != nil {
		t.Fatal(err)
	}
	if act.Type != gomilter.ActionContinue {
		return msg, act
	}
	if _, err := s.Rcpt("<a@example.net>", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DataStart(); err != nil {
		t.Fatal(err)
	}
	head, body, _ := strings.Cut(msg, "\r\n\r\n")
	// Fields as Postfix passes them: unfolded into name and value, the
	// value with its leading space (SMFIP_HDR_LEADSPC) and LF line ends.
	for _, f := range strings.Split(strings.ReplaceAll(head, "\r\n\t", "\n\t"), "\r\n") {
		name, value, _ := strings.Cut(f, ":")
		if act, err := s.HeaderField(name, value, nil); err != nil || act.Type != gomilter.ActionContinue {
			t.Fatalf("HeaderField: %v %v", act, err)
		}
	}
	if act, err := s.HeaderEnd(); err != nil || act.Type != gomilter.ActionContinue {
		t.Fatalf("HeaderEnd: %v %v", act, err)
	}
	mods, act, err := s.BodyReadFrom(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var added strings.Builder
	for _, m := range mods {
		if m.Type != gomilter.ActionInsertHeader || m.HeaderIndex != 0 {
			t.Fatalf("unexpected modification %v", m)
		}
		if !strings.HasPrefix(m.HeaderValue, " ") {
			t.Errorf("inserted value %q does not start with a space (leading-space mode)", m.HeaderValue)
		}
		added.WriteString(m.HeaderName + ":" + strings.ReplaceAll(m.HeaderValue, "\n", "\r\n") + "\r\n")
		// Each is inserted at the top: the last one first.
		msg = added.String() + msg
		added.Reset()
	}
	return msg, act
}

const testMessage = "From: Joe <joe@example.com>\r\nTo: a@example.net\r\nSubject: a folded\r\n\tsubject\r\nDate: Tue, 1 Dec 2026 18:00:00 +0000\r\n\r\nHello  there, \r\n\r\n"

func verify(t *testing.T, keys *testKeys, msg string) []*dkim.Verification {
	t.Helper()
	vs, err := dkim.VerifyWithOptions(strings.NewReader(msg), &dkim.VerifyOptions{LookupTXT: keys.lookupTXT})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.Err != nil {
			t.Errorf("%s: %v", v.Domain, v.Err)
		}
	}
	return vs
}

func TestSignsForAClient(t *testing.T) {
	_, keys, addr := startMilter(t, "")
	out, act := mta(t, addr, "192.0.2.7", "", testMessage)
	if act.Type != gomilter.ActionAccept {
		t.Fatalf("action %v, want accept", act)
	}
	if !strings.HasSuffix(out, testMessage) {
		t.Fatalf("the message was changed beyond the added fields:\n%q", out)
	}
	vs := verify(t, keys, out)
	if len(vs) != 2 || !strings.Contains(out, "s=s1;") || strings.Index(out, "s=s1;") > strings.Index(out, "s=s2;") {
		t.Fatalf("want two signatures, s1 first:\n%s", out)
	}
	r := keys.report(t)
	want := []Signature{{"example.com", "s1", "rsa-sha256"}, {"example.com", "s2", "rsa-sha256"}}
	if r.Outcome != OutcomeSigned || r.Domain != "example.com" || r.Client != "campaigns" || !slices.Equal(r.Signatures, want) {
		t.Errorf("report %+v", r)
	}
}

func TestUnauthorized(t *testing.T) {
	for _, tc := range []struct {
		name, extra, ip, from string
		want                  gomilter.ActionType
		code                  uint16
		outcome               Outcome // "": not reported (let go at MAIL FROM)
		// refused is what Refusals is told: a client's message From a
		// domain it may not use, as the relay counts them for the audit
		// log's summary, whatever on_unauthorized does with it.
		refused []string
	}{
		{name: "unknown client, default accept", ip: "198.51.100.1", from: "example.com", want: gomilter.ActionAccept},
		{name: "unknown client, reject", extra: "  on_unauthorized: reject\n", ip: "198.51.100.1", from: "example.com", want: gomilter.ActionRejectWithCode, code: 550, outcome: OutcomeRefused},
		{name: "unknown client, tempfail", extra: "  on_unauthorized: tempfail\n", ip: "198.51.100.1", from: "example.com", want: gomilter.ActionRejectWithCode, code: 451, outcome: OutcomeTempfail},
		{name: "client, domain not its own", extra: "  on_unauthorized: reject\n", ip: "192.0.2.7", from: "example.org", want: gomilter.ActionRejectWithCode, code: 550, outcome: OutcomeRefused, refused: []string{"campaigns example.org"}},
		{name: "client, domain not its own, tempfail", extra: "  on_unauthorized: tempfail\n", ip: "192.0.2.7", from: "Example.ORG", want: gomilter.ActionRejectWithCode, code: 451, outcome: OutcomeTempfail, refused: []string{"campaigns example.org"}},
		{name: "client, domain not its own, accept", ip: "192.0.2.7", from: "example.org", want: gomilter.ActionAccept, outcome: OutcomeUnsigned, refused: []string{"campaigns example.org"}},
		// A domain without keys is none of the milter's business.
		{name: "unknown client, domain without keys", extra: "  on_unauthorized: reject\n", ip: "198.51.100.1", from: "example.net", want: gomilter.ActionAccept, outcome: OutcomeUnsigned},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, keys, addr := startMilter(t, tc.extra)
			msg := strings.Replace(testMessage, "joe@example.com", "joe@"+tc.from, 1)
			out, act := mta(t, addr, tc.ip, "", msg)
			if act.Type != tc.want || (tc.code != 0 && act.SMTPCode != tc.code) {
				t.Fatalf("action %v, want %v %d", act, tc.want, tc.code)
			}
			if out != msg {
				t.Errorf("an unsigned message was changed:\n%s", out)
			}
			if tc.outcome == "" {
				keys.mu.Lock()
				if len(keys.reports) != 0 {
					t.Errorf("reports %+v for a message let go at MAIL FROM", keys.reports)
				}
				keys.mu.Unlock()
			} else if r := keys.report(t); r.Outcome != tc.outcome || len(r.Signatures) != 0 {
				t.Errorf("report %+v, want outcome %s", r, tc.outcome)
			}
			keys.mu.Lock()
			if !slices.Equal(keys.refused, tc.refused) {
				t.Errorf("refusals %q, want %q", keys.refused, tc.refused)
			}
			keys.mu.Unlock()
		})
	}
}

// TestAuthenticatedUser: a user the MTA authenticated ({auth_authen})
// gets its client's domains signed from any address; an unknown user
// from an unknown address does not.
func TestAuthenticatedUser(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "joe.bcrypt"), hash, 0o600); err != nil {
		t.Fatal(err)
	}
	cfgText := strings.Replace(testConfig, "domains:\n  example.com:", "  - name: submission\n    users: [{name: joe, password_file: "+filepath.Join(dir, "joe.bcrypt")+"}]\n    domains: [example.org]\ndomains:\n  example.com:", 1) + "  on_unauthorized: reject\n"
	cfg, err := policy.Parse(filepath.Join(dir, "dkimgw.yaml"), []byte(cfgText), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, keys, addr := serveMilter(t, cfg)
	msg := strings.Replace(testMessage, "joe@example.com", "joe@example.org", 1)
	out, act := mta(t, addr, "198.51.100.1", "joe", msg)
	if act.Type != gomilter.ActionAccept {
		t.Fatalf("user joe: action %v, want accept", act)
	}
	if vs := verify(t, keys, out); len(vs) != 1 {
		t.Fatalf("user joe: %d signatures, want 1", len(vs))
	}
	_, act = mta(t, addr, "198.51.100.1", "eve", msg)
	if act.Type != gomilter.ActionRejectWithCode || act.SMTPCode != 550 {
		t.Fatalf("unknown user eve: action %v, want 550", act)
	}
}

func TestTokenError(t *testing.T) {
	for _, tc := range []struct {
		name, extra string
		want        gomilter.ActionType
	}{
		{name: "tempfail by default", want: gomilter.ActionRejectWithCode},
		{name: "accept", extra: "  on_token_error: accept\n", want: gomilter.ActionAccept},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, keys, addr := startMilter(t, tc.extra)
			keys.down.Store(true)
			out, act := mta(t, addr, "192.0.2.7", "", testMessage)
			if act.Type != tc.want {
				t.Fatalf("action %v, want %v", act, tc.want)
			}
			if tc.want == gomilter.ActionRejectWithCode && (act.SMTPCode != 451 || !strings.Contains(act.SMTPReply, "4.7.0")) {
				t.Errorf("reply %d %q, want 451 4.7.0", act.SMTPCode, act.SMTPReply)
			}
			if out != testMessage {
				t.Errorf("message changed:\n%s", out)
			}
			want := OutcomeTempfail
			if tc.want == gomilter.ActionAccept {
				want = OutcomeUnsigned
			}
			if r := keys.report(t); r.Outcome != want || r.Domain != "example.com" {
				t.Errorf("report %+v, want %s for example.com", r, want)
			}
		})
	}
}

func TestMalformedFromAClientIsRefused(t *testing.T) {
	_, _, addr := startMilter(t, "")
	msg := "From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n"
	_, act := mta(t, addr, "192.0.2.7", "", msg)
	if act.Type != gomilter.ActionRejectWithCode || act.SMTPCode != 550 || !strings.Contains(act.SMTPReply, "5.6.0") {
		t.Fatalf("action %v, want 550 5.6.0", act)
	}
}

// TestLargeBodyStreams: a body far larger than the milter protocol's
// chunks is hashed as it comes and the signature verifies.
func TestLargeBodyStreams(t *testing.T) {
	_, keys, addr := startMilter(t, "")
	msg := testMessage + strings.Repeat("0123456789 abcdefghij\r\n", 200000) // 4.6 MB
	out, act := mta(t, addr, "192.0.2.7", "", msg)
	if act.Type != gomilter.ActionAccept {
		t.Fatalf("action %v", act)
	}
	verify(t, keys, out)
}
