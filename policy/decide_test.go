package policy

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"
)

const decideConfig = `
hsm: {uri: "pkcs11:token=dkim"}
upstream: {address: "127.0.0.1:10026"}
clients:
  - name: campaigns
    networks: ["127.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
    domains: [example.com, news.example.org]
  - name: tenant-b
    networks: ["198.51.100.0/24"]
    users: [{name: tenant-b, password_file: /etc/dkimgw/tenant-b.bcrypt}]
    domains: [b.example.org]
domains:
  example.com:
    selectors: [rsa1, ed1]
    expire: 120h
  example.org:
    selectors: [org1]
  news.example.org:
    selectors: [news1]
`

func mustParse(t *testing.T, text string) *Config {
	t.Helper()
	cfg, err := Parse("dkimgw.yaml", []byte(text), testFiles(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return cfg
}

func TestClientByAddr(t *testing.T) {
	cfg := mustParse(t, decideConfig)
	tests := []struct {
		addr string
		want string // client name, "" for none
	}{
		{"127.0.0.1", "campaigns"},
		{"127.255.255.254", "campaigns"},
		{"::ffff:127.0.0.1", "campaigns"}, // IPv4 on a dual-stack socket
		{"2001:db8::25", "campaigns"},
		{"192.0.2.7", "campaigns"},
		{"192.0.2.8", ""},
		{"198.51.100.200", "tenant-b"},
		{"10.0.0.1", ""},
		{"::1", ""},
		{"fe80::1%eth0", ""},
	}
	for _, tt := range tests {
		got := cfg.ClientByAddr(netip.MustParseAddr(tt.addr))
		name := ""
		if got != nil {
			name = got.Name
		}
		if name != tt.want {
			t.Errorf("ClientByAddr(%s) = %q, want %q", tt.addr, name, tt.want)
		}
	}
}

func TestAuthenticate(t *testing.T) {
	cfg := mustParse(t, decideConfig)
	tests := []struct {
		name, user, password string
		want                 string // client; "" means ErrBadCredentials
	}{
		{"right password", "tenant-b", testPassword, "tenant-b"},
		{"wrong password", "tenant-b", "guess", ""},
		{"empty password", "tenant-b", "", ""},
		{"unknown user", "nobody", testPassword, ""},
		{"user name is case-sensitive", "Tenant-B", testPassword, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cl, err := cfg.Authenticate(tt.user, tt.password)
			if tt.want == "" {
				if !errors.Is(err, ErrBadCredentials) || cl != nil {
					t.Errorf("Authenticate = %v, %v; want ErrBadCredentials", cl, err)
				}
				return
			}
			if err != nil || cl == nil || cl.Name != tt.want {
				t.Errorf("Authenticate = %v, %v; want client %q", cl, err, tt.want)
			}
		})
	}
}

func TestSign(t *testing.T) {
	cfg := mustParse(t, decideConfig)
	campaigns := cfg.ClientByAddr(netip.MustParseAddr("127.0.0.1"))
	tenantB := cfg.ClientByAddr(netip.MustParseAddr("198.51.100.1"))
	tests := []struct {
		name      string
		client    *Client
		from      string
		wantD     string // "" means unauthorized
		wantSels  []string
		wantExpir time.Duration
	}{
		{"exact domain", campaigns, "example.com", "example.com", []string{"rsa1", "ed1"}, 120 * time.Hour},
		{"subdomain signs with parent (relaxed alignment)", campaigns, "mail.example.com", "example.com", []string{"rsa1", "ed1"}, 120 * time.Hour},
		{"case and trailing dot", campaigns, "Mail.EXAMPLE.com.", "example.com", []string{"rsa1", "ed1"}, 120 * time.Hour},
		{"nearest listed parent wins", campaigns, "x.news.example.org", "news.example.org", []string{"news1"}, 0},
		{"client not allowed the parent", campaigns, "example.org", "", nil, 0},
		{"client not allowed a sibling", campaigns, "other.example.org", "", nil, 0},
		{"suffix is not a subdomain", campaigns, "badexample.com", "", nil, 0},
		{"tenant subdomain signs with listed parent", tenantB, "b.example.org", "example.org", []string{"org1"}, 0},
		{"tenant deeper subdomain", tenantB, "eu.b.example.org", "example.org", []string{"org1"}, 0},
		{"tenant may not use another tenant's domain", tenantB, "example.com", "", nil, 0},
		{"no client", nil, "example.com", "", nil, 0},
		{"empty domain", campaigns, "", "", nil, 0},
		{"non-ASCII domain never matches", campaigns, "exämple.com", "", nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cfg.Sign(tt.client, tt.from)
			if tt.wantD == "" {
				var ue *UnauthorizedError
				if !errors.As(err, &ue) {
					t.Fatalf("Sign = %+v, %v; want *UnauthorizedError", got, err)
				}
				if ue.FromDomain != normalizeDomain(tt.from) {
					t.Errorf("UnauthorizedError.FromDomain = %q", ue.FromDomain)
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			if got.Domain != tt.wantD || !slices.Equal(got.Selectors, tt.wantSels) || got.Expire != tt.wantExpir {
				t.Errorf("Sign = %+v, want d=%s s=%v x=%v", got, tt.wantD, tt.wantSels, tt.wantExpir)
			}
		})
	}
}

func TestSignReturnsACopy(t *testing.T) {
	cfg := mustParse(t, decideConfig)
	cl := cfg.ClientByAddr(netip.MustParseAddr("127.0.0.1"))
	s, err := cfg.Sign(cl, "example.com")
	if err != nil {
		t.Fatal(err)
	}
	s.Selectors[0] = "mutated"
	if cfg.Domains["example.com"].Selectors[0] != "rsa1" {
		t.Error("a caller's change to Signing.Selectors reached the configuration")
	}
}

func TestSelectors(t *testing.T) {
	cfg := mustParse(t, decideConfig)
	want := []KeyRef{{"example.com", "ed1"}, {"example.com", "rsa1"}, {"example.org", "org1"}, {"news.example.org", "news1"}}
	if got := cfg.Selectors(); !slices.Equal(got, want) {
		t.Errorf("Selectors = %v, want %v", got, want)
	}
}
