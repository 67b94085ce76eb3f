package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// The configuration of issue 4, verbatim but for the file names.
const issueConfig = `
hsm:
  uri: "pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin"
smtp:
  listen: "127.0.0.1:10025"
  hostname: "dkimgw.example.net"     # EHLO/banner name
  max_message_bytes: 52428800
  max_recipients: 1000
  tls: {cert_file: /etc/dkimgw/tls.crt, key_file: /etc/dkimgw/tls.key}   # optional: enables STARTTLS
upstream:
  address: "127.0.0.1:10026"        # the MTA that delivers signed mail
  tls: none                         # none | opportunistic | required
  timeout: 5m
clients:                            # who may relay, and for which From domains
  - name: campaigns
    networks: ["127.0.0.0/8"]       # recognised by source address ...
    domains: ["example.com"]        # ... may have mail From these domains (and their subdomains) signed
  - name: tenant-b
    users: [{name: tenant-b, password_file: /etc/dkimgw/tenant-b.bcrypt}]   # ... or by SMTP AUTH, only after STARTTLS
    domains: ["b.example.org"]
domains:
  example.com:
    selectors: [rsa1, ed1]          # token keys that sign mail of this domain: one signature each
    expire: 120h                    # optional x=
  example.org:
    selectors: [s2026]
on_token_error: tempfail            # tempfail (default) | relay-unsigned
on_unauthorized: reject             # reject (default) | relay-unsigned
`

// minimal is the smallest valid configuration; error cases edit it.
const minimal = `hsm:
  uri: "pkcs11:token=dkim"
upstream:
  address: "127.0.0.1:10026"
clients:
  - name: campaigns
    networks: ["10.0.0.0/8"]
    domains: [example.com]
domains:
  example.com:
    selectors: [rsa1]
`

const testPassword = "correct horse battery staple"

var (
	fixturesOnce sync.Once
	fixtures     map[string][]byte
)

// testFiles returns a readFile over fixed in-memory files: a bcrypt hash,
// a TLS certificate and key, a CA file and a file that is not a hash.
func testFiles(t testing.TB) func(string) ([]byte, error) {
	t.Helper()
	fixturesOnce.Do(func() {
		hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
		if err != nil {
			panic(err)
		}
		certPEM, keyPEM := selfSigned()
		fixtures = map[string][]byte{
			"/etc/dkimgw/tenant-b.bcrypt": append(hash, '\n'),
			"/etc/dkimgw/tls.crt":         certPEM,
			"/etc/dkimgw/tls.key":         keyPEM,
			"/etc/dkimgw/ca.pem":          certPEM,
			"/etc/dkimgw/plain.txt":       []byte("hunter2\n"),
		}
	})
	return func(name string) ([]byte, error) {
		if b, ok := fixtures[name]; ok {
			return b, nil
		}
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
}

func selfSigned() (certPEM, keyPEM []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "dkimgw.test"},
		DNSNames:     []string{"dkimgw.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IsCA:         true,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},

		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		panic(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func TestParseIssueConfig(t *testing.T) {
	cfg, err := Parse("dkimgw.yaml", []byte(issueConfig), testFiles(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got, want := cfg.SMTP.Hostname, "dkimgw.example.net"; got != want {
		t.Errorf("hostname = %q, want %q", got, want)
	}
	if cfg.SMTP.TLS == nil || cfg.SMTP.TLS.Certificate() == nil {
		t.Errorf("smtp.tls: certificate not loaded")
	}
	if got := cfg.Upstream.Timeout; got != 5*time.Minute {
		t.Errorf("upstream.timeout = %v", got)
	}
	if got := cfg.Domains["example.com"]; got.Expire != 120*time.Hour || len(got.Selectors) != 2 {
		t.Errorf("domains[example.com] = %+v", got)
	}
	if cfg.OnTokenError != TokenErrorTempfail || cfg.OnUnauthorized != UnauthorizedReject {
		t.Errorf("actions = %q, %q", cfg.OnTokenError, cfg.OnUnauthorized)
	}
	if !cfg.HasUsers() {
		t.Errorf("HasUsers = false")
	}
}

func TestParseDefaults(t *testing.T) {
	cfg, err := Parse("dkimgw.yaml", []byte(minimal), testFiles(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"smtp.listen", cfg.SMTP.Listen, DefaultListen},
		{"smtp.max_message_bytes", cfg.SMTP.MaxMessageBytes, int64(DefaultMaxMessageBytes)},
		{"smtp.max_recipients", cfg.SMTP.MaxRecipients, DefaultMaxRecipients},
		{"smtp.max_line_length", cfg.SMTP.MaxLineLength, DefaultMaxLineLength},
		{"smtp.max_connections", cfg.SMTP.MaxConnections, DefaultMaxConnections},
		{"smtp.read_timeout", cfg.SMTP.ReadTimeout, DefaultReadTimeout},
		{"smtp.write_timeout", cfg.SMTP.WriteTimeout, DefaultWriteTimeout},
		{"smtp.data_timeout", cfg.SMTP.DataTimeout, DefaultDataTimeout},
		{"smtp.max_session_duration", cfg.SMTP.MaxSessionDuration, DefaultMaxSessionDuration},
		{"smtp.max_auth_failures", cfg.SMTP.MaxAuthFailures, DefaultMaxAuthFailures},
		{"smtp.tls", cfg.SMTP.TLS == nil, true},
		{"upstream.tls", cfg.Upstream.TLS, UpstreamTLSNone},
		{"upstream.timeout", cfg.Upstream.Timeout, DefaultUpstreamTimeout},
		{"upstream.connect_timeout", cfg.Upstream.ConnectTimeout, DefaultUpstreamConnectTimeout},
		{"upstream.idle_timeout", cfg.Upstream.IdleTimeout, DefaultUpstreamIdleTimeout},
		{"upstream.keepalive", cfg.Upstream.Keepalive, DefaultUpstreamKeepalive},
		{"upstream.max_connections", cfg.Upstream.MaxConnections, DefaultMaxConnections},
		{"upstream.max_idle", cfg.Upstream.MaxIdle, DefaultUpstreamMaxIdle},
		{"spool.dir", cfg.Spool.Dir, ""},
		{"spool.memory_limit", cfg.Spool.MemoryLimit, int64(DefaultSpoolMemoryLimit)},
		{"spool.memory_total", cfg.Spool.MemoryTotal, int64(DefaultSpoolMemoryTotal)},
		{"spool.max_header_bytes", cfg.Spool.MaxHeaderBytes, DefaultSpoolMaxHeaderBytes},
		{"log.format", cfg.Log.Format, "text"},
		{"log.level", cfg.Log.Level, "info"},
		{"on_token_error", cfg.OnTokenError, TokenErrorTempfail},
		{"on_unauthorized", cfg.OnUnauthorized, UnauthorizedReject},
		{"shutdown_grace", cfg.ShutdownGrace, DefaultShutdownGrace},
		{"HasUsers", cfg.HasUsers(), false},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

// TestParseErrors is the table of broken configurations: each must be
// refused with a message that names the file and the line of the mistake.
func TestParseErrors(t *testing.T) {
	// edit replaces old with new in the minimal configuration.
	edit := func(old, new string) string {
		if !strings.Contains(minimal, old) {
			panic("test bug: " + old)
		}
		return strings.Replace(minimal, old, new, 1)
	}
	withClient := func(client string) string {
		return edit("domains:\n  example.com:", client+"domains:\n  example.com:")
	}
	tests := []struct {
		name string
		yaml string
		line int    // expected line of the (first) error; 0: no line
		want string // substring of the error
	}{
		{"empty", "", 0, "configuration is empty"},
		{"comments only", "# nothing\n", 0, "configuration is empty"},
		{"not a mapping", "- a\n- b\n", 1, "must be a mapping"},
		{"syntax error", "hsm:\n  uri: [\n", 2, "dkimgw.yaml:2:"},
		{"unknown top-level key", minimal + "selector: x\n", 12, `unknown key "selector"`},
		{"unknown nested key", edit("  address:", "  adress: x\n  address:"), 4, `unknown key "adress" (did you mean address?)`},
		{"misspelt client key", edit("    domains: [example.com]", "    domain: [example.com]"), 8, `unknown key "domain" (did you mean domains?)`},
		{"misspelt upstream key", edit("  address:", "  max_idl: 3\n  address:"), 4, `unknown key "max_idl" (did you mean max_idle?)`},
		{"misspelt top-level key", minimal + "shutdown_grase: 1m\n", 12, `unknown key "shutdown_grase" (did you mean shutdown_grace?)`},
		{"duplicate key", edit("upstream:\n", "upstream:\n  timeout: 1m\n  timeout: 2m\n"), 5, "already defined"},
		{"second document", minimal + "---\nhsm: {}\n", 12, "second YAML document"},
		{"bad duration", edit("  address:", "  timeout: 5 minutes\n  address:"), 4, "duration"},
		{"bare number as duration", edit("  address:", "  timeout: 300\n  address:"), 4, "duration"},
		{"negative duration", edit("  address:", "  timeout: -5s\n  address:"), 4, "upstream.timeout must be a positive duration"},
		{"string for number", minimal + "smtp:\n  max_recipients: many\n", 13, "cannot unmarshal"},

		{"missing hsm uri", strings.Replace(minimal, "  uri: \"pkcs11:token=dkim\"\n", "  {}\n", 1), 1, "hsm.uri is required"},
		{"hsm uri not pkcs11", edit(`"pkcs11:token=dkim"`, `"/usr/lib/softhsm.so"`), 2, `starting with "pkcs11:"`},
		{"bad listen", minimal + "smtp:\n  listen: localhost\n", 13, "smtp.listen"},
		{"bad listen port", minimal + "smtp:\n  listen: 127.0.0.1:http\n", 13, "not a port number"},
		{"bad hostname", minimal + "smtp:\n  hostname: bad_host!\n", 13, "smtp.hostname"},
		{"tiny max_line_length", minimal + "smtp:\n  max_line_length: 80\n", 13, "at least 1000"},
		{"huge message size", minimal + "smtp:\n  max_message_bytes: 8589934592\n", 13, "max_message_bytes"},
		{"zero timeout", minimal + "smtp:\n  read_timeout: -1m\n", 13, "smtp.read_timeout must be a positive duration"},
		{"tls without key", minimal + "smtp:\n  tls: {cert_file: /etc/dkimgw/tls.crt}\n", 13, "both cert_file and key_file"},
		{"unreadable tls cert", minimal + "smtp:\n  tls:\n    cert_file: /nope.crt\n    key_file: /etc/dkimgw/tls.key\n", 14, "smtp.tls.cert_file: open /nope.crt"},
		{"tls key not matching", minimal + "smtp:\n  tls: {cert_file: /etc/dkimgw/tls.crt, key_file: /etc/dkimgw/tls.crt}\n", 13, "not a usable certificate and key"},

		{"missing upstream", strings.Replace(minimal, "  address: \"127.0.0.1:10026\"\n", "  timeout: 1m\n", 1), 3, "upstream.address is required"},
		{"upstream without port", edit(`"127.0.0.1:10026"`, `"127.0.0.1"`), 4, "upstream.address"},
		{"upstream port 0", edit(`"127.0.0.1:10026"`, `"127.0.0.1:0"`), 4, "not a port number"},
		{"unknown upstream tls", edit("  address:", "  tls: always\n  address:"), 4, `upstream.tls: unknown value "always"`},
		{"unreadable ca file", edit("  address:", "  tls_ca_file: /nope.pem\n  address:"), 4, "upstream.tls_ca_file"},
		{"ca file without certs", edit("  address:", "  tls_ca_file: /etc/dkimgw/plain.txt\n  address:"), 4, "holds no PEM certificate"},
		{"negative keepalive", edit("  address:", "  keepalive: -1s\n  address:"), 4, "upstream.keepalive must be a positive duration"},
		{"keepalive too frequent", edit("  address:", "  keepalive: 5s\n  address:"), 4, "upstream.keepalive 5s would send up to 120 NOOPs while one message arrives (smtp.data_timeout 10m0s)"},
		{"max_idle above max_connections", edit("  address:", "  max_connections: 2\n  max_idle: 3\n  address:"), 5, "upstream.max_idle"},

		{"unknown on_token_error", minimal + "on_token_error: ignore\n", 12, `on_token_error: unknown value "ignore"`},
		{"unknown on_unauthorized", minimal + "on_unauthorized: accept\n", 12, `on_unauthorized: unknown value "accept"`},
		{"unknown log format", minimal + "log: {format: xml}\n", 12, `log.format: unknown value "xml"`},
		{"unknown log level", minimal + "log: {level: loud}\n", 12, `log.level: unknown value "loud"`},
		{"negative spool memory", minimal + "spool: {memory_limit: -1}\n", 12, "spool.memory_limit"},
		{"negative spool memory total", minimal + "spool: {memory_total: -1}\n", 12, "spool.memory_total"},

		{"no clients", strings.Replace(minimal, "clients:\n  - name: campaigns\n    networks: [\"10.0.0.0/8\"]\n    domains: [example.com]\n", "clients: []\n", 1), 5, "at least one client"},
		{"client without name", edit("  - name: campaigns\n    networks:", "  - networks:"), 6, "name is required"},
		{"duplicate client name", withClient("  - name: campaigns\n    networks: [\"192.0.2.0/24\"]\n    domains: [example.com]\n"), 9, `client "campaigns" is defined twice`},
		{"client with neither networks nor users", withClient("  - name: lost\n    domains: [example.com]\n"), 9, `client "lost" has neither networks nor users`},
		{"client without domains", withClient("  - name: idle\n    networks: [\"192.0.2.0/24\"]\n"), 9, `client "idle" has no domains`},
		{"bad network", edit(`"10.0.0.0/8"`, `"10.0.0.0/33"`), 7, "not a CIDR prefix"},
		{"network with host bits", edit(`"10.0.0.0/8"`, `"10.1.2.3/8"`), 7, "did you mean 10.0.0.0/8"},
		{"garbage network", edit(`"10.0.0.0/8"`, `"ten"`), 7, "neither an address nor a CIDR prefix"},
		{"overlapping networks", withClient("  - name: other\n    networks: [\"192.0.2.0/24\", \"10.20.0.0/16\"]\n    domains: [example.com]\n"), 10, `overlaps 10.0.0.0/8 of client "campaigns" (line 7)`},
		{"overlapping single address", withClient("  - name: other\n    networks: [\"10.9.9.9\"]\n    domains: [example.com]\n"), 10, "overlaps"},
		{"same network twice in a client", edit(`["10.0.0.0/8"]`, `["10.0.0.0/8", "10.0.0.0/16"]`), 7, "overlaps"},
		{"every IPv4 address", edit(`"10.0.0.0/8"`, `"0.0.0.0/0"`), 7, "0.0.0.0/0 is every address: anyone could relay"},
		{"every IPv6 address", edit(`["10.0.0.0/8"]`, `["10.0.0.0/8", "::/0"]`), 7, "::/0 is every address"},
		{"require_auth without users", edit("    networks:", "    require_auth: true\n    networks:"), 7, "require_auth needs both users"},
		{"require_auth without smtp.tls", withClient("  - name: t\n    require_auth: true\n    networks: [\"0.0.0.0/0\"]\n    users: [{name: t, password_file: /etc/dkimgw/tenant-b.bcrypt}]\n    domains: [example.com]\n"), 10, "require_auth without smtp.tls"},
		{"require_auth without networks", withClient("  - name: t\n    require_auth: true\n    users: [{name: t, password_file: /etc/dkimgw/tenant-b.bcrypt}]\n    domains: [example.com]\n"), 10, "require_auth needs both users"},
		{"max_connections_per_ip zero", minimal + "smtp:\n  max_connections_per_ip: -1\n", 13, "smtp.max_connections_per_ip must be at least 1"},
		{"uncovered client domain", edit("domains: [example.com]", "domains: [example.com, example.net]"), 8, `domain "example.net" has no entry under domains:`},
		{"invalid client domain", edit("domains: [example.com]", "domains: [\"exa mple.com\"]"), 8, "not a valid domain name"},
		{"duplicate client domain", edit("domains: [example.com]", "domains: [example.com, Example.COM.]"), 8, "listed twice"},
		{"user without password_file", withClient("  - name: t\n    users: [{name: t}]\n    domains: [example.com]\n"), 10, `user "t" needs a password_file`},
		{"unreadable password_file", withClient("  - name: t\n    users: [{name: t, password_file: /etc/dkimgw/missing}]\n    domains: [example.com]\n"), 10, "/etc/dkimgw/missing: file does not exist"},
		{"password_file not bcrypt", withClient("  - name: t\n    users: [{name: t, password_file: /etc/dkimgw/plain.txt}]\n    domains: [example.com]\n"), 10, "does not hold a bcrypt hash"},
		{"duplicate user", withClient("  - name: t\n    users: [{name: u, password_file: /etc/dkimgw/tenant-b.bcrypt}]\n    domains: [example.com]\n  - name: t2\n    users: [{name: u, password_file: /etc/dkimgw/tenant-b.bcrypt}]\n    domains: [example.com]\n"), 13, `user "u" is already defined for client "t"`},

		{"no domains", strings.Replace(minimal, "domains:\n  example.com:\n    selectors: [rsa1]\n", "", 1), 1, "at least one signing domain"},
		{"domain without selectors", edit("    selectors: [rsa1]\n", "    expire: 24h\n"), 10, "selectors: at least one selector"},
		{"invalid selector", edit("[rsa1]", "[\"rsa 1\"]"), 11, `"rsa 1" is not a valid selector`},
		{"duplicate selector", edit("[rsa1]", "[rsa1, RSA1]"), 11, `"RSA1" is listed twice`},
		{"top-level domain", edit("domains:\n  example.com:", "domains:\n  com:\n    selectors: [a]\n  example.com:"), 10, "top-level domain"},
		{"duplicate domain after normalising", edit("domains:\n  example.com:", "domains:\n  Example.COM.:\n    selectors: [a]\n  example.com:"), 12, "listed twice"},
		{"expire too short", edit("    selectors: [rsa1]\n", "    selectors: [rsa1]\n    expire: 10m\n"), 12, "too short"},
		{"unknown domain key", edit("    selectors: [rsa1]\n", "    selectors: [rsa1]\n    algorithm: rsa\n"), 12, `unknown key "algorithm"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err == nil {
				t.Fatalf("Parse succeeded (%+v), want an error containing %q", cfg, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q\ndoes not contain %q", err, tt.want)
			}
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("error %q is not a *policy.Error", err)
			}
			// Find the error that carries the message, and check its line.
			found := false
			for _, e := range flatten(err) {
				if e, ok := e.(*Error); ok && strings.Contains(e.Error(), tt.want) {
					found = true
					if e.Line != tt.line {
						t.Errorf("line = %d, want %d (%q)", e.Line, tt.line, e)
					}
					if e.File != "dkimgw.yaml" {
						t.Errorf("file = %q", e.File)
					}
				}
			}
			if !found && !strings.Contains(tt.want, "dkimgw.yaml:") {
				t.Errorf("no single *Error holds %q: %v", tt.want, err)
			}
		})
	}
}

// TestUnknownKeyFarFromAny checks that a key like no known one gets no
// suggestion: a wrong "did you mean" misleads more than none.
func TestUnknownKeyFarFromAny(t *testing.T) {
	_, err := Parse("dkimgw.yaml", []byte(strings.Replace(minimal, "  address:", "  frobnicate: 3\n  address:", 1)), testFiles(t))
	if err == nil || !strings.Contains(err.Error(), `unknown key "frobnicate"`) || strings.Contains(err.Error(), "did you mean") {
		t.Errorf("error = %v; want unknown key without a suggestion", err)
	}
}

// TestLoadWithHSMURI checks that a file without hsm.uri takes the
// caller's (dkimgw: $DKIMGW_HSM), and that the file's own wins.
func TestLoadWithHSMURI(t *testing.T) {
	dir := t.TempDir()
	without := filepath.Join(dir, "without.yaml")
	os.WriteFile(without, []byte(strings.Replace(minimal, "hsm:\n  uri: \"pkcs11:token=dkim\"\n", "", 1)), 0o600)
	with := filepath.Join(dir, "with.yaml")
	os.WriteFile(with, []byte(minimal), 0o600)
	if _, err := Load(without); err == nil || !strings.Contains(err.Error(), "DKIMGW_HSM") {
		t.Errorf("Load without hsm.uri: %v; want an error naming DKIMGW_HSM", err)
	}
	cfg, err := LoadWith(without, LoadOptions{HSMURI: "pkcs11:token=from-env"})
	if err != nil || cfg.HSM.URI != "pkcs11:token=from-env" {
		t.Errorf("LoadWith without hsm.uri: %v, %v", cfg, err)
	}
	cfg, err = LoadWith(with, LoadOptions{HSMURI: "pkcs11:token=from-env"})
	if err != nil || cfg.HSM.URI != "pkcs11:token=dkim" {
		t.Errorf("LoadWith with hsm.uri: %v, %v", cfg, err)
	}
}

func flatten(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	return []error{err}
}

// TestParseReportsEveryError checks that an operator sees all problems at
// once, not one per `config check` run.
func TestParseReportsEveryError(t *testing.T) {
	bad := strings.NewReplacer(`"10.0.0.0/8"`, `"10.0.0.1/8"`, "[rsa1]", "[\"bad selector\"]").Replace(minimal) +
		"on_token_error: maybe\n"
	_, err := Parse("dkimgw.yaml", []byte(bad), testFiles(t))
	if err == nil {
		t.Fatal("Parse succeeded")
	}
	if n := len(flatten(err)); n != 3 {
		t.Errorf("got %d errors, want 3:\n%v", n, err)
	}
}

func TestLoadRelativePaths(t *testing.T) {
	dir := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "u.bcrypt"), hash, 0o600); err != nil {
		t.Fatal(err)
	}
	conf := `hsm: {uri: "pkcs11:token=dkim"}
upstream: {address: "127.0.0.1:10026"}
spool: {dir: spool}
clients:
  - name: t
    users: [{name: u, password_file: u.bcrypt}]
    domains: [example.com]
domains:
  example.com: {selectors: [rsa1]}
`
	path := filepath.Join(dir, "dkimgw.yaml")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v\n%s", err, conf)
	}
	if got, want := cfg.Spool.Dir, filepath.Join(dir, "spool"); got != want {
		t.Errorf("spool.dir = %q, want %q", got, want)
	}
	if cl, err := cfg.Authenticate("u", testPassword); err != nil || cl.Name != "t" {
		t.Errorf("Authenticate = %v, %v", cl, err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || !strings.Contains(err.Error(), "policy: read config") {
		t.Errorf("Load(missing) = %v", err)
	}
}

// TestCaptureUpstream checks upstream.address capture:DIR: the directory
// is made absolute against the configuration's, and must exist as a
// directory; a group-readable one is a warning.
func TestCaptureUpstream(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "cap"), 0o700)
	os.Mkdir(filepath.Join(dir, "open"), 0o700)
	os.Chmod(filepath.Join(dir, "open"), 0o755)
	os.WriteFile(filepath.Join(dir, "file"), nil, 0o600)
	load := func(addr string) (*Config, error) {
		t.Helper()
		path := filepath.Join(dir, "dkimgw.yaml")
		os.WriteFile(path, []byte(strings.Replace(minimal, `"127.0.0.1:10026"`, `"`+addr+`"`, 1)), 0o600)
		return Load(path)
	}
	cfg, err := load("capture:cap")
	if err != nil {
		t.Fatalf("capture:cap: %v", err)
	}
	if got, want := cfg.Upstream.CaptureDir(), filepath.Join(dir, "cap"); got != want || cfg.Upstream.Address != "capture:"+want {
		t.Errorf("CaptureDir() = %q, address %q; want %q", got, cfg.Upstream.Address, want)
	}
	if w := strings.Join(cfg.Warnings, "\n"); strings.Contains(w, "capture") {
		t.Errorf("warning for a 0700 directory: %v", w)
	}
	if cfg, err := load("capture:open"); err != nil || !strings.Contains(strings.Join(cfg.Warnings, "\n"), "(mode 0755): captured messages are readable there; chmod 700") {
		t.Errorf("capture:open: %v; want a warning saying chmod 700", err)
	}
	for addr, want := range map[string]string{
		"capture:":        "needs a directory",
		"capture:missing": "mkdir -m 700 " + filepath.Join(dir, "missing"),
		"capture:file":    "is not a directory",
	} {
		if _, err := load(addr); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want an error saying %q", addr, err, want)
		}
	}
	if cfg, err := load("127.0.0.1:25"); err != nil || cfg.Upstream.CaptureDir() != "" {
		t.Errorf("a host:port upstream: %v, capture dir %q", err, cfg.Upstream.CaptureDir())
	}
}
