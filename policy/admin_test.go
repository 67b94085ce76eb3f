package policy

import (
	"strings"
	"testing"
)

func TestAdminConfig(t *testing.T) {
	files := testFiles(t)
	withToken := func(name string) ([]byte, error) {
		switch name {
		case "/etc/dkimgw/admin.token":
			return []byte("0123456789abcdef0123\n"), nil
		case "/etc/dkimgw/short.token":
			return []byte("short\n"), nil
		}
		return files(name)
	}
	tests := []struct {
		name     string
		yaml     string
		addr     string
		token    string
		err      string // substring of the error; "" for none
		warnings int
	}{
		{"default", "", DefaultAdminListen, "", "", 0},
		{"disabled", "admin:\n  listen: \"\"\n", "", "", "", 0},
		{"token", "admin:\n  listen: 127.0.0.1:9000\n  bearer_token_file: /etc/dkimgw/admin.token\n", "127.0.0.1:9000", "0123456789abcdef0123", "", 0},
		{"tls", "admin:\n  tls: {cert_file: /etc/dkimgw/tls.crt, key_file: /etc/dkimgw/tls.key}\n", DefaultAdminListen, "", "", 0},
		{"open to the network", "admin:\n  listen: \":9465\"\n", ":9465", "", "", 1},
		{"bad address", "admin:\n  listen: localhost\n", "", "", "admin.listen \"localhost\" is not host:port", 0},
		{"missing token file", "admin:\n  bearer_token_file: /etc/dkimgw/none\n", "", "", "admin.bearer_token_file", 0},
		{"short token", "admin:\n  bearer_token_file: /etc/dkimgw/short.token\n", "", "", "at least 16 characters", 0},
		{"tls without key", "admin:\n  tls: {cert_file: /etc/dkimgw/tls.crt}\n", "", "", "admin.tls needs both cert_file and key_file", 0},
		{"drift every", "rotation:\n  drift_every: -5m\n", "", "", "is not a duration", 0},
		{"on_drift", "rotation:\n  on_drift: reject\n", "", "", `rotation.on_drift: unknown value "reject"`, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("dkimgw.yaml", []byte(minimal+tt.yaml), withToken)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Parse error = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := cfg.Admin.Addr(); got != tt.addr {
				t.Errorf("Addr() = %q, want %q", got, tt.addr)
			}
			if got := string(cfg.Admin.BearerToken()); got != tt.token {
				t.Errorf("BearerToken() = %q, want %q", got, tt.token)
			}
			n := 0
			for _, w := range cfg.Warnings {
				if strings.Contains(w, "admin.") {
					n++
				}
			}
			if n != tt.warnings {
				t.Errorf("warnings = %q, want %d", cfg.Warnings, tt.warnings)
			}
			if tt.name == "default" && (cfg.Rotation.DriftEvery.D() != DefaultDriftEvery || cfg.Rotation.OnDrift != DriftWarn) {
				t.Errorf("rotation drift defaults = %v %q", cfg.Rotation.DriftEvery.D(), cfg.Rotation.OnDrift)
			}
		})
	}
}
