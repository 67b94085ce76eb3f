package policy

import (
	"bytes"
	"net"
	"net/netip"
)

// DefaultAdminListen is the admin listener's address when admin.listen is
// absent: loopback, so that metrics and health are not offered to the
// network unless the operator says so. 9465 sits next to the ports of
// other mail exporters and is free in Prometheus's port allocation list.
const DefaultAdminListen = "127.0.0.1:9465"

// Admin is the HTTP listener of /metrics, /healthz and /readyz.
type Admin struct {
	// Listen is the host:port of the admin listener. Absent:
	// DefaultAdminListen; "" disables the listener. Use [Admin.Addr].
	Listen *string `yaml:"listen"`
	// TLS, when set, serves HTTPS with this certificate and key.
	TLS *TLS `yaml:"tls"`
	// BearerTokenFile holds the token a scraper must send as
	// "Authorization: Bearer TOKEN" on /metrics and /readyz (not on
	// /healthz, which says nothing but "alive"). Empty: no token.
	// Relative to the configuration file's directory.
	BearerTokenFile string `yaml:"bearer_token_file"`

	token []byte
}

// Addr is the admin listener's address; "" when it is disabled.
func (a *Admin) Addr() string {
	if a.Listen == nil {
		return DefaultAdminListen
	}
	return *a.Listen
}

// BearerToken is the token read from BearerTokenFile when the
// configuration was loaded (nil: none is required). Never log it.
func (a *Admin) BearerToken() []byte { return a.token }

func (c *Config) applyAdminDefaults() {
	if c.Admin.Listen == nil {
		l := DefaultAdminListen
		c.Admin.Listen = &l
	}
}

func (v *validator) validateAdmin(c *Config) {
	a := &c.Admin
	addr := a.Addr()
	if addr == "" {
		return
	}
	v.hostPort(at("admin", "listen"), "admin.listen", addr, true)
	if host, _, err := net.SplitHostPort(addr); err == nil && a.BearerTokenFile == "" && a.TLS == nil {
		if ip, err := netip.ParseAddr(host); host == "" || (err == nil && !ip.IsLoopback()) {
			v.warnf(at("admin", "listen"), "admin.listen %s is reachable from the network without a bearer token: anyone there can read the metrics (set admin.bearer_token_file)", addr)
		}
	}
	if a.TLS != nil {
		v.validateTLS(a.TLS, "admin")
	}
	if a.BearerTokenFile != "" {
		a.BearerTokenFile = v.path(a.BearerTokenFile)
		data, err := v.readFile(a.BearerTokenFile)
		if err != nil {
			v.errorf(at("admin", "bearer_token_file"), "admin.bearer_token_file: %v", err)
			return
		}
		tok := bytes.TrimSpace(data)
		if len(tok) < 16 || bytes.ContainsAny(tok, " \t\r\n") {
			v.errorf(at("admin", "bearer_token_file"), "admin.bearer_token_file %s must hold one token of at least 16 characters, without blanks", a.BearerTokenFile)
			return
		}
		a.token = tok
	}
}
