package policy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Defaults. Each applies when its key is absent (or zero).
const (
	// DefaultListen keeps a fresh install off the network until the
	// operator says otherwise.
	DefaultListen = "127.0.0.1:10025"
	// DefaultMaxMessageBytes is 50 MiB: campaign mail is rarely larger, and
	// most receivers refuse more than that anyway.
	DefaultMaxMessageBytes = 50 << 20
	// DefaultMaxRecipients matches Postfix's smtpd_recipient_limit and is
	// ten times the 100 that RFC 5321 section 4.5.3.1.8 requires.
	DefaultMaxRecipients = 1000
	// DefaultMaxLineLength bounds one command or message line. RFC 5321
	// section 4.5.3.1.6 requires 1000 octets; mail in the wild has longer
	// lines, so we allow four times as much and no more.
	DefaultMaxLineLength = 4096
	// DefaultMaxConnections bounds concurrent client connections (each
	// costs a goroutine, buffers and, in a transaction, an upstream
	// connection).
	DefaultMaxConnections = 1000
	// DefaultReadTimeout is RFC 5321 section 4.5.3.2.7's server timeout:
	// how long a client may stay silent between commands or DATA chunks.
	DefaultReadTimeout = 5 * time.Minute
	// DefaultWriteTimeout bounds writing one reply to a client that does
	// not read.
	DefaultWriteTimeout = time.Minute
	// DefaultDataTimeout bounds a whole DATA transfer, however steadily the
	// client trickles bytes (RFC 5321 section 4.5.3.2.6 gives 10 minutes
	// for the client side of the same wait).
	DefaultDataTimeout = 10 * time.Minute
	// DefaultMaxSessionDuration bounds a connection's life: after it, the
	// current transaction finishes and the connection is closed, so no
	// client holds resources (or an old configuration) forever.
	DefaultMaxSessionDuration = time.Hour
	// DefaultMaxConnectionsPerIP bounds one source's share of
	// max_connections, so that one host cannot lock the others out. A busy
	// MTA opens tens of connections; 100 leaves it room.
	DefaultMaxConnectionsPerIP = 100
	// DefaultMaxAuthFailures is how many failed AUTH attempts a connection
	// gets before it is closed, to slow password guessing.
	DefaultMaxAuthFailures = 3

	// DefaultUpstreamTimeout is RFC 5321's 5 minutes for each upstream
	// reply, including the reply to the final dot.
	DefaultUpstreamTimeout = 5 * time.Minute
	// DefaultUpstreamConnectTimeout bounds connecting to the upstream and
	// reading its greeting.
	DefaultUpstreamConnectTimeout = 30 * time.Second
	// DefaultUpstreamIdleTimeout is how long an idle pooled upstream
	// connection is kept; it is below Postfix's smtpd_timeout (300s), so
	// the upstream rarely closes a connection under us.
	DefaultUpstreamIdleTimeout = 60 * time.Second
	// DefaultUpstreamKeepalive is how often dkimgw sends NOOP on the
	// upstream connection of a transaction while its client sends the
	// message: the upstream would otherwise see a silent client for as long
	// as the upload (up to smtp.data_timeout) and drop it. A minute is far
	// below Postfix's smtpd_timeout (300s, RFC 5321's 5 minutes), and makes
	// at most 10 NOOPs in the default data_timeout: Postfix counts NOOP as a
	// junk command and drops a client after about 120 of them without a
	// delivered message.
	DefaultUpstreamKeepalive = time.Minute
	// MaxKeepalivesPerMessage bounds smtp.data_timeout/upstream.keepalive,
	// the NOOPs one message can cost: half of the 100 junk commands
	// Postfix allows between two delivered messages.
	MaxKeepalivesPerMessage = 50
	// DefaultUpstreamMaxIdle is how many idle upstream connections the pool
	// keeps for reuse.
	DefaultUpstreamMaxIdle = 32

	// DefaultSpoolMemoryLimit is how much of one message is held in memory
	// before the spool moves to a temporary file.
	DefaultSpoolMemoryLimit = 1 << 20
	// DefaultSpoolMemoryTotal bounds the spool memory of all messages
	// together: without it, max_connections messages could each hold
	// memory_limit (1,000 × 1 MiB by default).
	DefaultSpoolMemoryTotal = 256 << 20
	// DefaultSpoolMaxHeaderBytes bounds a message's header section, which
	// is parsed in memory.
	DefaultSpoolMaxHeaderBytes = 1 << 20

	// DefaultShutdownGrace is how long SIGTERM waits for transactions in
	// flight before closing their connections.
	DefaultShutdownGrace = 30 * time.Second

	// maxConfigBytes bounds the configuration file: a config is small, and
	// a huge file is a mistake (or an attack on the YAML decoder).
	maxConfigBytes = 4 << 20
)

// Config is a whole, validated dkimgw configuration. Obtain one with [Load]
// or [Parse]; a *Config is never modified afterwards.
type Config struct {
	HSM      HSM      `yaml:"hsm"`
	SMTP     SMTP     `yaml:"smtp"`
	Upstream Upstream `yaml:"upstream"`
	Spool    Spool    `yaml:"spool"`
	Log      Log      `yaml:"log"`
	// Clients are the MTAs that may relay, and the From domains each may
	// have signed. At least one is required.
	Clients []Client `yaml:"clients"`
	// Domains maps a signing domain (d=) to the token keys that sign its
	// mail. Keys are normalised to lower case without a trailing dot.
	Domains map[string]Domain `yaml:"domains"`
	// OnTokenError says what happens to a message when its key cannot be
	// used (token unreachable, session lost, key missing). Default
	// tempfail: 451 4.7.0, the sender keeps and retries the message.
	OnTokenError TokenErrorAction `yaml:"on_token_error"`
	// OnUnauthorized says what happens to a message whose From domain the
	// client may not have signed. Default reject: 550 5.7.1.
	OnUnauthorized UnauthorizedAction `yaml:"on_unauthorized"`
	// ShutdownGrace bounds the wait for transactions in flight on SIGTERM.
	// Default 30s.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`
	// DNS is where rotated keys are published and checked.
	DNS DNS `yaml:"dns"`
	// Rotation holds the reconciler's settings.
	Rotation RotationSettings `yaml:"rotation"`
	// DataDir holds the rotation state (rotation.db) and the manual
	// publisher's files. Default /var/lib/dkimgw.
	DataDir string `yaml:"data_dir"`
	// State is where the rotation state lives: bbolt in DataDir (one
	// gateway, the default) or etcd (several gateways).
	State State `yaml:"state"`
	// Admin is the HTTP listener of /metrics, /healthz and /readyz.
	Admin Admin `yaml:"admin"`
	// Audit is the audit log.
	Audit Audit `yaml:"audit"`
	// Milter is the milter listener (docs/milter.md).
	Milter Milter `yaml:"milter"`

	// Path is the file the configuration was read from (the name given
	// to Parse).
	Path string `yaml:"-"`
	// Warnings are things that validate but that an operator should look
	// at (a client network so wide that much of the Internet may relay),
	// each as "file:line: what and why".
	Warnings []string `yaml:"-"`

	prefixes  []clientPrefix // the networks that recognise a client by address, for ClientByAddr
	users     map[string]*User
	dummyHash func() []byte // see Authenticate
}

// HSM addresses the PKCS#11 token that holds the signing keys.
type HSM struct {
	// URI is an RFC 7512 PKCS#11 URI, e.g.
	// "pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin".
	// Required. It may hold a PIN: never log it.
	URI string `yaml:"uri"`
}

// SMTP is the listening side: what the relaying MTAs talk to.
type SMTP struct {
	// Listen is the host:port to accept connections on. Default
	// 127.0.0.1:10025.
	Listen string `yaml:"listen"`
	// Hostname is the name in the greeting and the EHLO reply, and the
	// name dkimgw gives the upstream in its own EHLO. Empty: the
	// machine's host name.
	Hostname string `yaml:"hostname"`
	// MaxMessageBytes is the largest message accepted (advertised with
	// SIZE); larger ones get 552 5.3.4. Default 50 MiB.
	MaxMessageBytes int64 `yaml:"max_message_bytes"`
	// MaxRecipients is the most RCPT TO accepted per transaction; more get
	// 452 4.5.3. Default 1000.
	MaxRecipients int `yaml:"max_recipients"`
	// MaxLineLength is the longest command or message line accepted, in
	// bytes. Default 4096; at least 1000 (RFC 5321 section 4.5.3.1.6).
	MaxLineLength int `yaml:"max_line_length"`
	// MaxConnections is the most concurrent client connections; more get
	// 421 4.3.2 and are closed. Default 1000.
	MaxConnections int `yaml:"max_connections"`
	// MaxConnectionsPerIP is the most concurrent connections from one
	// source address (one /64 for IPv6); more get 421 4.7.0 and are
	// closed. Default 100.
	MaxConnectionsPerIP int `yaml:"max_connections_per_ip"`
	// ReadTimeout is how long a client may be silent while a command or
	// DATA is expected. Default 5m.
	ReadTimeout time.Duration `yaml:"read_timeout"`
	// WriteTimeout bounds writing one reply. Default 1m.
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// DataTimeout bounds a whole DATA (or BDAT) transfer. Default 10m.
	DataTimeout time.Duration `yaml:"data_timeout"`
	// MaxSessionDuration bounds a connection's life; the transaction in
	// flight then gets at most DataTimeout more to finish, and the
	// connection is closed. Default 1h.
	MaxSessionDuration time.Duration `yaml:"max_session_duration"`
	// MaxAuthFailures is how many failed AUTH attempts close a
	// connection. Default 3.
	MaxAuthFailures int `yaml:"max_auth_failures"`
	// TLS enables STARTTLS (and with it AUTH) when set.
	TLS *TLS `yaml:"tls"`
}

// TLS is a certificate and key in PEM files. Relative paths are relative
// to the configuration file's directory.
type TLS struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`

	cert *tls.Certificate
}

// Certificate returns the certificate read and checked when the
// configuration was loaded, so a reload swaps it atomically with the rest.
func (t *TLS) Certificate() *tls.Certificate { return t.cert }

// Upstream is the MTA that receives signed mail.
type Upstream struct {
	// Address is the upstream's host:port. Required. "capture:DIR"
	// instead stores each signed message as a file in the directory DIR
	// (relative to the configuration's directory) and delivers nothing:
	// for staging and demonstrations. Validation makes DIR absolute.
	Address string `yaml:"address"`
	// TLS is none (default), opportunistic (STARTTLS when offered, the
	// certificate not checked, as RFC 7435 allows) or required (STARTTLS
	// or a 4xx, the certificate checked against TLSServerName and TLSCAFile).
	TLS UpstreamTLS `yaml:"tls"`
	// TLSServerName is the name the upstream's certificate must carry
	// with tls: required. Empty: the host part of Address.
	TLSServerName string `yaml:"tls_server_name"`
	// TLSCAFile holds the PEM CA certificates that sign the upstream's
	// certificate. Empty: the system roots.
	TLSCAFile string `yaml:"tls_ca_file"`
	// Timeout bounds each upstream reply, including the reply to the
	// final dot. Default 5m.
	Timeout time.Duration `yaml:"timeout"`
	// ConnectTimeout bounds connecting and reading the greeting. Default 30s.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// IdleTimeout is how long an idle pooled connection is kept. Default 60s.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// Keepalive is how often a NOOP goes upstream while the client sends
	// the message, so that the upstream does not drop the connection as
	// idle (Postfix: smtpd_timeout). It must be below the upstream's idle
	// limit, and at least smtp.data_timeout/50: upstreams limit NOOPs
	// (Postfix drops a client after about 120 without a delivered
	// message). Default 1m.
	Keepalive time.Duration `yaml:"keepalive"`
	// MaxConnections bounds open upstream connections; a transaction that
	// finds none free waits until ConnectTimeout, then gets 451 4.4.5.
	// Default smtp.max_connections (one per client connection).
	MaxConnections int `yaml:"max_connections"`
	// MaxIdle is how many idle connections are kept for reuse. Default 32
	// (or upstream.max_connections if smaller).
	MaxIdle int `yaml:"max_idle"`

	roots *x509.CertPool
}

// CapturePrefix starts an upstream.address that captures messages into a
// directory instead of relaying them.
const CapturePrefix = "capture:"

// CaptureDir returns the absolute directory of a capture: upstream, or ""
// for a real one.
func (u *Upstream) CaptureDir() string {
	dir, _ := strings.CutPrefix(u.Address, CapturePrefix)
	if dir == u.Address {
		return ""
	}
	return dir
}

// RootCAs returns the CA pool read from TLSCAFile, or nil for the system
// roots.
func (u *Upstream) RootCAs() *x509.CertPool { return u.roots }

// Spool is where DATA waits while it is signed.
type Spool struct {
	// Dir holds the temporary files of messages larger than MemoryLimit.
	// Empty: the system's temporary directory ($TMPDIR).
	Dir string `yaml:"dir"`
	// MemoryLimit is how much of one message stays in memory. Default 1 MiB.
	MemoryLimit int64 `yaml:"memory_limit"`
	// MemoryTotal bounds the memory all messages in the spool hold
	// together; past it, a message goes to its temporary file at once.
	// Default 256 MiB.
	MemoryTotal int64 `yaml:"memory_total"`
	// MaxHeaderBytes bounds a message's header section; a larger one is
	// refused as malformed. Default 1 MiB.
	MaxHeaderBytes int `yaml:"max_header_bytes"`
}

// Log is the format and level of dkimgw's own log.
type Log struct {
	// Format is text (default) or json.
	Format string `yaml:"format"`
	// Level is debug, info (default), warn or error.
	Level string `yaml:"level"`
}

// SlogLevel returns Level as a slog.Level.
func (l Log) SlogLevel() slog.Level {
	switch l.Level {
	case "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}

// Client is one MTA (or group of them) that may relay through dkimgw.
type Client struct {
	// Name identifies the client in logs. Required and unique.
	Name string `yaml:"name"`
	// Networks are the source addresses (CIDR prefixes or single
	// addresses) the client is recognised by. No two clients' networks
	// may overlap (networks of RequireAuth clients excepted). 0.0.0.0/0
	// and ::/0 need RequireAuth.
	Networks []string `yaml:"networks"`
	// Users are the SMTP AUTH identities the client is recognised by
	// (only over TLS). A client needs networks, users or both.
	Users []User `yaml:"users"`
	// RequireAuth makes the client recognised only by SMTP AUTH, and only
	// from within its Networks: its source address alone lets nobody
	// relay. Needs users, networks and smtp.tls. Default false: the client is
	// recognised by its address, and its users may log in from anywhere.
	RequireAuth bool `yaml:"require_auth"`
	// Domains are the From domains (and their subdomains) whose mail the
	// client may have signed. Each must be covered by an entry under the
	// top-level domains key.
	Domains []string `yaml:"domains"`

	prefixes []netip.Prefix
}

// User is one SMTP AUTH login.
type User struct {
	// Name is the login name. Required and unique across all clients.
	Name string `yaml:"name"`
	// PasswordFile holds the password's bcrypt hash (as made by
	// `htpasswd -nB` without the "name:" part, or any bcrypt tool).
	PasswordFile string `yaml:"password_file"`

	hash   []byte
	client *Client
}

// Domain is how the mail of one signing domain is signed.
type Domain struct {
	// Selectors name the token keys (selector._domainkey.domain) that
	// sign the domain's mail: one DKIM-Signature each, in this order.
	// At least one, unless the domain has Rotation (then none).
	Selectors []string `yaml:"selectors"`
	// Expire sets x= to the signing time plus Expire. Zero: no x=.
	Expire time.Duration `yaml:"expire"`
	// Rotation, instead of Selectors, has dkimgw generate, publish and
	// rotate the domain's keys; it signs with the active ones.
	Rotation *Rotation `yaml:"rotation"`
}

// TokenErrorAction is what happens to a message that cannot be signed
// because of its key.
type TokenErrorAction string

const (
	// TokenErrorTempfail answers 451 4.7.0; the sender retries later.
	TokenErrorTempfail TokenErrorAction = "tempfail"
	// TokenErrorRelayUnsigned relays the message without a signature.
	TokenErrorRelayUnsigned TokenErrorAction = "relay-unsigned"
)

// UnauthorizedAction is what happens to a message whose From domain the
// client may not have signed.
type UnauthorizedAction string

const (
	// UnauthorizedReject answers 550 5.7.1 naming the domain.
	UnauthorizedReject UnauthorizedAction = "reject"
	// UnauthorizedRelayUnsigned relays the message without a signature.
	UnauthorizedRelayUnsigned UnauthorizedAction = "relay-unsigned"
)

// UpstreamTLS is the upstream connection's TLS mode.
type UpstreamTLS string

const (
	UpstreamTLSNone          UpstreamTLS = "none"
	UpstreamTLSOpportunistic UpstreamTLS = "opportunistic"
	UpstreamTLSRequired      UpstreamTLS = "required"
)

// Load reads, decodes, defaults and validates the configuration file at
// path. Relative paths inside it are relative to its directory. Every
// problem found is reported, each as an *[Error] naming path and line,
// joined with errors.Join.
func Load(path string) (*Config, error) {
	return LoadWith(path, LoadOptions{})
}

// LoadOptions are what a configuration file may leave to its caller.
type LoadOptions struct {
	// HSMURI is the token URI used when the file has no hsm.uri (dkimgw
	// takes it from $DKIMGW_HSM, as its other commands do). Empty: hsm.uri
	// is required.
	HSMURI string
}

// LoadWith is [Load] with options.
func LoadWith(path string, opts LoadOptions) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("policy: read config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return nil, fmt.Errorf("policy: read config %s: %w", path, err)
	}
	if len(data) > maxConfigBytes {
		return nil, fmt.Errorf("policy: config %s is larger than %d bytes", path, maxConfigBytes)
	}
	return parse(path, data, nil, opts)
}

// Parse decodes, defaults and validates a configuration read from the
// file called name. readFile reads the files the configuration names
// (password, TLS and CA files), relative names being joined to name's
// directory first; nil means os.ReadFile.
func Parse(name string, data []byte, readFile func(name string) ([]byte, error)) (*Config, error) {
	return parse(name, data, readFile, LoadOptions{})
}

func parse(name string, data []byte, readFile func(name string) ([]byte, error), opts LoadOptions) (*Config, error) {
	if readFile == nil {
		readFile = os.ReadFile
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, yamlErrors(name, err)
	}
	if root.Kind == 0 || len(root.Content) == 0 {
		return nil, &Error{File: name, Msg: "the configuration is empty"}
	}
	if root.Content[0].Kind != yaml.MappingNode {
		return nil, &Error{File: name, Line: root.Content[0].Line, Msg: "the configuration must be a mapping of keys (hsm, smtp, upstream, clients, domains, ...)"}
	}

	cfg := &Config{Path: name}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil {
		return nil, yamlErrors(name, err)
	}
	// A second document would be silently ignored: refuse it.
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, &Error{File: name, Line: extra.Line, Msg: "a second YAML document (after ---) is not allowed"}
	}

	cfg.Path = name
	if cfg.HSM.URI == "" {
		cfg.HSM.URI = opts.HSMURI
	}
	cfg.applyDefaults()
	v := &validator{file: name, loc: locator{root: root.Content[0]}, dir: filepath.Dir(name), readFile: readFile}
	v.validate(cfg)
	if len(v.errs) > 0 {
		return nil, errors.Join(v.errs...)
	}
	cfg.Warnings = v.warnings
	return cfg, nil
}

func (c *Config) applyDefaults() {
	s := &c.SMTP
	setDefault(&s.Listen, DefaultListen)
	setDefault(&s.MaxMessageBytes, DefaultMaxMessageBytes)
	setDefault(&s.MaxRecipients, DefaultMaxRecipients)
	setDefault(&s.MaxLineLength, DefaultMaxLineLength)
	setDefault(&s.MaxConnections, DefaultMaxConnections)
	setDefault(&s.MaxConnectionsPerIP, DefaultMaxConnectionsPerIP)
	setDefault(&s.ReadTimeout, DefaultReadTimeout)
	setDefault(&s.WriteTimeout, DefaultWriteTimeout)
	setDefault(&s.DataTimeout, DefaultDataTimeout)
	setDefault(&s.MaxSessionDuration, DefaultMaxSessionDuration)
	setDefault(&s.MaxAuthFailures, DefaultMaxAuthFailures)

	u := &c.Upstream
	setDefault(&u.TLS, UpstreamTLSNone)
	setDefault(&u.Timeout, DefaultUpstreamTimeout)
	setDefault(&u.ConnectTimeout, DefaultUpstreamConnectTimeout)
	setDefault(&u.IdleTimeout, DefaultUpstreamIdleTimeout)
	setDefault(&u.Keepalive, DefaultUpstreamKeepalive)
	setDefault(&u.MaxConnections, s.MaxConnections)
	setDefault(&u.MaxIdle, min(DefaultUpstreamMaxIdle, u.MaxConnections))

	setDefault(&c.Spool.MemoryLimit, DefaultSpoolMemoryLimit)
	setDefault(&c.Spool.MemoryTotal, DefaultSpoolMemoryTotal)
	setDefault(&c.Spool.MaxHeaderBytes, DefaultSpoolMaxHeaderBytes)
	setDefault(&c.Log.Format, "text")
	setDefault(&c.Log.Level, "info")
	setDefault(&c.OnTokenError, TokenErrorTempfail)
	setDefault(&c.OnUnauthorized, UnauthorizedReject)
	setDefault(&c.ShutdownGrace, DefaultShutdownGrace)
	c.applyRotationDefaults()
	c.applyAdminDefaults()
	c.applyMilterDefaults()
}

func setDefault[T comparable](p *T, v T) {
	var zero T
	if *p == zero {
		*p = v
	}
}

// Error is one problem in a configuration file. Line is 0 when the
// problem has no single place (a missing key, for instance).
type Error struct {
	File string
	Line int
	Msg  string
}

func (e *Error) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Msg)
}

var (
	yamlLineRe    = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)
	yamlUnknownRe = regexp.MustCompile(`^field (\S+) not found in type (\S+)$`)
)

// yamlErrors turns the decoder's errors into *Error values, one per
// problem, with the Go type names of the messages replaced by what an
// operator wrote.
func yamlErrors(file string, err error) error {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	errs := make([]error, 0, len(msgs))
	for _, m := range msgs {
		e := &Error{File: file, Msg: strings.TrimPrefix(m, "yaml: ")}
		if sm := yamlLineRe.FindStringSubmatch(m); sm != nil {
			e.Line, _ = strconv.Atoi(sm[1])
			e.Msg = sm[2]
		}
		if sm := yamlUnknownRe.FindStringSubmatch(e.Msg); sm != nil {
			e.Msg = fmt.Sprintf("unknown key %q", sm[1])
			if near := nearestKey(sm[1], sm[2]); near != "" {
				e.Msg += fmt.Sprintf(" (did you mean %s?)", near)
			}
		}
		e.Msg = strings.NewReplacer(
			"into time.Duration", "into a duration (write it like 90s, 5m or 120h)",
			"into Duration", "into a duration (write it like 90d, 12h, 30m or 3600)",
			"policy.", "",
		).Replace(e.Msg)
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

// locator finds the line of a key in the decoded YAML tree, so that
// validation errors point at what the operator wrote.
type locator struct{ root *yaml.Node }

// line returns the line of the node at path (mapping keys as strings,
// sequence indexes as ints); when the path does not exist (a key left
// out), the line of its deepest existing ancestor.
func (l locator) line(path ...any) int {
	n := l.root
	if n == nil {
		return 0
	}
	line := n.Line
	for _, p := range path {
		var next *yaml.Node
		switch p := p.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == p {
						line = n.Content[i].Line
						next = n.Content[i+1]
						break
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && p < len(n.Content) {
				next = n.Content[p]
				line = next.Line
			}
		}
		if next == nil {
			return line
		}
		n = next
	}
	return line
}
