package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary text to the configuration parser. It must
// never panic, every failure must be an *Error, and every configuration
// it accepts must keep the invariants the server relies on.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{issueConfig, minimal, decideConfig, "", "a: b", "hsm: &a [*a]",
		"clients: [{networks: [\"::/0\", \"0.0.0.0/0\"]}]", "domains: {\"..\": {selectors: [\"\"]}}"} {
		f.Add(seed)
	}
	readFile := testFiles(f)
	f.Fuzz(func(t *testing.T, text string) {
		cfg, err := Parse("fuzz.yaml", []byte(text), readFile)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error is not a *policy.Error: %v", err)
			}
			if !strings.HasPrefix(err.Error(), "fuzz.yaml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if len(cfg.Clients) == 0 || len(cfg.Domains) == 0 {
			t.Fatal("accepted a configuration without clients or domains")
		}
		for i := range cfg.Clients {
			cl := &cfg.Clients[i]
			if len(cl.Networks) == 0 && len(cl.Users) == 0 {
				t.Fatalf("accepted client %q that cannot be recognised", cl.Name)
			}
			for _, d := range cl.Domains {
				s, err := cfg.Sign(cl, d)
				if err != nil || len(s.Selectors) == 0 {
					t.Fatalf("client %q domain %q: Sign = %+v, %v", cl.Name, d, s, err)
				}
			}
			// Networks never overlap, so an address names one client.
			for _, p := range cl.prefixes {
				if got := cfg.ClientByAddr(p.Addr()); got != cl {
					t.Fatalf("ClientByAddr(%s) = %v, want %q", p.Addr(), got, cl.Name)
				}
			}
		}
		_ = cfg.ClientByAddr(netip.IPv6Unspecified())
	})
}
