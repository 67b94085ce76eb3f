package rotation

import (
	"strings"
	"testing"
	"time"
)

func TestPolicyValidation(t *testing.T) {
	ok := Policy{Domain: "Example.COM.", Algorithms: []Algorithm{RSA2048}, Publisher: "p"}
	tests := []struct {
		name string
		edit func(*Policy)
		want string // "" = valid
	}{
		{"defaults", func(*Policy) {}, ""},
		{"no algorithms", func(p *Policy) { p.Algorithms = nil }, "no algorithms"},
		{"unknown algorithm", func(p *Policy) { p.Algorithms = []Algorithm{"rsa-1024"} }, `unknown algorithm "rsa-1024"`},
		{"algorithm twice", func(p *Policy) { p.Algorithms = []Algorithm{Ed25519, Ed25519} }, "listed twice"},
		{"no publisher", func(p *Policy) { p.Publisher = "" }, "no publisher"},
		{"bad domain", func(p *Policy) { p.Domain = "exa_mple.com" }, "domain"},
		{"domain outside zone", func(p *Policy) { p.Zone = "example.net" }, "not in zone"},
		{"subdomain in zone", func(p *Policy) { p.Domain, p.Zone = "mail.example.com", "example.com." }, ""},
		{"unknown placeholder", func(p *Policy) { p.SelectorTemplate = "{alg}{week}" }, "unknown placeholder"},
		{"two labels", func(p *Policy) { p.SelectorTemplate = "{alg}.{yyyy}" }, "not a letter, digit or hyphen"},
		{"leading hyphen", func(p *Policy) { p.SelectorTemplate = "-{alg}" }, "hyphen"},
		{"too long", func(p *Policy) { p.SelectorTemplate = strings.Repeat("x", 57) + "{alg}" }, "longer than 59"},
		{"ttl under a second", func(p *Policy) { p.TTL = time.Millisecond }, "ttl"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := ok
			p.Algorithms = append([]Algorithm(nil), ok.Algorithms...)
			tt.edit(&p)
			_, err := New(Options{Store: &Bolt{}, Keys: newFakeKeyStore(nil), Checker: &fakeDNS{},
				Publishers: map[string]Publisher{"p": &fakeDNS{}}, Policies: []Policy{p}})
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("New: %v, want an error containing %q", err, tt.want)
			case err != nil && strings.Count(err.Error(), "rotation:") != 1:
				t.Fatalf("error %q has more than one package prefix", err)
			}
		})
	}
	_, err := New(Options{Store: &Bolt{}, Keys: newFakeKeyStore(nil), Checker: &fakeDNS{},
		Publishers: map[string]Publisher{"p": &fakeDNS{}}, Policies: []Policy{{Domain: "a.example", Algorithms: []Algorithm{Ed25519}, Publisher: "q"}}})
	if err == nil || !strings.Contains(err.Error(), `no publisher named "q"`) {
		t.Fatalf("unknown publisher: %v", err)
	}
}

func TestSelectorTemplate(t *testing.T) {
	at := time.Date(2026, 12, 1, 9, 5, 0, 0, time.FixedZone("x", 10*3600)) // 2026-11-30 23:05 UTC
	tests := []struct {
		tmpl string
		alg  Algorithm
		want string
	}{
		{DefaultSelectorTemplate, RSA2048, "rsa20261130"},
		{DefaultSelectorTemplate, Ed25519, "ed20261130"},
		{"{algorithm}-{yyyy}{mm}", RSA4096, "rsa-4096-202611"},
		{"k{bits}x{dd}{hhmm}", Ed25519, "k256x302305"},
		{"S{unix}", RSA3072, "s1796079900"},
	}
	for _, tt := range tests {
		got, err := renderSelector(tt.tmpl, tt.alg, at)
		if err != nil || got != tt.want {
			t.Errorf("renderSelector(%q, %s) = %q, %v; want %q", tt.tmpl, tt.alg, got, err, tt.want)
		}
	}
	used := map[string]bool{"ed20261130": true, "ed20261130-2": true}
	if got, _ := newSelector(DefaultSelectorTemplate, Ed25519, at, used); got != "ed20261130-3" {
		t.Errorf("newSelector with two taken = %q, want ed20261130-3", got)
	}
}

func TestRecordNames(t *testing.T) {
	p := Policy{Domain: "mail.example.com", Zone: "example.com", Algorithms: []Algorithm{Ed25519}, Publisher: "p"}.withDefaults()
	if got := p.recordName("s1"); got != "s1._domainkey.mail.example.com" {
		t.Errorf("recordName = %q", got)
	}
	if got := p.relName("s1"); got != "s1._domainkey.mail" {
		t.Errorf("relName = %q", got)
	}
	if got := p.zoneFQDN(); got != "example.com." {
		t.Errorf("zoneFQDN = %q", got)
	}
	p = Policy{Domain: "example.com", Algorithms: []Algorithm{Ed25519}, Publisher: "p"}.withDefaults()
	if got := p.relName("s1"); got != "s1._domainkey" {
		t.Errorf("relName at the apex = %q", got)
	}
}

// TestSubdomainInZone: a domain below its zone gets its records under the
// right relative names and is rotated like any other.
func TestSubdomainInZone(t *testing.T) {
	pol := testPolicy()
	pol.Domain, pol.Zone = "mail.example.com", "example.com"
	pol.Algorithms = []Algorithm{Ed25519}
	e := newEnv(t, pol)
	e.run(12*time.Hour, time.Hour)
	if len(e.byState(StateActive)) != 1 {
		t.Fatalf("keys %+v", e.keys())
	}
	if _, ok := e.dns.names()["ed20261201._domainkey.mail"]; !ok {
		t.Fatalf("zone records %v, want ed20261201._domainkey.mail", e.dns.names())
	}
}
