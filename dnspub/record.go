package dnspub

import (
	"fmt"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/dkimgw/dkimgw/dnsname"
)

// DefaultTTL is the TTL of a record whose TTL is zero. An hour keeps
// caches short enough that a withdrawn selector disappears within a
// working day, and long enough not to load the authoritative servers.
const DefaultTTL = time.Hour

// Record is a TXT record in a zone.
type Record struct {
	// Name is the owner name, relative to the zone ("s1._domainkey", as
	// libdns names records) or fully qualified ("s1._domainkey.example.com."
	// or, without the trailing dot, any name that ends with the zone's).
	// "@" or "" is the zone's apex.
	Name string
	// TTL is the record's TTL; zero means DefaultTTL. Publishers round
	// it down to whole seconds.
	TTL time.Duration
	// Value is the record's text as one string: the concatenation of its
	// character-strings.
	Value string
}

// fqdn returns the record's owner name in the zone, fully qualified and
// lower case, or an error when the name is not in the zone.
func (r Record) fqdn(zone string) (string, error) {
	return absName(r.Name, zone)
}

func (r Record) ttlSeconds() uint32 {
	if r.TTL <= 0 {
		return uint32(DefaultTTL / time.Second)
	}
	return uint32(r.TTL / time.Second)
}

// normZone returns zone fully qualified and lower case.
func normZone(zone string) (string, error) {
	z := dns.Fqdn(strings.ToLower(strings.TrimSpace(zone)))
	if z == "." || z == ".." {
		return "", fmt.Errorf("dnspub: no zone given")
	}
	// A zone names a directory of the Manual publisher: no path
	// separators, no escapes.
	if _, ok := dns.IsDomainName(z); !ok || strings.ContainsAny(z, `/\`) || strings.HasPrefix(z, ".") {
		return "", fmt.Errorf("dnspub: zone %q is not a domain name", zone)
	}
	return z, nil
}

// absName makes name (relative to zone, or fully qualified) fully
// qualified and checks that it lies in zone.
func absName(name, zone string) (string, error) {
	n := strings.ToLower(strings.TrimSpace(name))
	switch {
	case n == "" || n == "@":
		n = zone
	case !dns.IsFqdn(n) && (n+"." == zone || strings.HasSuffix(n+".", "."+zone)):
		// Already ends with the zone, only without the trailing dot, as
		// DKIM tools write names ("s1._domainkey.example.com"): a name
		// relative to example.com that repeats it is never what is meant.
		n += "."
	case !dns.IsFqdn(n):
		n = n + "." + zone
	}
	if _, ok := dns.IsDomainName(n); !ok {
		return "", fmt.Errorf("dnspub: %q is not a domain name", name)
	}
	if !dns.IsSubDomain(zone, n) {
		return "", fmt.Errorf("dnspub: %s is not in zone %s", n, zone)
	}
	return n, nil
}

// relName returns fqdn relative to zone, "@" for the apex.
func relName(fqdn, zone string) string {
	if fqdn == zone {
		return "@"
	}
	return strings.TrimSuffix(fqdn, "."+zone)
}

// txtRR builds the TXT resource record of r, owned by fqdn.
func txtRR(fqdn string, r Record) *dns.TXT {
	parts := dnsname.SplitTXT(r.Value)
	for i, p := range parts {
		parts[i] = escapeTXT(p)
	}
	return &dns.TXT{
		Hdr: dns.RR_Header{Name: fqdn, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: r.ttlSeconds()},
		Txt: parts,
	}
}

// escapeTXT writes a character-string in the presentation form that
// miekg/dns keeps in dns.TXT.Txt (and zone files use): '"' and '\'
// backslash-escaped, other bytes outside printable ASCII as \DDD.
// miekg/dns decodes that form when it packs a message, and produces it
// when it unpacks one, so a raw value must go through escapeTXT on the
// way out and unescapeTXT on the way in to round-trip byte for byte.
func escapeTXT(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < ' ' || c > '~':
			fmt.Fprintf(&b, "\\%03d", c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// unescapeTXT undoes escapeTXT (and any \X or \DDD escape).
func unescapeTXT(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' || i+1 == len(s) {
			b = append(b, c)
			continue
		}
		if i+3 < len(s) && isDigit(s[i+1]) && isDigit(s[i+2]) && isDigit(s[i+3]) {
			n := int(s[i+1]-'0')*100 + int(s[i+2]-'0')*10 + int(s[i+3]-'0')
			if n <= 255 {
				b = append(b, byte(n))
				i += 3
				continue
			}
		}
		b = append(b, s[i+1])
		i++
	}
	return string(b)
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// zoneLine renders r as a zone-file line with a fully qualified owner:
//
//	s1._domainkey.example.com. 3600 IN TXT "v=DKIM1; k=rsa; p=MIIB..." "..."
//
// miekg/dns escapes quotes, backslashes and non-printable bytes the way
// zone-file parsers read them back.
func zoneLine(fqdn string, r Record) string {
	return txtRR(fqdn, r).String()
}

// value joins a TXT record's character-strings.
func value(rr dns.RR) (string, bool) {
	t, ok := rr.(*dns.TXT)
	if !ok {
		return "", false
	}
	var b strings.Builder
	for _, p := range t.Txt {
		b.WriteString(unescapeTXT(p))
	}
	return b.String(), true
}

// ttl is rr's TTL as a duration.
func ttl(rr dns.RR) time.Duration { return time.Duration(rr.Header().Ttl) * time.Second }

// ttlOf is the TTL r is published with: zero becomes DefaultTTL, and
// fractions of a second go.
func ttlOf(r Record) time.Duration { return time.Duration(r.ttlSeconds()) * time.Second }
