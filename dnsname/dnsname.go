package dnsname

import (
	"fmt"
	"strings"

	"golang.org/x/net/idna"
)

// DNS limits (RFC 1035 section 2.3.4), in octets, for a name without its
// trailing dot.
const (
	maxLabel = 63
	maxName  = 253
)

// recordInfix joins a selector and a domain into the name of the key's
// TXT record (RFC 6376 section 3.6.2.1).
const recordInfix = "._domainkey."

// Error says why a name is not a valid domain or selector. Its message
// starts with "dnsname: "; a caller that adds its own package prefix
// builds its message from the fields instead.
type Error struct {
	Kind   string // "domain name", "selector" or "host name"
	Name   string // the name as given
	Reason string // what is wrong and how to write it instead
}

func (e *Error) Error() string { return "dnsname: " + e.Detail() }

// Detail is the message without the package prefix: name, kind and reason.
func (e *Error) Detail() string {
	return fmt.Sprintf("%q is not a valid %s: %s", e.Name, e.Kind, e.Reason)
}

// Domain returns the normal form of a signing domain (d=), or an *Error.
// It needs at least two labels: a top-level domain signs nobody's mail.
func Domain(s string) (string, error) {
	d, err := normalize("domain name", s)
	if err != nil {
		return "", err
	}
	if !strings.Contains(d, ".") {
		return "", &Error{Kind: "domain name", Name: s, Reason: "it is a top-level domain (one label); a signing domain has at least two labels, as in example.com"}
	}
	return d, nil
}

// Selector returns the normal form of a selector (s=), or an *Error.
func Selector(s string) (string, error) {
	sel, err := normalize("selector", s)
	if err != nil {
		return "", err
	}
	if len(sel)+len(recordInfix)+len("a.b") > maxName {
		return "", &Error{Kind: "selector", Name: s, Reason: fmt.Sprintf("it is too long: with %q and a domain it exceeds %d octets", recordInfix, maxName)}
	}
	return sel, nil
}

// Host returns the normal form of a host name (one label or more, e.g.
// the name in an SMTP greeting), or an *Error.
func Host(s string) (string, error) { return normalize("host name", s) }

// Key returns the normal forms of a key's domain and selector, and checks
// that its record name, selector._domainkey.domain, fits in DNS.
func Key(domain, selector string) (d, s string, err error) {
	if d, err = Domain(domain); err != nil {
		return "", "", err
	}
	if s, err = Selector(selector); err != nil {
		return "", "", err
	}
	if n := len(s) + len(recordInfix) + len(d); n > maxName {
		return "", "", &Error{Kind: "selector", Name: selector, Reason: fmt.Sprintf("with domain %q it makes a record name of %d octets, more than DNS allows (%d)", d, n, maxName)}
	}
	return d, s, nil
}

// normalize checks the label syntax shared by every kind of name and
// returns the name lower-cased, in A-labels, without a trailing dot.
func normalize(kind, s string) (string, error) {
	bad := func(format string, args ...any) error {
		return &Error{Kind: kind, Name: s, Reason: fmt.Sprintf(format, args...)}
	}
	name := strings.TrimSuffix(s, ".")
	if name == "" {
		return "", bad("it is empty")
	}
	if !isASCII(name) || hasALabel(name) {
		// The lookup profile maps U-labels (case folding, NFC) to
		// A-labels and checks that xn-- labels decode to valid IDNs.
		a, err := idna.Lookup.ToASCII(name)
		if err != nil {
			return "", bad("it is not a valid internationalised name (%v); write it in its xn-- form", err)
		}
		name = a
	}
	name = strings.ToLower(name)
	if len(name) > maxName {
		return "", bad("it is longer than %d octets", maxName)
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" {
			return "", bad("it has an empty label (two dots in a row, or a leading dot)")
		}
		if len(label) > maxLabel {
			return "", bad("it has a label longer than %d octets", maxLabel)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return "", bad("it has a label that starts or ends with a hyphen")
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return "", bad("it contains %q; use letters, digits and hyphens (internationalised names in their xn-- form)", string(rune(c)))
			}
		}
	}
	return name, nil
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// hasALabel reports an xn-- label, whose Punycode must be checked.
func hasALabel(s string) bool {
	s = strings.ToLower(s)
	return strings.HasPrefix(s, "xn--") || strings.Contains(s, ".xn--")
}
