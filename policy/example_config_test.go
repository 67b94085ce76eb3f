package policy_test

import (
	"testing"

	"github.com/dkimgw/dkimgw/policy"
)

// TestExampleConfig keeps the documented example in the repository valid.
func TestExampleConfig(t *testing.T) {
	cfg, err := policy.Load("../dkimgw.example.yaml")
	if err != nil {
		t.Fatalf("dkimgw.example.yaml does not load:\n%v", err)
	}
	if len(cfg.Clients) != 1 || len(cfg.Selectors()) != 2 {
		t.Fatalf("example has %d clients and %d selectors, want 1 and 2", len(cfg.Clients), len(cfg.Selectors()))
	}
	if got := cfg.Rotating(); len(got) != 1 || cfg.DNS.Publishers[cfg.Domains[got[0]].Rotation.Publisher].Type != policy.PublisherRFC2136 {
		t.Errorf("example rotates %q, want one domain published by rfc2136", got)
	}
	if len(cfg.Warnings) != 0 {
		t.Errorf("the example draws warnings: %q", cfg.Warnings)
	}
	if cfg.SMTP.MaxConnectionsPerIP != policy.DefaultMaxConnectionsPerIP {
		t.Errorf("example max_connections_per_ip = %d, want the default %d", cfg.SMTP.MaxConnectionsPerIP, policy.DefaultMaxConnectionsPerIP)
	}
}
