package policy

import (
	"strings"
	"testing"
	"time"
)

func TestMilterConfig(t *testing.T) {
	for _, tt := range []struct {
		name, yaml       string
		network, address string
		mode             uint32
		unauth, tokenErr MilterAction
	}{
		{"defaults, no milter", minimal, "unix", "", 0o660, MilterAccept, MilterTempfail},
		{"inet", minimal + "milter: {listen: \"inet:127.0.0.1:8891\", on_unauthorized: reject}\n", "tcp", "127.0.0.1:8891", 0o660, MilterReject, MilterTempfail},
		{"unix with mode", minimal + "milter: {listen: \"unix:/run/dkimgw/milter.sock\", socket_mode: \"0666\", on_token_error: accept, on_unauthorized: tempfail}\n", "unix", "/run/dkimgw/milter.sock", 0o666, MilterTempfail, MilterAccept},
		{"sendmail's local:", minimal + "milter: {listen: \"local:/run/m.sock\"}\n", "unix", "/run/m.sock", 0o660, MilterAccept, MilterTempfail},
		// A milter-only gateway hands nothing on.
		{"no upstream with a milter", strings.Replace(minimal, "upstream:\n  address: \"127.0.0.1:10026\"\n", "", 1) + "milter: {listen: \"inet:127.0.0.1:8891\"}\n", "tcp", "127.0.0.1:8891", 0o660, MilterAccept, MilterTempfail},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err != nil {
				t.Fatal(err)
			}
			m := cfg.Milter
			if n, a := m.Network(); tt.address != "" && (n != tt.network || a != tt.address) {
				t.Errorf("Network() = %s %s, want %s %s", n, a, tt.network, tt.address)
			}
			if m.Mode() != tt.mode || m.OnUnauthorized != tt.unauth || m.OnTokenError != tt.tokenErr {
				t.Errorf("milter = %+v", m)
			}
			if m.SignTimeout != DefaultMilterSignTimeout || m.SignTimeout >= 30*time.Second {
				t.Errorf("sign_timeout %s: want the default, below Postfix's 30s milter_command_timeout", m.SignTimeout)
			}
			if m.MaxConnections != DefaultMilterMaxConnections {
				t.Errorf("max_connections %d, want the default", m.MaxConnections)
			}
			if m.ReadTimeout <= 300*time.Second {
				t.Errorf("read_timeout %s: want more than Postfix's smtpd_timeout (300s)", m.ReadTimeout)
			}
		})
	}
	for _, tt := range []struct{ name, yaml, want string }{
		{"bad listen", minimal + "milter: {listen: \"127.0.0.1:8891\"}\n", "want inet:HOST:PORT or unix:/path"},
		{"relative socket", minimal + "milter: {listen: \"unix:milter.sock\"}\n", "absolute path"},
		{"bad port", minimal + "milter: {listen: \"inet:127.0.0.1:x\"}\n", "not a port number"},
		{"bad mode", minimal + "milter: {socket_mode: \"rw\"}\n", "milter.socket_mode"},
		{"bad on_unauthorized", minimal + "milter: {on_unauthorized: relay-unsigned}\n", "want accept, reject or tempfail"},
		{"bad on_token_error", minimal + "milter: {on_token_error: reject}\n", "want tempfail or accept"},
		{"no upstream, no milter", strings.Replace(minimal, "upstream:\n  address: \"127.0.0.1:10026\"\n", "", 1), "upstream.address is required"},
		{"unknown key", minimal + "milter: {socket: x}\n", `unknown key "socket"`},
		{"max_connections", minimal + "milter: {max_connections: -1}\n", "milter.max_connections must be at least 1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
}
