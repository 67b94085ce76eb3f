package policy

import (
	"net/url"
	"strings"
	"time"
)

// State store types.
const (
	// StateBbolt keeps the rotation state in data_dir/rotation.db: one
	// gateway (the default).
	StateBbolt = "bbolt"
	// StateEtcd keeps it in an etcd cluster shared by several gateways.
	StateEtcd = "etcd"
)

// Defaults of the etcd state store.
const (
	// DefaultStatePrefix is where the gateways' keys live in etcd.
	DefaultStatePrefix = "/dkimgw/"
	// DefaultStateDialTimeout bounds connecting to etcd.
	DefaultStateDialTimeout = 5 * time.Second
	// DefaultStateLeaseTTL is how long a dead leader (or lock holder)
	// keeps its place before another gateway takes over.
	DefaultStateLeaseTTL = 10 * time.Second
)

// State says where the rotation state lives.
type State struct {
	// Type is bbolt (default: data_dir/rotation.db, one gateway) or etcd
	// (several gateways share the key lifecycle).
	Type string `yaml:"type"`
	// Endpoints are the etcd members' client URLs (http:// or https://).
	// Required with type etcd.
	Endpoints []string `yaml:"endpoints"`
	// Prefix is prepended to every etcd key dkimgw uses. Default /dkimgw/.
	Prefix string `yaml:"prefix"`
	// TLS configures the connection to etcd (https:// endpoints).
	TLS StateTLS `yaml:"tls"`
	// Username and PasswordFile authenticate to etcd. The file holds the
	// password on its first line and must not be readable by group or
	// others (chmod 600), like the PIN file. Relative to the
	// configuration file's directory.
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
	// DialTimeout bounds connecting to etcd. Default 5s.
	DialTimeout Duration `yaml:"dial_timeout"`
	// LeaseTTL is the lease of the reconciler's leader and of the state
	// lock: how long after a gateway dies (or loses etcd) another takes
	// over its work. Whole seconds, at least 2. Default 10s.
	LeaseTTL Duration `yaml:"lease_ttl"`
}

// StateTLS are PEM files for etcd's TLS; relative to the configuration
// file's directory.
type StateTLS struct {
	// CA verifies the members' certificates. Empty: the system's roots.
	CA string `yaml:"ca"`
	// Cert and Key are the client certificate (both or neither).
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

func (v *validator) validateState(c *Config) {
	s := &c.State
	setDefault(&s.Type, StateBbolt)
	switch s.Type {
	case StateBbolt:
		if len(s.Endpoints) > 0 || s.Prefix != "" || s.TLS != (StateTLS{}) || s.Username != "" || s.PasswordFile != "" || s.DialTimeout != 0 || s.LeaseTTL != 0 {
			v.errorf(at("state"), "state: endpoints, prefix, tls, username, password_file, dial_timeout and lease_ttl are for type etcd only")
		}
		return
	case StateEtcd:
	default:
		v.errorf(at("state", "type"), "state.type: unknown value %q (want bbolt or etcd)", s.Type)
		return
	}
	if len(s.Endpoints) == 0 {
		v.errorf(at("state"), "state.endpoints is required with type etcd (the client URLs of the etcd members, http://host:2379)")
	}
	for i, ep := range s.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			v.errorf(at("state", "endpoints", i), "state.endpoints: %q is not an etcd client URL (want http://host:port or https://host:port)", ep)
		}
	}
	setDefault(&s.Prefix, DefaultStatePrefix)
	if !strings.HasPrefix(s.Prefix, "/") || strings.ContainsAny(s.Prefix, "\x00 ") {
		v.errorf(at("state", "prefix"), "state.prefix %q: want a key prefix starting with / (default /dkimgw/)", s.Prefix)
	} else if !strings.HasSuffix(s.Prefix, "/") {
		s.Prefix += "/"
	}
	if (s.TLS.Cert == "") != (s.TLS.Key == "") {
		v.errorf(at("state", "tls"), "state.tls.cert and state.tls.key go together: set both or neither")
	}
	s.TLS.CA, s.TLS.Cert, s.TLS.Key = v.path(s.TLS.CA), v.path(s.TLS.Cert), v.path(s.TLS.Key)
	if (s.Username == "") != (s.PasswordFile == "") {
		v.errorf(at("state"), "state.username and state.password_file go together: set both or neither")
	}
	s.PasswordFile = v.path(s.PasswordFile)
	setDefault(&s.DialTimeout, Duration(DefaultStateDialTimeout))
	if s.DialTimeout < 0 {
		v.errorf(at("state", "dial_timeout"), "state.dial_timeout must be a positive duration")
	}
	setDefault(&s.LeaseTTL, Duration(DefaultStateLeaseTTL))
	if s.LeaseTTL.D() < 2*time.Second || s.LeaseTTL.D()%time.Second != 0 {
		v.errorf(at("state", "lease_ttl"), "state.lease_ttl must be a whole number of seconds, at least 2 (etcd leases count in seconds)")
	}
}
