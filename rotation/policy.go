package rotation

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Policy defaults; each applies when its field is zero.
const (
	// DefaultInterval: a key signs for about 90 days, a common practice
	// (M3AAWG recommends rotating at least twice a year).
	DefaultInterval = 90 * 24 * time.Hour
	// DefaultGrace keeps a retired selector published for a week, longer
	// than any MTA keeps retrying a message (Postfix: 5 days).
	DefaultGrace = 7 * 24 * time.Hour
	// DefaultRevokeFor keeps the revoked record a week, so that caches
	// learn that the key is revoked rather than unknown.
	DefaultRevokeFor = 7 * 24 * time.Hour
	// DefaultTTL is the TTL of published records.
	DefaultTTL = time.Hour
	// DefaultSelectorTemplate gives e.g. rsa20261201 and ed20261201.
	DefaultSelectorTemplate = "{alg}{yyyymmdd}"
)

// Policy is the rotation policy of one signing domain.
type Policy struct {
	// Domain is the signing domain (d=), lower case, no trailing dot.
	Domain string
	// Zone is the DNS zone the records go in. Empty: Domain itself.
	// Domain must be Zone or below it.
	Zone string
	// Algorithms lists the algorithms with one active key each (two for
	// dual signing). At least one; no repeats.
	Algorithms []Algorithm
	// Interval is how long a key signs before its successor takes over.
	// Zero: DefaultInterval.
	Interval time.Duration
	// Grace is how long a retired key's record stays published. Zero:
	// DefaultGrace; use a negative value for none.
	Grace time.Duration
	// RevokeFor is how long the revoked record stays before it is deleted.
	// Zero: DefaultRevokeFor; a negative value for none.
	RevokeFor time.Duration
	// TTL is the TTL of published records. Zero: DefaultTTL.
	TTL time.Duration
	// Publisher names the entry of Options.Publishers that publishes this
	// domain's records.
	Publisher string
	// SelectorTemplate makes new selectors. Placeholders: {alg} ("rsa" or
	// "ed"), {algorithm} ("rsa-2048"), {bits}, {yyyy}, {mm}, {dd},
	// {yyyymmdd}, {hhmm}, {unix}. Zero: DefaultSelectorTemplate. The
	// result must be one DNS label; a "-2", "-3", ... suffix makes it
	// unique.
	SelectorTemplate string
}

func (p Policy) withDefaults() Policy {
	p.Domain = strings.TrimSuffix(strings.ToLower(strings.TrimSpace(p.Domain)), ".")
	p.Zone = strings.TrimSuffix(strings.ToLower(strings.TrimSpace(p.Zone)), ".")
	if p.Zone == "" {
		p.Zone = p.Domain
	}
	if p.Interval == 0 {
		p.Interval = DefaultInterval
	}
	if p.Grace == 0 {
		p.Grace = DefaultGrace
	} else if p.Grace < 0 {
		p.Grace = 0
	}
	if p.RevokeFor == 0 {
		p.RevokeFor = DefaultRevokeFor
	} else if p.RevokeFor < 0 {
		p.RevokeFor = 0
	}
	if p.TTL == 0 {
		p.TTL = DefaultTTL
	}
	if p.SelectorTemplate == "" {
		p.SelectorTemplate = DefaultSelectorTemplate
	}
	return p
}

// validate checks a policy with its defaults applied.
func (p Policy) validate() error {
	if err := checkName(p.Domain); err != nil {
		return fmt.Errorf("rotation: domain %q: %w", p.Domain, err)
	}
	if p.Zone != p.Domain && !strings.HasSuffix(p.Domain, "."+p.Zone) {
		return fmt.Errorf("rotation: domain %q is not in zone %q; set the zone the domain's records belong to", p.Domain, p.Zone)
	}
	if len(p.Algorithms) == 0 {
		return fmt.Errorf("rotation: domain %q: no algorithms; list at least one of rsa-2048, rsa-3072, rsa-4096, ed25519", p.Domain)
	}
	seen := map[Algorithm]bool{}
	for _, a := range p.Algorithms {
		if !a.valid() {
			return fmt.Errorf("rotation: domain %q: unknown algorithm %q; use rsa-2048, rsa-3072, rsa-4096 or ed25519", p.Domain, a)
		}
		if seen[a] {
			return fmt.Errorf("rotation: domain %q: algorithm %s listed twice", p.Domain, a)
		}
		seen[a] = true
	}
	if p.Interval < 0 || p.TTL < time.Second {
		return fmt.Errorf("rotation: domain %q: interval must be positive and ttl at least 1s", p.Domain)
	}
	if p.Publisher == "" {
		return fmt.Errorf("rotation: domain %q: no publisher", p.Domain)
	}
	// A sample date with two-digit fields shows template errors now, not
	// at the first rotation.
	sample := time.Date(2026, 12, 31, 23, 59, 0, 0, time.UTC)
	for _, a := range p.Algorithms {
		sel, err := renderSelector(p.SelectorTemplate, a, sample)
		if err != nil {
			return fmt.Errorf("rotation: domain %q: %w", p.Domain, err)
		}
		// Room for the uniqueness suffix.
		if len(sel) > 63-4 {
			return fmt.Errorf("rotation: domain %q: selector template %q gives %q, longer than 59 characters", p.Domain, p.SelectorTemplate, sel)
		}
	}
	return nil
}

// recordName is the fully qualified name of a selector's record, without
// the trailing dot (RFC 6376 §3.6.2.1).
func (p Policy) recordName(selector string) string {
	return selector + "._domainkey." + p.Domain
}

// relName is the record's name relative to the zone, as publishers take it.
func (p Policy) relName(selector string) string {
	return strings.TrimSuffix(strings.TrimSuffix(p.recordName(selector), p.Zone), ".")
}

func (p Policy) zoneFQDN() string { return p.Zone + "." }

func (p Policy) hasAlgorithm(a Algorithm) bool {
	for _, x := range p.Algorithms {
		if x == a {
			return true
		}
	}
	return false
}

// renderSelector fills in a selector template for alg at t (UTC).
func renderSelector(tmpl string, alg Algorithm, t time.Time) (string, error) {
	t = t.UTC()
	bits := "256"
	if alg != Ed25519 {
		bits = strings.TrimPrefix(string(alg), "rsa-")
	}
	r := strings.NewReplacer(
		"{alg}", alg.short(),
		"{algorithm}", string(alg),
		"{bits}", bits,
		"{yyyymmdd}", t.Format("20060102"),
		"{yyyy}", t.Format("2006"),
		"{mm}", t.Format("01"),
		"{dd}", t.Format("02"),
		"{hhmm}", t.Format("1504"),
		"{unix}", strconv.FormatInt(t.Unix(), 10),
	)
	sel := strings.ToLower(r.Replace(tmpl))
	if strings.ContainsAny(sel, "{}") {
		return "", fmt.Errorf("selector template %q has an unknown placeholder; use {alg}, {algorithm}, {bits}, {yyyy}, {mm}, {dd}, {yyyymmdd}, {hhmm}, {unix}", tmpl)
	}
	if err := checkLabel(sel); err != nil {
		return "", fmt.Errorf("selector template %q gives %q: %w", tmpl, sel, err)
	}
	return sel, nil
}

// checkLabel checks one DNS label as RFC 6376 §3.1 allows in a selector:
// letters, digits and inner hyphens, at most 63 characters.
func checkLabel(l string) error {
	if l == "" || len(l) > 63 {
		return fmt.Errorf("a label must have 1 to 63 characters")
	}
	if l[0] == '-' || l[len(l)-1] == '-' {
		return fmt.Errorf("a label may not start or end with a hyphen")
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return fmt.Errorf("%q is not a letter, digit or hyphen", c)
		}
	}
	return nil
}

func checkName(name string) error {
	if name == "" || len(name) > 253 || !strings.Contains(name, ".") {
		return fmt.Errorf("not a domain name")
	}
	for l := range strings.SplitSeq(name, ".") {
		if err := checkLabel(l); err != nil {
			return err
		}
	}
	return nil
}

// newSelector renders the template and adds the first "-N" suffix that
// makes it unused.
func newSelector(tmpl string, alg Algorithm, t time.Time, used map[string]bool) (string, error) {
	base, err := renderSelector(tmpl, alg, t)
	if err != nil {
		return "", fmt.Errorf("rotation: %w", err)
	}
	if !used[base] {
		return base, nil
	}
	for n := 2; n < 10000; n++ {
		s := base + "-" + strconv.Itoa(n)
		if !used[s] {
			return s, nil
		}
	}
	return "", fmt.Errorf("rotation: no unused selector for template %q", tmpl)
}
