package policy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/dkimgw/dkimgw/dnsname"
)

type validator struct {
	file     string
	loc      locator
	dir      string
	readFile func(string) ([]byte, error)
	errs     []error
	warnings []string
}

func (v *validator) errorf(path []any, format string, args ...any) {
	v.errs = append(v.errs, &Error{File: v.file, Line: v.loc.line(path...), Msg: fmt.Sprintf(format, args...)})
}

func (v *validator) warnf(path []any, format string, args ...any) {
	e := &Error{File: v.file, Line: v.loc.line(path...), Msg: fmt.Sprintf(format, args...)}
	v.warnings = append(v.warnings, e.Error())
}

func at(path ...any) []any { return path }

// path resolves a file name from the configuration against its directory.
func (v *validator) path(name string) string {
	if name == "" || filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(v.dir, name)
}

func (v *validator) validate(c *Config) {
	v.validateHSM(c)
	v.validateSMTP(c)
	v.validateUpstream(c)
	v.validateSpool(c)
	v.validateLog(c)
	v.validateRotation(c)
	v.validateState(c)
	v.validateAdmin(c)
	v.validateAudit(c)
	v.validateMilter(c)
	v.validateDomains(c)
	v.validateClients(c)

	switch c.OnTokenError {
	case TokenErrorTempfail, TokenErrorRelayUnsigned:
	default:
		v.errorf(at("on_token_error"), "on_token_error: unknown value %q (want tempfail or relay-unsigned)", c.OnTokenError)
	}
	switch c.OnUnauthorized {
	case UnauthorizedReject, UnauthorizedRelayUnsigned:
	default:
		v.errorf(at("on_unauthorized"), "on_unauthorized: unknown value %q (want reject or relay-unsigned)", c.OnUnauthorized)
	}
	v.positive(at("shutdown_grace"), "shutdown_grace", c.ShutdownGrace)
}

func (v *validator) validateHSM(c *Config) {
	switch {
	case c.HSM.URI == "":
		v.errorf(at("hsm"), "hsm.uri is required (an RFC 7512 pkcs11: URI naming the token); dkimgw serve and config check also take it from $DKIMGW_HSM")
	case !strings.HasPrefix(strings.ToLower(c.HSM.URI), "pkcs11:"):
		// Do not echo the value: it may hold a PIN.
		v.errorf(at("hsm", "uri"), "hsm.uri must be an RFC 7512 URI starting with \"pkcs11:\"")
	}
}

func (v *validator) validateSMTP(c *Config) {
	s := &c.SMTP
	v.hostPort(at("smtp", "listen"), "smtp.listen", s.Listen, true)
	if s.Hostname != "" {
		if _, err := dnsname.Host(s.Hostname); err != nil {
			v.errorf(at("smtp", "hostname"), "smtp.hostname: %s", nameProblem(err))
		}
	}
	if s.MaxMessageBytes < 1024 || s.MaxMessageBytes > 1<<32-1 {
		// SIZE (RFC 1870) values are parsed as 32-bit by many clients.
		v.errorf(at("smtp", "max_message_bytes"), "smtp.max_message_bytes must be between 1024 and %d, not %d", int64(1<<32-1), s.MaxMessageBytes)
	}
	if s.MaxRecipients < 1 {
		v.errorf(at("smtp", "max_recipients"), "smtp.max_recipients must be at least 1, not %d", s.MaxRecipients)
	}
	if s.MaxLineLength < 1000 {
		v.errorf(at("smtp", "max_line_length"), "smtp.max_line_length must be at least 1000 (RFC 5321 section 4.5.3.1.6), not %d", s.MaxLineLength)
	}
	if s.MaxConnections < 1 {
		v.errorf(at("smtp", "max_connections"), "smtp.max_connections must be at least 1, not %d", s.MaxConnections)
	}
	if s.MaxConnectionsPerIP < 1 {
		v.errorf(at("smtp", "max_connections_per_ip"), "smtp.max_connections_per_ip must be at least 1, not %d", s.MaxConnectionsPerIP)
	}
	if s.MaxAuthFailures < 1 {
		v.errorf(at("smtp", "max_auth_failures"), "smtp.max_auth_failures must be at least 1, not %d", s.MaxAuthFailures)
	}
	v.positive(at("smtp", "read_timeout"), "smtp.read_timeout", s.ReadTimeout)
	v.positive(at("smtp", "write_timeout"), "smtp.write_timeout", s.WriteTimeout)
	v.positive(at("smtp", "data_timeout"), "smtp.data_timeout", s.DataTimeout)
	v.positive(at("smtp", "max_session_duration"), "smtp.max_session_duration", s.MaxSessionDuration)
	if s.TLS != nil {
		v.validateTLS(s.TLS, "smtp")
	}
}

// validateTLS checks the tls block of section (smtp, admin).
func (v *validator) validateTLS(t *TLS, section string) {
	if t.CertFile == "" || t.KeyFile == "" {
		v.errorf(at(section, "tls"), "%s.tls needs both cert_file and key_file", section)
		return
	}
	t.CertFile, t.KeyFile = v.path(t.CertFile), v.path(t.KeyFile)
	certPEM, err := v.readFile(t.CertFile)
	if err != nil {
		v.errorf(at(section, "tls", "cert_file"), "%s.tls.cert_file: %v", section, err)
		return
	}
	keyPEM, err := v.readFile(t.KeyFile)
	if err != nil {
		v.errorf(at(section, "tls", "key_file"), "%s.tls.key_file: %v", section, err)
		return
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		v.errorf(at(section, "tls"), "%s.tls: %s and %s are not a usable certificate and key: %v", section, t.CertFile, t.KeyFile, err)
		return
	}
	t.cert = &cert
}

func (v *validator) validateUpstream(c *Config) {
	u := &c.Upstream
	if u.Address == "" {
		// A milter-only gateway hands nothing on: its MTA delivers.
		if c.Milter.Listen == "" {
			v.errorf(at("upstream"), "upstream.address is required (host:port of the MTA that delivers signed mail, or capture:DIR)")
		}
	} else if dir, ok := strings.CutPrefix(u.Address, CapturePrefix); ok {
		v.validateCapture(u, dir)
	} else {
		v.hostPort(at("upstream", "address"), "upstream.address", u.Address, false)
	}
	switch u.TLS {
	case UpstreamTLSNone, UpstreamTLSOpportunistic, UpstreamTLSRequired:
	default:
		v.errorf(at("upstream", "tls"), "upstream.tls: unknown value %q (want none, opportunistic or required)", u.TLS)
	}
	if u.TLSCAFile != "" {
		u.TLSCAFile = v.path(u.TLSCAFile)
		pem, err := v.readFile(u.TLSCAFile)
		if err != nil {
			v.errorf(at("upstream", "tls_ca_file"), "upstream.tls_ca_file: %v", err)
		} else {
			u.roots = x509.NewCertPool()
			if !u.roots.AppendCertsFromPEM(pem) {
				v.errorf(at("upstream", "tls_ca_file"), "upstream.tls_ca_file %s holds no PEM certificate", u.TLSCAFile)
			}
		}
	}
	v.positive(at("upstream", "timeout"), "upstream.timeout", u.Timeout)
	v.positive(at("upstream", "connect_timeout"), "upstream.connect_timeout", u.ConnectTimeout)
	v.positive(at("upstream", "idle_timeout"), "upstream.idle_timeout", u.IdleTimeout)
	v.positive(at("upstream", "keepalive"), "upstream.keepalive", u.Keepalive)
	if u.Keepalive > 0 && c.SMTP.DataTimeout > 0 && c.SMTP.DataTimeout/u.Keepalive > MaxKeepalivesPerMessage {
		v.errorf(at("upstream", "keepalive"), "upstream.keepalive %s would send up to %d NOOPs while one message arrives (smtp.data_timeout %s); upstreams limit them (Postfix drops a client after about 120 without a delivered message): use at least %s",
			u.Keepalive, c.SMTP.DataTimeout/u.Keepalive, c.SMTP.DataTimeout, c.SMTP.DataTimeout/MaxKeepalivesPerMessage)
	}
	if u.MaxConnections < 1 {
		v.errorf(at("upstream", "max_connections"), "upstream.max_connections must be at least 1, not %d", u.MaxConnections)
	}
	if u.MaxIdle < 0 || u.MaxIdle > u.MaxConnections && u.MaxConnections >= 1 {
		v.errorf(at("upstream", "max_idle"), "upstream.max_idle must be between 0 and upstream.max_connections (%d), not %d", u.MaxConnections, u.MaxIdle)
	}
}

func (v *validator) validateSpool(c *Config) {
	s := &c.Spool
	if s.Dir != "" {
		s.Dir = v.path(s.Dir)
	}
	if s.MemoryLimit < 0 {
		v.errorf(at("spool", "memory_limit"), "spool.memory_limit must not be negative")
	}
	if s.MemoryTotal < 0 {
		v.errorf(at("spool", "memory_total"), "spool.memory_total must not be negative")
	}
	if s.MaxHeaderBytes < 1024 {
		v.errorf(at("spool", "max_header_bytes"), "spool.max_header_bytes must be at least 1024, not %d", s.MaxHeaderBytes)
	}
}

func (v *validator) validateLog(c *Config) {
	switch c.Log.Format {
	case "text", "json":
	default:
		v.errorf(at("log", "format"), "log.format: unknown value %q (want text or json)", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		v.errorf(at("log", "level"), "log.level: unknown value %q (want debug, info, warn or error)", c.Log.Level)
	}
}

func (v *validator) validateDomains(c *Config) {
	if len(c.Domains) == 0 {
		v.errorf(at("domains"), "domains: at least one signing domain is required")
		return
	}
	norm := make(map[string]Domain, len(c.Domains))
	seen := make(map[string]string, len(c.Domains)) // normalised -> as written
	// Sorted, so that errors come out in a stable order.
	for _, name := range slices.Sorted(maps.Keys(c.Domains)) {
		d := c.Domains[name]
		key, err := dnsname.Domain(name)
		if err != nil {
			v.errorf(at("domains", name), "domains: %s", nameProblem(err))
			continue
		}
		if prev, dup := seen[key]; dup {
			v.errorf(at("domains", name), "domains: %q is listed twice (also as %q)", name, prev)
			continue
		}
		seen[key] = name
		switch {
		case d.Rotation != nil && len(d.Selectors) > 0:
			v.errorf(at("domains", name, "rotation"), "domains.%s: has both selectors and rotation; list fixed selectors or let rotation manage the keys, not both", name)
		case d.Rotation != nil:
			r := *d.Rotation
			r.Algorithms = slices.Clone(r.Algorithms)
			v.validateDomainRotation(c, name, key, &r)
			d.Rotation = &r
		case len(d.Selectors) == 0:
			v.errorf(at("domains", name), "domains.%s.selectors: at least one selector is required (or a rotation policy)", name)
		}
		sels := make([]string, 0, len(d.Selectors))
		for i, s := range d.Selectors {
			_, s, err := dnsname.Key(key, s)
			switch {
			case err != nil:
				v.errorf(at("domains", name, "selectors", i), "domains.%s.selectors: %s", name, nameProblem(err))
			case slices.Contains(sels, s):
				v.errorf(at("domains", name, "selectors", i), "domains.%s.selectors: %q is listed twice", name, d.Selectors[i])
			default:
				sels = append(sels, s)
			}
		}
		d.Selectors = sels
		if d.Expire < 0 {
			v.errorf(at("domains", name, "expire"), "domains.%s.expire must not be negative", name)
		} else if d.Expire > 0 && d.Expire < time.Hour {
			// Mail sits in queues for hours; a shorter x= makes signatures
			// expire before delivery.
			v.errorf(at("domains", name, "expire"), "domains.%s.expire %s is too short: mail can wait in queues for hours (use at least 1h, or leave it out)", name, d.Expire)
		}
		norm[key] = d
	}
	c.Domains = norm
}

type clientPrefix struct {
	prefix netip.Prefix
	client *Client
	line   int
}

func (v *validator) validateClients(c *Config) {
	if len(c.Clients) == 0 {
		v.errorf(at("clients"), "clients: at least one client is required, or nobody may relay")
		return
	}
	names := make(map[string]int)
	c.users = make(map[string]*User)
	maxCost := 0
	for i := range c.Clients {
		cl := &c.Clients[i]
		p := func(rest ...any) []any { return append([]any{"clients", i}, rest...) }
		label := fmt.Sprintf("clients[%d]", i)
		if cl.Name == "" {
			v.errorf(p(), "%s: name is required", label)
		} else {
			label = fmt.Sprintf("client %q", cl.Name)
			if prev, dup := names[cl.Name]; dup {
				v.errorf(p("name"), "%s is defined twice (also clients[%d])", label, prev)
			}
			names[cl.Name] = i
		}
		if len(cl.Networks) == 0 && len(cl.Users) == 0 {
			v.errorf(p(), "%s has neither networks nor users, so it can never be recognised", label)
		}
		if cl.RequireAuth && (len(cl.Networks) == 0 || len(cl.Users) == 0) {
			v.errorf(p("require_auth"), "%s: require_auth needs both users (who log in) and networks (where from); without networks, leave require_auth out and the users may log in from anywhere", label)
		}
		if len(cl.Users) > 0 && c.SMTP.TLS == nil {
			// AUTH is offered only after STARTTLS.
			if cl.RequireAuth {
				v.errorf(p("require_auth"), "%s: require_auth without smtp.tls: AUTH is offered only after STARTTLS, so the client could never be recognised; set smtp.tls", label)
			} else {
				v.warnf(p("users"), "%s has users, but without smtp.tls AUTH is never offered (it needs STARTTLS), so they cannot log in; set smtp.tls", label)
			}
		}
		for j, n := range cl.Networks {
			pfx, err := parsePrefix(n)
			if err != nil {
				v.errorf(p("networks", j), "%s: %v", label, err)
				continue
			}
			if cl.RequireAuth {
				// Only where its users may log in from: no address is
				// recognised, so overlaps and width do not matter.
				cl.prefixes = append(cl.prefixes, pfx)
				continue
			}
			if pfx.Bits() == 0 {
				v.errorf(p("networks", j), "%s: network %s is every address: anyone could relay through dkimgw; list the MTAs' networks, or add require_auth: true so that only the client's users, after SMTP AUTH, are recognised", label, pfx)
				continue
			}
			// Loopback is exempt: only this machine's processes are in it.
			wide := pfx.Addr().Is4() && pfx.Bits() < 16 || pfx.Addr().Is6() && pfx.Bits() < 48
			if wide && !(pfx.Bits() >= 8 && pfx.Addr().IsLoopback()) {
				limit := "/16"
				if pfx.Addr().Is6() {
					limit = "/48"
				}
				v.warnf(p("networks", j), "%s: network %s is wider than %s: every host in it may relay and have mail signed; list the MTAs' own networks if you can", label, pfx, limit)
			}
			for _, other := range c.prefixes {
				if other.prefix.Overlaps(pfx) {
					v.errorf(p("networks", j), "%s: network %s overlaps %s of client %q (line %d); a source address must name one client", label, pfx, other.prefix, other.client.Name, other.line)
				}
			}
			cl.prefixes = append(cl.prefixes, pfx)
			c.prefixes = append(c.prefixes, clientPrefix{prefix: pfx, client: cl, line: v.loc.line(p("networks", j)...)})
		}
		for j := range cl.Users {
			u := &cl.Users[j]
			u.client = cl
			switch {
			case u.Name == "":
				v.errorf(p("users", j), "%s: users[%d].name is required", label, j)
				continue
			case c.users[u.Name] != nil:
				v.errorf(p("users", j, "name"), "%s: user %q is already defined for client %q", label, u.Name, c.users[u.Name].client.Name)
				continue
			}
			c.users[u.Name] = u
			if u.PasswordFile == "" {
				v.errorf(p("users", j), "%s: user %q needs a password_file", label, u.Name)
				continue
			}
			u.PasswordFile = v.path(u.PasswordFile)
			data, err := v.readFile(u.PasswordFile)
			if err != nil {
				v.errorf(p("users", j, "password_file"), "%s: user %q: %v", label, u.Name, err)
				continue
			}
			u.hash = []byte(strings.TrimSpace(string(data)))
			if cost, err := bcrypt.Cost(u.hash); err != nil {
				// Never print the file's content: it might be a plain password.
				v.errorf(p("users", j, "password_file"), "%s: user %q: %s does not hold a bcrypt hash (make one with `htpasswd -nBC 12 \"\" | tr -d ':\\n'`)", label, u.Name, u.PasswordFile)
				u.hash = nil
			} else {
				maxCost = max(maxCost, cost)
			}
		}
		if len(cl.Domains) == 0 {
			v.errorf(p(), "%s has no domains: it could not have any mail signed", label)
		}
		doms := make([]string, 0, len(cl.Domains))
		for j, d := range cl.Domains {
			key, err := dnsname.Domain(d)
			switch {
			case err != nil:
				v.errorf(p("domains", j), "%s: %s", label, nameProblem(err))
				continue
			case slices.Contains(doms, key):
				v.errorf(p("domains", j), "%s: domain %q is listed twice", label, d)
				continue
			}
			if _, ok := c.signingDomain(key); !ok && len(c.Domains) > 0 {
				v.errorf(p("domains", j), "%s: domain %q has no entry under domains: (neither it nor a parent domain), so its mail could not be signed", label, d)
			}
			doms = append(doms, key)
		}
		cl.Domains = doms
	}
	c.dummyHash = dummyHashOf(maxCost)
}

// positive reports a duration that is zero or negative (zero survives
// defaults only if written explicitly as 0s).
func (v *validator) positive(path []any, key string, d time.Duration) {
	if d <= 0 {
		v.errorf(path, "%s must be a positive duration, not %s", key, d)
	}
}

// validateCapture checks the directory of upstream.address capture:DIR
// and rewrites the address with DIR made absolute (relative to the
// configuration's directory), so that the relay needs no base directory.
// The directory must exist: the relay answers 451 for a message it cannot
// store, and a typo found at start is better than one found by the first
// message.
func (v *validator) validateCapture(u *Upstream, dir string) {
	path := at("upstream", "address")
	if dir == "" {
		v.errorf(path, "upstream.address capture: needs a directory, e.g. capture:/var/lib/dkimgw/capture")
		return
	}
	dir = v.path(dir)
	u.Address = CapturePrefix + dir
	fi, err := os.Stat(dir)
	switch {
	case err != nil:
		v.errorf(path, "upstream.address capture directory: %v (create it with mkdir -m 700 %s)", err, dir)
		return
	case !fi.IsDir():
		v.errorf(path, "upstream.address capture directory %s is not a directory", dir)
		return
	}
	// W_OK|X_OK: creating a file needs both. root passes whatever the mode.
	if err := syscall.Access(dir, 0o2|0o1); err != nil {
		v.errorf(path, "upstream.address capture directory %s is not writable by this user: %v", dir, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		v.warnf(path, "upstream.address capture directory %s is accessible by group or others (mode %04o): captured messages are readable there; chmod 700 %s", dir, fi.Mode().Perm(), dir)
	}
}

func (v *validator) hostPort(path []any, key, addr string, emptyHostOK bool) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		v.errorf(path, "%s %q is not host:port: %v", key, addr, err)
		return
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (!emptyHostOK && n == 0) {
		v.errorf(path, "%s %q: port %q is not a port number", key, addr, port)
	}
	if host == "" && !emptyHostOK {
		v.errorf(path, "%s %q has no host", key, addr)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && !isHost(host) {
			v.errorf(path, "%s %q: %q is neither an IP address nor a host name", key, addr, host)
		}
	}
}

// parsePrefix accepts a CIDR prefix or a single address, and refuses a
// prefix with host bits set, which is nearly always a typo.
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("network %q is neither an address nor a CIDR prefix", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("network %q is not a CIDR prefix: %v", s, err)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("network %q: write IPv4-mapped networks in IPv4 form", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("network %q has host bits set (did you mean %s?)", s, p.Masked())
	}
	return p, nil
}

// normalizeDomain lower-cases a domain and drops a trailing dot.
func normalizeDomain(s string) string {
	return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), ".")
}

// nameProblem is what a dnsname error says, without its package prefix:
// a configuration error already names its file and line.
func nameProblem(err error) string {
	if ne, ok := errors.AsType[*dnsname.Error](err); ok {
		return ne.Detail()
	}
	return err.Error()
}

func isHost(s string) bool {
	_, err := dnsname.Host(s)
	return err == nil
}
