package policy

import (
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Milter defaults. Postfix gives a milter milter_connect_timeout (30s)
// to accept, milter_command_timeout (30s) to answer each command and
// milter_content_timeout (300s) to answer each piece of the message and
// the end of it; past them it applies milter_default_action to the
// message. dkimgw answers within shorter bounds, so that it is dkimgw's
// own answer (a 451 for a token that does not answer) that the client
// gets, never Postfix's guess.
const (
	// DefaultMilterSignTimeout bounds signing at end-of-message (the
	// token calls): below milter_command_timeout's 30s, which sendmail's
	// default for the end of message (T:E 5m) also exceeds.
	DefaultMilterSignTimeout = 20 * time.Second
	// DefaultMilterWriteTimeout bounds writing one reply to the MTA.
	DefaultMilterWriteTimeout = 10 * time.Second
	// DefaultMilterReadTimeout is how long a milter connection may stay
	// silent: the MTA passes each SMTP command on as its client sends it,
	// and a client may be silent for smtpd_timeout (300s) between two, so
	// the milter waits longer than that before it gives up on the MTA.
	DefaultMilterReadTimeout = 10 * time.Minute
	// DefaultMilterMaxConnections bounds the MTA connections served at
	// once, and so the milter's memory (each holds at most a header
	// section, spool.max_header_bytes, and one body chunk). Postfix opens
	// one per smtpd process (default_process_limit 100).
	DefaultMilterMaxConnections = 1000
	// DefaultMilterSocketMode lets the socket's owner and group (the
	// MTA's, with socket_group) connect, nobody else.
	DefaultMilterSocketMode = "0660"
)

// Milter is the milter listener (dkimgw milter, or serve with
// milter.listen set): Postfix and Sendmail pass their mail through it
// and it adds DKIM-Signature fields, with the same clients, domains and
// keys as the relay.
type Milter struct {
	// Listen is "inet:HOST:PORT" or "unix:/path/to/socket" (the forms
	// Postfix's smtpd_milters and Sendmail's X= take). Empty: no milter;
	// `dkimgw milter` then refuses to start.
	Listen string `yaml:"listen"`
	// SocketMode is the unix socket's permission bits, in octal. Default
	// "0660".
	SocketMode string `yaml:"socket_mode"`
	// SocketGroup is the group (name or number) the unix socket is given,
	// e.g. postfix. Empty: the process's group.
	SocketGroup string `yaml:"socket_group"`
	// OnUnauthorized says what happens to a message whose From domain has
	// keys here but whose client (by {client_addr}, or {auth_authen}) the
	// clients table does not allow that domain: accept (default: it
	// passes unsigned and untouched), reject (550 5.7.1) or tempfail
	// (451 4.7.1). Mail From a domain without keys always passes
	// untouched: a milter on an MX sees everybody's mail.
	OnUnauthorized MilterAction `yaml:"on_unauthorized"`
	// OnTokenError says what happens when the key cannot be used:
	// tempfail (default: 451 4.7.0 through the MTA, which keeps the
	// message) or accept (it passes unsigned).
	OnTokenError MilterAction `yaml:"on_token_error"`
	// SignTimeout bounds signing at end-of-message. Default 20s.
	SignTimeout time.Duration `yaml:"sign_timeout"`
	// ReadTimeout is how long the MTA's connection may stay silent.
	// Default 10m.
	ReadTimeout time.Duration `yaml:"read_timeout"`
	// WriteTimeout bounds writing one reply to the MTA. Default 10s.
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// MaxConnections is the most MTA connections served at once; more
	// wait to be accepted (the MTA's connect timeout, then its
	// milter_default_action, applies). Default 1000.
	MaxConnections int `yaml:"max_connections"`

	mode uint32
}

// MilterAction is the milter's answer to a message it does not sign.
type MilterAction string

const (
	// MilterAccept lets the message pass unsigned and unchanged.
	MilterAccept MilterAction = "accept"
	// MilterReject refuses it (5xx).
	MilterReject MilterAction = "reject"
	// MilterTempfail refuses it for now (4xx): the client keeps it.
	MilterTempfail MilterAction = "tempfail"
)

// Network returns the network ("tcp" or "unix") and address to listen on
// for m.Listen, which validation has checked.
func (m *Milter) Network() (network, address string) {
	kind, addr, _ := strings.Cut(m.Listen, ":")
	if kind == "inet" {
		return "tcp", addr
	}
	return "unix", addr
}

// Mode returns SocketMode as permission bits.
func (m *Milter) Mode() uint32 { return m.mode }

func (c *Config) applyMilterDefaults() {
	m := &c.Milter
	setDefault(&m.SocketMode, DefaultMilterSocketMode)
	setDefault(&m.OnUnauthorized, MilterAccept)
	setDefault(&m.OnTokenError, MilterTempfail)
	setDefault(&m.SignTimeout, DefaultMilterSignTimeout)
	setDefault(&m.ReadTimeout, DefaultMilterReadTimeout)
	setDefault(&m.WriteTimeout, DefaultMilterWriteTimeout)
	setDefault(&m.MaxConnections, DefaultMilterMaxConnections)
}

func (v *validator) validateMilter(c *Config) {
	m := &c.Milter
	if m.Listen != "" {
		kind, addr, _ := strings.Cut(m.Listen, ":")
		switch kind {
		case "inet":
			v.hostPort(at("milter", "listen"), "milter.listen", addr, true)
		case "unix", "local":
			if !filepath.IsAbs(addr) {
				v.errorf(at("milter", "listen"), "milter.listen %q: a unix socket needs an absolute path (unix:/run/dkimgw/milter.sock)", m.Listen)
			}
			m.Listen = "unix:" + addr
		default:
			v.errorf(at("milter", "listen"), "milter.listen %q: want inet:HOST:PORT or unix:/path", m.Listen)
		}
	}
	mode, err := strconv.ParseUint(m.SocketMode, 8, 32)
	if err != nil || mode > 0o777 {
		v.errorf(at("milter", "socket_mode"), "milter.socket_mode %q: want permission bits in octal, like 0660", m.SocketMode)
	}
	m.mode = uint32(mode)
	switch m.OnUnauthorized {
	case MilterAccept, MilterReject, MilterTempfail:
	default:
		v.errorf(at("milter", "on_unauthorized"), "milter.on_unauthorized: unknown value %q (want accept, reject or tempfail)", m.OnUnauthorized)
	}
	switch m.OnTokenError {
	case MilterAccept, MilterTempfail:
	default:
		v.errorf(at("milter", "on_token_error"), "milter.on_token_error: unknown value %q (want tempfail or accept)", m.OnTokenError)
	}
	v.positive(at("milter", "sign_timeout"), "milter.sign_timeout", m.SignTimeout)
	v.positive(at("milter", "read_timeout"), "milter.read_timeout", m.ReadTimeout)
	v.positive(at("milter", "write_timeout"), "milter.write_timeout", m.WriteTimeout)
	if m.MaxConnections < 1 {
		v.errorf(at("milter", "max_connections"), "milter.max_connections must be at least 1, not %d", m.MaxConnections)
	}
	if m.SignTimeout >= 30*time.Second {
		v.warnf(at("milter", "sign_timeout"), "milter.sign_timeout %s is not below Postfix's milter_command_timeout default (30s): Postfix may give up first and apply milter_default_action", m.SignTimeout)
	}
}
