package policy

import (
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Rotation and DNS defaults. Each applies when its key is absent.
const (
	// DefaultDataDir holds the rotation state and the manual publisher's
	// files.
	DefaultDataDir = "/var/lib/dkimgw"
	// DefaultCheckEvery is how often serve runs the rotation reconciler:
	// often enough that a key becomes active about a minute after DNS
	// serves it, rarely enough to cost nothing.
	DefaultCheckEvery = time.Minute
	// shortRotation is below what rotation of real mail needs: such
	// durations are for tests and draw a warning.
	shortRotation = time.Hour
)

// Algorithms a rotation policy may list.
var rotationAlgorithms = []string{"rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}

// Duration is a length of time written like Go durations (90s, 5m, 12h)
// or in days (90d, 1d12h); a bare number is seconds (as DNS TTLs are).
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML decodes "90d", "36h", "1d12h" or a number of seconds.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: a duration must be a value like 90d, 12h, 30m or 3600 (seconds)", n.Line)
	}
	v, err := ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

// ParseDuration parses a duration with an optional leading number of
// days ("90d", "1d12h"), anything time.ParseDuration accepts, or a bare
// number of seconds.
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	var days time.Duration
	if i := strings.IndexByte(s, 'd'); i > 0 {
		n, err := strconv.ParseUint(s[:i], 10, 16)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (write it like 90d, 12h, 30m or 3600)", s)
		}
		days = time.Duration(n) * 24 * time.Hour
		s = s[i+1:]
		if s == "" {
			return days, nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q is not a duration (write it like 90d, 12h, 30m or 3600)", s)
	}
	return days + d, nil
}

// Rotation is the rotation policy of one signing domain: dkimgw generates
// its keys, publishes them in DNS and signs with the active ones.
type Rotation struct {
	// Algorithms lists the algorithms with one active key each (two for
	// dual signing): rsa-2048, rsa-3072, rsa-4096, ed25519. Default
	// [rsa-2048].
	Algorithms []string `yaml:"algorithms"`
	// Interval is how long a key signs before its successor takes over.
	// Default 90d.
	Interval Duration `yaml:"interval"`
	// Grace is how long a retired key's record stays published, for mail
	// still in queues. Default 7d.
	Grace Duration `yaml:"grace"`
	// RevokeFor is how long the revoked record ("v=DKIM1; p=") stays
	// before it is deleted. Default 7d.
	RevokeFor Duration `yaml:"revoke_for"`
	// TTL of the published records (a number is seconds). Default 3600.
	TTL Duration `yaml:"ttl"`
	// Publisher names the entry of dns.publishers that publishes the
	// records. Required.
	Publisher string `yaml:"publisher"`
	// SelectorTemplate makes new selectors; placeholders {alg} (rsa, ed),
	// {algorithm}, {bits}, {yyyy}, {mm}, {dd}, {yyyymmdd}, {hhmm}, {unix}.
	// Default "{alg}{yyyymmdd}".
	SelectorTemplate string `yaml:"selector_template"`
	// Zone is the DNS zone the records go in. Default: the publisher's
	// zone when the domain is in it, else the domain itself.
	Zone string `yaml:"zone"`
}

// DNS is where rotated keys are published and checked.
type DNS struct {
	// Publishers by name, for domains.D.rotation.publisher.
	Publishers map[string]Publisher `yaml:"publishers"`
	// CheckServers are the authoritative servers (host or host:port) asked
	// whether a record is visible. Empty: the zone's NS records, found by
	// asking Resolver.
	CheckServers []string `yaml:"check_servers"`
	// Resolver (host:port) is asked for a zone's NS records when
	// CheckServers is empty. Empty: the primary of an rfc2136 publisher;
	// a manual publisher needs CheckServers or Resolver.
	Resolver string `yaml:"resolver"`
	// Timeout bounds each DNS exchange. Default 10s.
	Timeout Duration `yaml:"timeout"`
}

// Publisher types.
const (
	PublisherRFC2136 = "rfc2136"
	PublisherManual  = "manual"
)

// Publisher is one way of putting records in DNS.
type Publisher struct {
	// Type is rfc2136 (dynamic updates signed with TSIG) or manual (a DNS
	// admin publishes what `dkimgw dns pending` prints).
	Type string `yaml:"type"`
	// Server is the zone's primary, host:port (rfc2136).
	Server string `yaml:"server"`
	// Zone is the zone the publisher serves, e.g. "example.com."; the
	// default zone of the domains that use it.
	Zone string `yaml:"zone"`
	// TSIG is the key that signs updates and zone transfers (rfc2136).
	TSIG *TSIG `yaml:"tsig"`
	// Dir holds the manual publisher's pending changes. Default:
	// data_dir/manual/NAME.
	Dir string `yaml:"dir"`
}

// TSIG names a TSIG key (RFC 8945).
type TSIG struct {
	Name string `yaml:"name"`
	// Algorithm is hmac-sha256 (default) or hmac-sha512.
	Algorithm string `yaml:"algorithm"`
	// SecretFile holds the base64 secret, or tsig-keygen's output.
	// Relative to the configuration file's directory.
	SecretFile string `yaml:"secret_file"`
}

// RotationSettings are the reconciler's own settings.
type RotationSettings struct {
	// CheckEvery is how often serve runs a reconcile pass. Default 1m.
	CheckEvery Duration `yaml:"check_every"`
	// DriftEvery is how often serve checks that every authoritative
	// server still serves the record of each active and retired key.
	// Default 10m.
	DriftEvery Duration `yaml:"drift_every"`
	// OnDrift is what happens to a domain whose active key's record DNS
	// no longer serves as published: warn (default) or tempfail.
	OnDrift DriftAction `yaml:"on_drift"`
}

// DriftAction is what serve does when DNS stops serving an active key's
// record as dkimgw published it.
type DriftAction string

const (
	// DriftWarn logs, sets the drift metric and keeps signing: the record
	// may come back (a zone reloaded from an old file), and a warning
	// loses no mail.
	DriftWarn DriftAction = "warn"
	// DriftTempfail answers 451 4.7.0 for the domain's mail until the
	// record is served again, instead of sending mail that fails DKIM.
	DriftTempfail DriftAction = "tempfail"
)

// DefaultDriftEvery is how often serve re-checks the published records.
const DefaultDriftEvery = 10 * time.Minute

// Rotating lists the domains with a rotation policy, sorted.
func (c *Config) Rotating() []string {
	var out []string
	for d, dom := range c.Domains {
		if dom.Rotation != nil {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}

func (c *Config) applyRotationDefaults() {
	setDefault(&c.DataDir, DefaultDataDir)
	setDefault(&c.Rotation.CheckEvery, Duration(DefaultCheckEvery))
	setDefault(&c.Rotation.DriftEvery, Duration(DefaultDriftEvery))
	setDefault(&c.Rotation.OnDrift, DriftWarn)
}

func (v *validator) validateRotation(c *Config) {
	c.DataDir = v.path(c.DataDir)
	if c.Rotation.CheckEvery <= 0 {
		v.errorf(at("rotation", "check_every"), "rotation.check_every must be a positive duration")
	}
	if c.Rotation.DriftEvery <= 0 {
		v.errorf(at("rotation", "drift_every"), "rotation.drift_every must be a positive duration")
	}
	switch c.Rotation.OnDrift {
	case DriftWarn, DriftTempfail:
	default:
		v.errorf(at("rotation", "on_drift"), "rotation.on_drift: unknown value %q (want warn or tempfail)", c.Rotation.OnDrift)
	}
	if c.DNS.Timeout < 0 {
		v.errorf(at("dns", "timeout"), "dns.timeout must not be negative")
	}
	for i, s := range c.DNS.CheckServers {
		if !strings.Contains(s, ":") || strings.HasSuffix(s, "]") {
			s += ":53"
		}
		v.hostPort(at("dns", "check_servers", i), "dns.check_servers", s, false)
	}
	if c.DNS.Resolver != "" {
		v.hostPort(at("dns", "resolver"), "dns.resolver", c.DNS.Resolver, false)
	}
	for _, name := range slices.Sorted(maps.Keys(c.DNS.Publishers)) {
		p := c.DNS.Publishers[name]
		path := func(k ...any) []any { return append(at("dns", "publishers", name), k...) }
		if p.Zone != "" {
			p.Zone = normalizeDomain(p.Zone)
			if !isHost(p.Zone) {
				v.errorf(path("zone"), "dns.publishers.%s.zone %q is not a domain name", name, p.Zone)
			}
		}
		switch p.Type {
		case PublisherRFC2136:
			if p.Server == "" {
				v.errorf(path(), "dns.publishers.%s.server is required (host:port of the zone's primary)", name)
			} else {
				v.hostPort(path("server"), "dns.publishers."+name+".server", p.Server, false)
			}
			if p.TSIG == nil || p.TSIG.Name == "" || p.TSIG.SecretFile == "" {
				v.errorf(path("tsig"), "dns.publishers.%s.tsig needs name and secret_file: dkimgw sends only signed updates", name)
			} else {
				switch strings.ToLower(p.TSIG.Algorithm) {
				case "", "hmac-sha256", "hmac-sha512":
				default:
					v.errorf(path("tsig", "algorithm"), "dns.publishers.%s.tsig.algorithm %q: use hmac-sha256 or hmac-sha512", name, p.TSIG.Algorithm)
				}
				t := *p.TSIG
				t.SecretFile = v.path(t.SecretFile)
				p.TSIG = &t
			}
			if p.Dir != "" {
				v.errorf(path("dir"), "dns.publishers.%s.dir is for type manual only", name)
			}
		case PublisherManual:
			if p.Server != "" || p.TSIG != nil {
				v.errorf(path(), "dns.publishers.%s: server and tsig are for type rfc2136 only", name)
			}
			if p.Dir == "" {
				p.Dir = filepath.Join(c.DataDir, "manual", name)
			}
			p.Dir = v.path(p.Dir)
		default:
			v.errorf(path("type"), "dns.publishers.%s.type: unknown value %q (want rfc2136 or manual)", name, p.Type)
		}
		c.DNS.Publishers[name] = p
	}
}

// validateDomainRotation checks one domain's rotation policy (with its
// normalised name key, written as name).
func (v *validator) validateDomainRotation(c *Config, name, key string, r *Rotation) {
	path := func(k ...any) []any { return append(at("domains", name, "rotation"), k...) }
	if len(r.Algorithms) == 0 {
		r.Algorithms = []string{"rsa-2048"}
	}
	seen := map[string]bool{}
	for i, a := range r.Algorithms {
		a = strings.ToLower(a)
		r.Algorithms[i] = a
		switch {
		case !slices.Contains(rotationAlgorithms, a):
			v.errorf(path("algorithms", i), "domains.%s.rotation.algorithms: unknown algorithm %q (want %s)", name, a, strings.Join(rotationAlgorithms, ", "))
		case seen[a]:
			v.errorf(path("algorithms", i), "domains.%s.rotation.algorithms: %s is listed twice", name, a)
		}
		seen[a] = true
	}
	const day = 24 * time.Hour
	setDefault(&r.Interval, Duration(90*day))
	setDefault(&r.Grace, Duration(7*day))
	setDefault(&r.RevokeFor, Duration(7*day))
	setDefault(&r.TTL, Duration(time.Hour))
	setDefault(&r.SelectorTemplate, "{alg}{yyyymmdd}")
	for _, f := range []struct {
		key string
		d   Duration
	}{{"interval", r.Interval}, {"grace", r.Grace}, {"revoke_for", r.RevokeFor}} {
		if f.d < 0 {
			v.errorf(path(f.key), "domains.%s.rotation.%s must not be negative", name, f.key)
		} else if f.d.D() < shortRotation {
			v.warnf(path(f.key), "domains.%s.rotation.%s %s is below one hour: fit for tests only (mail waits in queues for days)", name, f.key, f.d.D())
		}
	}
	if r.TTL.D() < time.Second || r.TTL.D()%time.Second != 0 {
		v.errorf(path("ttl"), "domains.%s.rotation.ttl must be a whole number of seconds, at least 1", name)
	}
	if r.Grace.D() < r.TTL.D() {
		v.warnf(path("grace"), "domains.%s.rotation.grace %s is shorter than the records' ttl %s: resolvers may still hold a retired key's record when it is revoked", name, r.Grace.D(), r.TTL.D())
	}
	p, ok := c.DNS.Publishers[r.Publisher]
	switch {
	case r.Publisher == "":
		v.errorf(path(), "domains.%s.rotation.publisher is required (the name of an entry under dns.publishers)", name)
	case !ok:
		v.errorf(path("publisher"), "domains.%s.rotation.publisher: no publisher %q under dns.publishers", name, r.Publisher)
	case p.Type == PublisherManual && len(c.DNS.CheckServers) == 0 && c.DNS.Resolver == "":
		v.errorf(path("publisher"), "domains.%s.rotation.publisher %q is manual: set dns.check_servers (or dns.resolver) so that dkimgw can see when the records are published", name, r.Publisher)
	}
	r.Zone = normalizeDomain(r.Zone)
	if r.Zone == "" && ok && p.Zone != "" && isSubdomain(key, normalizeDomain(p.Zone)) {
		r.Zone = normalizeDomain(p.Zone)
	}
	if r.Zone == "" {
		r.Zone = key
	}
	if !isSubdomain(key, r.Zone) {
		v.errorf(path("zone"), "domains.%s.rotation.zone %q does not contain the domain", name, r.Zone)
	}
}
