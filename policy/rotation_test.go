package policy

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// rotating is a configuration with one rotating domain (lines 10-19) and
// its publishers.
const rotating = `hsm: {uri: "pkcs11:token=dkim"}
upstream: {address: "127.0.0.1:10026"}
clients:
  - name: campaigns
    networks: ["10.1.0.0/16"]
    domains: [example.com, mail.example.org]
data_dir: /var/lib/dkimgw-test
domains:
  example.com:
    rotation:
      algorithms: [rsa-2048, ed25519]
      interval: 90d
      grace: 7d
      revoke_for: 1d12h
      ttl: 3600
      publisher: primary
  mail.example.org:
    rotation:
      publisher: by-hand
dns:
  publishers:
    primary: {type: rfc2136, server: "127.0.0.1:53", zone: "example.com.", tsig: {name: "dkimgw.", algorithm: hmac-sha256, secret_file: /etc/dkimgw/tsig.key}}
    by-hand: {type: manual, zone: example.org}
  check_servers: ["192.0.2.1", "192.0.2.2:5353"]
rotation:
  check_every: 30s
`

func TestParseRotation(t *testing.T) {
	cfg, err := Parse("dkimgw.yaml", []byte(rotating), testFiles(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if len(cfg.Warnings) != 0 {
		t.Errorf("warnings: %q", cfg.Warnings)
	}
	if got := cfg.Rotating(); strings.Join(got, ",") != "example.com,mail.example.org" {
		t.Errorf("Rotating() = %q", got)
	}
	r := cfg.Domains["example.com"].Rotation
	if r.Interval.D() != 90*24*time.Hour || r.RevokeFor.D() != 36*time.Hour || r.TTL.D() != time.Hour || r.Zone != "example.com" {
		t.Errorf("example.com rotation = %+v", r)
	}
	m := cfg.Domains["mail.example.org"].Rotation
	if strings.Join(m.Algorithms, ",") != "rsa-2048" || m.Interval.D() != 90*24*time.Hour || m.Grace.D() != 7*24*time.Hour ||
		m.TTL.D() != time.Hour || m.SelectorTemplate != "{alg}{yyyymmdd}" || m.Zone != "example.org" {
		t.Errorf("mail.example.org defaults = %+v", m)
	}
	if cfg.Rotation.CheckEvery.D() != 30*time.Second || cfg.DataDir != "/var/lib/dkimgw-test" {
		t.Errorf("check_every %s, data_dir %q", cfg.Rotation.CheckEvery.D(), cfg.DataDir)
	}
	if got := cfg.DNS.Publishers["by-hand"].Dir; got != "/var/lib/dkimgw-test/manual/by-hand" {
		t.Errorf("manual dir = %q", got)
	}
	s, err := cfg.Sign(cfg.ClientByAddr(netip.MustParseAddr("10.1.1.1")), "example.com")
	if err != nil || !s.Rotating || len(s.Selectors) != 0 || s.Domain != "example.com" {
		t.Errorf("Sign = %+v, %v; want a rotating signing without selectors", s, err)
	}
}

func TestParseRotationDefaults(t *testing.T) {
	cfg, err := Parse("dkimgw.yaml", []byte(minimal), testFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DataDir != DefaultDataDir || cfg.Rotation.CheckEvery.D() != DefaultCheckEvery || len(cfg.Rotating()) != 0 {
		t.Errorf("data_dir %q, check_every %s, rotating %q", cfg.DataDir, cfg.Rotation.CheckEvery.D(), cfg.Rotating())
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"90d": 90 * 24 * time.Hour, "1d12h": 36 * time.Hour, "3600": time.Hour, "2s": 2 * time.Second,
		"1m30s": 90 * time.Second, "0": 0,
	} {
		if got, err := ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "d", "-1h", "1w", "xd", "1d-2h", "ninety"} {
		if got, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) = %v, want an error", in, got)
		}
	}
}

func TestRotationWarnsShortDurations(t *testing.T) {
	y := strings.NewReplacer("interval: 90d", "interval: 20s", "grace: 7d", "grace: 5s", "ttl: 3600", "ttl: 2").Replace(rotating)
	cfg, err := Parse("dkimgw.yaml", []byte(y), testFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	w := strings.Join(cfg.Warnings, "\n")
	for _, want := range []string{"dkimgw.yaml:12: domains.example.com.rotation.interval 20s is below one hour", "dkimgw.yaml:13: domains.example.com.rotation.grace 5s is below one hour"} {
		if !strings.Contains(w, want) {
			t.Errorf("warnings\n%s\nlack %q", w, want)
		}
	}
}

func TestRotationErrors(t *testing.T) {
	edit := func(old, new string) string {
		if !strings.Contains(rotating, old) {
			panic("test bug: " + old)
		}
		return strings.Replace(rotating, old, new, 1)
	}
	tests := []struct {
		name string
		yaml string
		line int
		want string
	}{
		{"selectors and rotation", edit("  example.com:\n    rotation:", "  example.com:\n    selectors: [rsa1]\n    rotation:"), 11, "has both selectors and rotation"},
		{"unknown algorithm", edit("[rsa-2048, ed25519]", "[rsa-1024]"), 11, `unknown algorithm "rsa-1024"`},
		{"algorithm twice", edit("[rsa-2048, ed25519]", "[ed25519, ED25519]"), 11, "ed25519 is listed twice"},
		{"bad duration", edit("interval: 90d", "interval: 3 months"), 12, "not a duration"},
		{"negative grace", edit("grace: 7d", "grace: -1h"), 13, "not a duration"},
		{"ttl fraction", edit("ttl: 3600", "ttl: 1500ms"), 15, "whole number of seconds"},
		{"unknown publisher", edit("publisher: primary", "publisher: secondary"), 16, `no publisher "secondary"`},
		{"no publisher", edit("      publisher: by-hand\n", "      ttl: 60\n"), 18, "rotation.publisher is required"},
		{"unknown rotation key", edit("      publisher: primary\n", "      publisher: primary\n      selector: x\n"), 17, `unknown key "selector"`},
		{"zone not containing the domain", edit("      publisher: primary\n", "      publisher: primary\n      zone: example.net\n"), 17, `zone "example.net" does not contain the domain`},
		{"unknown publisher type", edit("{type: manual, zone: example.org}", "{type: route53}"), 23, `unknown value "route53"`},
		{"rfc2136 without tsig", edit(`, tsig: {name: "dkimgw.", algorithm: hmac-sha256, secret_file: /etc/dkimgw/tsig.key}`, ""), 22, "tsig needs name and secret_file"},
		{"rfc2136 without server", edit(`server: "127.0.0.1:53", `, ""), 22, "server is required"},
		{"bad tsig algorithm", edit("hmac-sha256", "hmac-md5"), 22, `tsig.algorithm "hmac-md5"`},
		{"manual with a server", edit("{type: manual, zone: example.org}", "{type: manual, server: \"127.0.0.1:53\"}"), 23, "are for type rfc2136 only"},
		{"manual without a way to check", edit(`  check_servers: ["192.0.2.1", "192.0.2.2:5353"]`+"\n", ""), 19, "set dns.check_servers"},
		{"bad check server", edit(`"192.0.2.2:5353"`, `"192.0.2.2:99999"`), 24, "not a port number"},
		{"check_every negative", edit("check_every: 30s", "check_every: -5s"), 26, "not a duration"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err == nil {
				t.Fatalf("Parse succeeded, want an error containing %q", tt.want)
			}
			found := false
			for _, e := range flatten(err) {
				if e, ok := e.(*Error); ok && strings.Contains(e.Msg, tt.want) {
					found = true
					if e.Line != tt.line {
						t.Errorf("line = %d, want %d (%q)", e.Line, tt.line, e)
					}
				}
			}
			if !found {
				t.Errorf("no error holds %q: %v", tt.want, err)
			}
		})
	}
}
