package dnspub_test

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/testenv"
)

// keyRecord is a DKIM key record whose p= has the length of an RSA key
// of the given size's SubjectPublicKeyInfo (random bytes: the DNS side
// does not care what they mean, and no private key is needed).
func keyRecord(t *testing.T, spkiLen int) string {
	t.Helper()
	b := make([]byte, spkiLen)
	rand.Read(b)
	return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(b)
}

const (
	rsa2048SPKI = 294
	rsa4096SPKI = 550
)

func newPublisher(t *testing.T, s *testenv.DNSServer, key testenv.TSIGKey) *dnspub.RFC2136 {
	t.Helper()
	p, err := dnspub.NewRFC2136(dnspub.RFC2136Options{
		Server:  s.Addr,
		TSIG:    dnspub.TSIG{Name: key.Name, Algorithm: key.Algorithm, SecretFile: s.KeyFile(t, key)},
		Timeout: 10 * time.Second,
		Logger:  slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// newChecker finds the zone's servers from its NS records, as in
// production, asking the test server (whose NS host is 127.0.0.1).
func newChecker(t *testing.T, s *testenv.DNSServer) *dnspub.Checker {
	t.Helper()
	c, err := dnspub.NewChecker(dnspub.CheckerOptions{Resolver: s.Addr, NSPort: s.Port(), Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// served is what the primary serves at name, from an independent query.
func served(t *testing.T, p *dnspub.RFC2136, zone, name string) []string {
	t.Helper()
	recs, err := p.Lookup(t.Context(), zone, name)
	if err != nil {
		t.Fatal(err)
	}
	var vs []string
	for _, r := range recs {
		vs = append(vs, r.Value)
	}
	return vs
}

func wantVisible(t *testing.T, c *dnspub.Checker, zone string, r dnspub.Record) *dnspub.Report {
	t.Helper()
	rep, err := c.Check(t.Context(), zone, r)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Visible() || len(rep.Observations) != 2 {
		t.Fatalf("%s not visible on UDP and TCP:\n%s", r.Name, rep)
	}
	return rep
}

func TestRFC2136Lifecycle(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		for _, key := range s.Keys {
			t.Run(s.Impl+"/"+key.Algorithm, func(t *testing.T) {
				p := newPublisher(t, s, key)
				c := newChecker(t, s)
				ctx := t.Context()
				name := "s-" + strings.TrimPrefix(key.Algorithm, "hmac-") + "._domainkey"
				rec := dnspub.Record{Name: name, TTL: 300 * time.Second, Value: keyRecord(t, rsa2048SPKI)}

				for i := range 2 { // the repeat is a no-op
					got, err := p.AppendRecords(ctx, s.Zone, []dnspub.Record{rec})
					if err != nil || len(got) != 1 {
						t.Fatalf("append #%d: %v, %v", i+1, got, err)
					}
					rep := wantVisible(t, c, s.Zone, rec)
					if rep.MaxTTL() != 300*time.Second {
						t.Errorf("TTL %v, want 300s", rep.MaxTTL())
					}
				}
				if got := served(t, p, s.Zone, name); len(got) != 1 {
					t.Fatalf("after two appends the name holds %q", got)
				}
				longer := rec
				longer.TTL = time.Hour
				if _, err := p.AppendRecords(ctx, s.Zone, []dnspub.Record{longer}); err != nil {
					t.Fatalf("append with another TTL: %v", err)
				}

				revoked := dnspub.Record{Name: name, TTL: 300 * time.Second, Value: "v=DKIM1; p="}
				for range 2 {
					if err := p.Replace(ctx, s.Zone, rec, revoked); err != nil {
						t.Fatalf("replace: %v", err)
					}
					wantVisible(t, c, s.Zone, revoked)
				}

				next := dnspub.Record{Name: name + "." + s.Zone, TTL: 600 * time.Second, Value: keyRecord(t, rsa2048SPKI)}
				for range 2 {
					if _, err := p.SetRecords(ctx, s.Zone, []dnspub.Record{next}); err != nil {
						t.Fatalf("set: %v", err)
					}
					wantVisible(t, c, s.Zone, next)
				}

				all, err := p.GetRecords(ctx, s.Zone)
				if err != nil {
					t.Fatalf("get: %v", err)
				}
				if !slices.Contains(all, dnspub.Record{Name: name, TTL: 600 * time.Second, Value: next.Value}) {
					t.Errorf("get: %v lacks %s", all, name)
				}

				for i := range 2 {
					got, err := p.DeleteRecords(ctx, s.Zone, []dnspub.Record{next})
					if err != nil {
						t.Fatalf("delete #%d: %v", i+1, err)
					}
					if want := 1 - i; len(got) != want {
						t.Errorf("delete #%d returned %v, want %d record(s)", i+1, got, want)
					}
				}
				rep, err := c.Check(ctx, s.Zone, next)
				if err != nil {
					t.Fatal(err)
				}
				if !rep.Gone() {
					t.Errorf("not gone after delete:\n%s", rep)
				}
			})
		}
	}
}

// TestRFC2136LongValues: values over 255 bytes go out as several
// character-strings and come back byte for byte, as do quotes and
// backslashes.
func TestRFC2136LongValues(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		t.Run(s.Impl, func(t *testing.T) {
			p := newPublisher(t, s, s.Keys[0])
			c := newChecker(t, s)
			recs := []dnspub.Record{
				{Name: "rsa2048._domainkey", Value: keyRecord(t, rsa2048SPKI)},
				{Name: "rsa4096._domainkey", Value: keyRecord(t, rsa4096SPKI)},
				{Name: "odd._domainkey", Value: `v=DKIM1; n="a \"quoted\" note\\"; p=` + strings.Repeat("x", 300)},
			}
			if l := len(recs[0].Value); l < 400 || l > 420 {
				t.Fatalf("RSA-2048 record is %d bytes, want ~410", l)
			}
			if _, err := p.AppendRecords(t.Context(), s.Zone, recs); err != nil {
				t.Fatal(err)
			}
			for _, r := range recs {
				if got := served(t, p, s.Zone, r.Name); len(got) != 1 || got[0] != r.Value {
					t.Errorf("%s: served %q, want %q", r.Name, got, r.Value)
				}
				wantVisible(t, c, s.Zone, r)
			}
		})
	}
}

func TestRFC2136AuthErrors(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		t.Run(s.Impl, func(t *testing.T) {
			good := newPublisher(t, s, s.Keys[0])
			wrongSecret := s.Keys[0]
			wrongSecret.Secret = base64.StdEncoding.EncodeToString(make([]byte, 32))
			unknownKey := s.Keys[0]
			unknownKey.Name = "nobody." + s.Zone
			skewed := newPublisher(t, s, s.Keys[1])
			dnspub.SetClock(skewed, func() time.Time { return time.Now().Add(-time.Hour) })

			cases := []struct {
				name string
				p    *dnspub.RFC2136
				rec  dnspub.Record
				kind error
				hint string
			}{
				{"wrong secret", newPublisher(t, s, wrongSecret), dnspub.Record{Name: "a._domainkey", Value: "v=DKIM1; p="}, dnspub.ErrTSIG, "secret"},
				{"unknown key", newPublisher(t, s, unknownKey), dnspub.Record{Name: "b._domainkey", Value: "v=DKIM1; p="}, dnspub.ErrTSIG, "key statement"},
				{"clock skew", skewed, dnspub.Record{Name: "c._domainkey", Value: "v=DKIM1; p="}, dnspub.ErrTSIG, "NTP"},
				{"outside _domainkey", good, dnspub.Record{Name: "www", Value: "v=spf1 -all"}, dnspub.ErrRefused, "_domainkey." + s.Zone},
				{"_domainkey itself", good, dnspub.Record{Name: "_domainkey", Value: "o=~"}, dnspub.ErrRefused, "update-policy"},
			}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					_, err := tc.p.AppendRecords(t.Context(), s.Zone, []dnspub.Record{tc.rec})
					checkErr(t, s, err, tc.kind, s.Zone, tc.hint, wrongSecret.Secret)
					if got := served(t, good, s.Zone, tc.rec.Name); len(got) != 0 {
						t.Errorf("the zone changed: %s holds %q", tc.rec.Name, got)
					}
				})
			}
			// A zone the server is not authoritative for.
			_, err := good.AppendRecords(t.Context(), "example.org.", []dnspub.Record{{Name: "s._domainkey", Value: "v=DKIM1; p="}})
			checkErr(t, s, err, dnspub.ErrRefused, "example.org.", "primary of example.org.", "")
		})
	}
}

// checkErr checks that err is of kind and that its message names the
// zone, the server and the hint, and holds no secret.
func checkErr(t *testing.T, s *testenv.DNSServer, err, kind error, zone, hint, secret string) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("err = %v, want %v", err, kind)
	}
	msg := err.Error()
	for _, want := range []string{zone, s.Addr, hint} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
	for _, k := range s.Keys {
		if strings.Contains(msg, k.Secret) {
			t.Errorf("error %q holds a secret", msg)
		}
	}
	if secret != "" && strings.Contains(msg, secret) {
		t.Errorf("error %q holds a secret", msg)
	}
}

// TestRFC2136Conflict: a record someone else changes is never
// overwritten, whether the change came before dkimgw read the record or
// between its read and its update (the server-side prerequisite).
func TestRFC2136Conflict(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		t.Run(s.Impl, func(t *testing.T) {
			ctx := t.Context()
			p := newPublisher(t, s, s.Keys[0])
			other := newPublisher(t, s, s.Keys[1]) // the other writer
			mine := dnspub.Record{Name: "k1._domainkey", TTL: time.Minute, Value: keyRecord(t, rsa2048SPKI)}
			theirs := dnspub.Record{Name: "k1._domainkey", TTL: time.Minute, Value: "v=DKIM1; k=rsa; p=THEIRS"}
			revoked := dnspub.Record{Name: "k1._domainkey", TTL: time.Minute, Value: "v=DKIM1; p="}
			if _, err := p.AppendRecords(ctx, s.Zone, []dnspub.Record{mine}); err != nil {
				t.Fatal(err)
			}
			if _, err := other.SetRecords(ctx, s.Zone, []dnspub.Record{theirs}); err != nil {
				t.Fatal(err)
			}

			// Before the read: Replace sees the change itself.
			err := p.Replace(ctx, s.Zone, mine, revoked)
			if !errors.Is(err, dnspub.ErrConflict) || !strings.Contains(err.Error(), "THEIRS") {
				t.Fatalf("replace after a change: %v, want ErrConflict naming the served value", err)
			}
			// Append where another value is.
			if _, err := p.AppendRecords(ctx, s.Zone, []dnspub.Record{mine}); !errors.Is(err, dnspub.ErrConflict) {
				t.Fatalf("append over another value: %v, want ErrConflict", err)
			}
			if got := served(t, p, s.Zone, "k1._domainkey"); !slices.Equal(got, []string{theirs.Value}) {
				t.Fatalf("served %q, want theirs", got)
			}

			// Between the read and the update: only the prerequisite
			// stops it.
			race := dnspub.Record{Name: "k1._domainkey", TTL: time.Minute, Value: "v=DKIM1; k=rsa; p=RACE"}
			for _, op := range []struct {
				name string
				do   func() error
			}{
				{"set", func() error { _, err := p.SetRecords(ctx, s.Zone, []dnspub.Record{revoked}); return err }},
				{"replace", func() error { return p.Replace(ctx, s.Zone, theirs, revoked) }},
				{"delete", func() error { _, err := p.DeleteRecords(ctx, s.Zone, []dnspub.Record{theirs}); return err }},
			} {
				t.Run(op.name, func(t *testing.T) {
					if _, err := other.SetRecords(ctx, s.Zone, []dnspub.Record{theirs}); err != nil {
						t.Fatal(err)
					}
					dnspub.SetAfterLookup(p, func() {
						if _, err := other.SetRecords(ctx, s.Zone, []dnspub.Record{race}); err != nil {
							t.Error(err)
						}
					})
					defer dnspub.SetAfterLookup(p, nil)
					err := op.do()
					if !errors.Is(err, dnspub.ErrConflict) {
						t.Fatalf("%s during a concurrent change: %v, want ErrConflict", op.name, err)
					}
					if got := served(t, p, s.Zone, "k1._domainkey"); !slices.Equal(got, []string{race.Value}) {
						t.Errorf("served %q, want the concurrent writer's %q", got, race.Value)
					}
				})
			}
		})
	}
}

// TestRFC2136Timeout: a server that accepts and never answers gives
// ErrTimeout within the configured timeout, naming the server.
func TestRFC2136Timeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // held open, never answered
		}
	}()
	secret := filepath.Join(t.TempDir(), "key")
	os.WriteFile(secret, []byte(base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))), 0o600)
	p, err := dnspub.NewRFC2136(dnspub.RFC2136Options{Server: l.Addr().String(), TSIG: dnspub.TSIG{Name: "k", SecretFile: secret}, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = p.AppendRecords(t.Context(), "example.test", []dnspub.Record{{Name: "s._domainkey", Value: "v=DKIM1; p="}})
	var de *dnspub.Error
	if !errors.Is(err, dnspub.ErrTimeout) || !errors.As(err, &de) || !de.Temporary() || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Fatalf("err = %v, want a temporary ErrTimeout naming the server", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v with a 300ms timeout", d)
	}
}

func TestNewRFC2136(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		return p
	}
	b64 := write("b64", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n")
	bind := write("bind", "key \"dkimgw.\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\";\n};\n")
	notB64 := write("bad", "not base64 at all!\n")
	cases := []struct {
		name string
		opts dnspub.RFC2136Options
		err  string
	}{
		{"base64 file", dnspub.RFC2136Options{Server: "127.0.0.1", TSIG: dnspub.TSIG{Name: "k", SecretFile: b64}}, ""},
		{"tsig-keygen file", dnspub.RFC2136Options{Server: "127.0.0.1:5353", TSIG: dnspub.TSIG{Name: "k", Algorithm: "hmac-sha512", SecretFile: bind}}, ""},
		{"no server", dnspub.RFC2136Options{TSIG: dnspub.TSIG{Name: "k", SecretFile: b64}}, "no server"},
		{"no key", dnspub.RFC2136Options{Server: "127.0.0.1"}, "no TSIG key"},
		{"md5", dnspub.RFC2136Options{Server: "127.0.0.1", TSIG: dnspub.TSIG{Name: "k", Algorithm: "hmac-md5", SecretFile: b64}}, "hmac-sha256 or hmac-sha512"},
		{"missing file", dnspub.RFC2136Options{Server: "127.0.0.1", TSIG: dnspub.TSIG{Name: "k", SecretFile: filepath.Join(dir, "nope")}}, "no such file"},
		{"not base64", dnspub.RFC2136Options{Server: "127.0.0.1", TSIG: dnspub.TSIG{Name: "k", SecretFile: notB64}}, "does not hold a base64 secret"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := dnspub.NewRFC2136(tc.opts)
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				if _, _, err := net.SplitHostPort(p.Server()); err != nil {
					t.Errorf("server %q has no port", p.Server())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			if strings.Contains(err.Error(), "not base64 at all") {
				t.Errorf("error quotes the secret file: %v", err)
			}
		})
	}
}
