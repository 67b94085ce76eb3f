package policy

import (
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

const requireAuthConfig = `
hsm: {uri: "pkcs11:token=dkim"}
smtp: {tls: {cert_file: /etc/dkimgw/tls.crt, key_file: /etc/dkimgw/tls.key}}
upstream: {address: "127.0.0.1:10026"}
clients:
  - name: campaigns
    networks: ["192.0.2.0/24"]
    domains: [example.com]
  - name: tenant-b
    require_auth: true
    networks: ["0.0.0.0/0", "2001:db8::/32"]
    users: [{name: tenant-b, password_file: /etc/dkimgw/tenant-b.bcrypt}]
    domains: [example.com]
domains:
  example.com: {selectors: [s1]}
`

// TestRequireAuth: a require_auth client, even one whose networks hold
// every address, is recognised only by AUTH, and only from its networks.
func TestRequireAuth(t *testing.T) {
	cfg := mustParse(t, requireAuthConfig)
	if len(cfg.Warnings) != 0 {
		t.Errorf("warnings for a require_auth client's networks: %q", cfg.Warnings)
	}
	for _, tt := range []struct{ addr, want string }{
		{"192.0.2.9", "campaigns"}, // overlaps 0.0.0.0/0, which recognises nobody
		{"198.51.100.1", ""},
		{"2001:db8::1", ""},
	} {
		got := ""
		if cl := cfg.ClientByAddr(netip.MustParseAddr(tt.addr)); cl != nil {
			got = cl.Name
		}
		if got != tt.want {
			t.Errorf("ClientByAddr(%s) = %q, want %q", tt.addr, got, tt.want)
		}
	}
	for _, tt := range []struct {
		addr string
		ok   bool
	}{
		{"198.51.100.1", true},
		{"::ffff:198.51.100.1", true},
		{"2001:db8::1", true},
		{"2001:db9::1", false}, // outside its networks
	} {
		cl := cfg.ClientByUser("tenant-b", netip.MustParseAddr(tt.addr))
		if (cl != nil) != tt.ok || cl != nil && cl.Name != "tenant-b" {
			t.Errorf("ClientByUser(tenant-b, %s) = %v, want recognised: %v", tt.addr, cl, tt.ok)
		}
	}
	// A client without require_auth takes its users' logins from anywhere.
	cfg = mustParse(t, decideConfig)
	if cl := cfg.ClientByUser("tenant-b", netip.MustParseAddr("203.0.113.1")); cl == nil || cl.Name != "tenant-b" {
		t.Errorf("ClientByUser without require_auth, from outside the networks = %v, want tenant-b", cl)
	}
}

func TestWideNetworksWarn(t *testing.T) {
	text := strings.Replace(decideConfig, `["127.0.0.0/8", "2001:db8::/32", "192.0.2.7"]`, `["127.0.0.0/8", "2001:db8::/32", "192.0.2.7", "10.0.0.0/8", "172.16.0.0/16"]`, 1)
	cfg := mustParse(t, text)
	want := []string{
		"dkimgw.yaml:6: client \"campaigns\": network 2001:db8::/32 is wider than /48",
		"dkimgw.yaml:6: client \"campaigns\": network 10.0.0.0/8 is wider than /16",
		// decideConfig has no smtp.tls.
		"dkimgw.yaml:10: client \"tenant-b\" has users, but without smtp.tls AUTH is never offered",
	}
	if len(cfg.Warnings) != len(want) {
		t.Fatalf("warnings = %q, want %d (not for loopback 127.0.0.0/8 nor a /16)", cfg.Warnings, len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(cfg.Warnings[i], w) {
			t.Errorf("warning %d = %q, want it to start with %q", i, cfg.Warnings[i], w)
		}
	}
	if cfg := mustParse(t, minimalNarrow); len(cfg.Warnings) != 0 {
		t.Errorf("warnings for narrow networks: %q", cfg.Warnings)
	}
}

const minimalNarrow = `hsm: {uri: "pkcs11:token=dkim"}
upstream: {address: "127.0.0.1:10026"}
clients:
  - {name: c, networks: ["10.1.0.0/16", "2001:db8:1::/48", "::1"], domains: [example.com]}
domains:
  example.com: {selectors: [s1]}
`

// TestDummyHashCost: an unknown user costs the same bcrypt work as a
// known one, so timing does not tell which user names exist.
func TestDummyHashCost(t *testing.T) {
	hash5, err := bcrypt.GenerateFromPassword([]byte("x"), bcrypt.MinCost+1)
	if err != nil {
		t.Fatal(err)
	}
	files := testFiles(t)
	readFile := func(name string) ([]byte, error) {
		if name == "/etc/dkimgw/cost5.bcrypt" {
			return hash5, nil
		}
		return files(name)
	}
	for _, tt := range []struct {
		name  string
		users string
		want  int
	}{
		{"one user", "[{name: a, password_file: /etc/dkimgw/tenant-b.bcrypt}]", bcrypt.MinCost},
		{"the highest cost", "[{name: a, password_file: /etc/dkimgw/tenant-b.bcrypt}, {name: b, password_file: /etc/dkimgw/cost5.bcrypt}]", bcrypt.MinCost + 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			text := strings.Replace(minimal, `networks: ["10.0.0.0/8"]`, "users: "+tt.users, 1)
			cfg, err := Parse("dkimgw.yaml", []byte(text), readFile)
			if err != nil {
				t.Fatal(err)
			}
			cost, err := bcrypt.Cost(cfg.dummyHash())
			if err != nil || cost != tt.want {
				t.Errorf("dummy hash cost = %d, %v; want %d, the configured users' highest", cost, err, tt.want)
			}
			if _, err := cfg.Authenticate("nobody", "x"); err != ErrBadCredentials {
				t.Errorf("Authenticate(unknown) = %v", err)
			}
		})
	}
}
