package signer

import (
	"fmt"
	"net/mail"
	"strings"

	"golang.org/x/net/idna"
)

// fromDomain returns the normalised domain of the single From field's
// address(es), or a *RefusedError.
//
// The domain found here is what policy checks and what DMARC receivers
// align with d=, so parsing is strict (net/mail, RFC 5322 and RFC 6532):
// a From that parsers could read in two ways is refused rather than
// guessed at, since guessing differently from receivers is how signatures
// get lent to other domains.
func fromDomain(fields []headerField) (string, error) {
	var from *headerField
	for i := range fields {
		if strings.EqualFold(fields[i].name, "From") {
			if from != nil {
				return "", refusef("more than one From header field")
			}
			from = &fields[i]
		}
	}
	if from == nil {
		return "", refusef("no From header field")
	}
	_, value, _ := strings.Cut(unfold(from.raw), ":")
	addrs, err := mail.ParseAddressList(value)
	if err != nil {
		return "", refusef("cannot parse the From address: %v", err)
	}
	var domain string
	for _, a := range addrs {
		at := strings.LastIndexByte(a.Address, '@')
		if at < 0 {
			return "", refusef("the From address has no domain")
		}
		d, err := normalizeDomain(a.Address[at+1:])
		if err != nil {
			return "", refusef("the From domain is not a valid domain name: %v", err)
		}
		if domain != "" && d != domain {
			// DMARC cannot pick one (RFC 7489 §6.6.1); neither can we.
			return "", refusef("the From field has addresses in more than one domain")
		}
		domain = d
	}
	if domain == "" {
		return "", refusef("the From field has no address")
	}
	return domain, nil
}

// unfold removes the CRLFs of folded lines (RFC 5322 §2.2.3).
func unfold(raw string) string {
	return strings.ReplaceAll(strings.TrimSuffix(raw, "\r\n"), "\r\n", "")
}

// normalizeDomain returns d in the form DNS and DKIM compare: lower-case,
// no trailing dot, A-labels for internationalized labels (RFC 5891).
func normalizeDomain(d string) (string, error) {
	d = strings.TrimSuffix(d, ".")
	if d == "" {
		return "", fmt.Errorf("empty domain")
	}
	ascii := true
	for i := 0; i < len(d); i++ {
		if d[i] >= 0x80 {
			ascii = false
			break
		}
	}
	if ascii {
		d = strings.ToLower(d)
	} else {
		a, err := idna.Lookup.ToASCII(d)
		if err != nil {
			return "", fmt.Errorf("%q: %w", d, err)
		}
		// The lookup mapping drops invisible characters (U+200B, the soft
		// hyphen), folds fullwidth letters and composes accents: a
		// receiver that does not map sees another name than the one
		// signed, and a reader sees a look-alike. Only case may differ.
		u, err := idna.Lookup.ToUnicode(a)
		if err != nil || u != strings.ToLower(d) {
			return "", fmt.Errorf("%q is not in the form IDNA maps it to (%q): invisible, fullwidth or decomposed characters", d, u)
		}
		d = a
	}
	if len(d) > 253 {
		return "", fmt.Errorf("domain name longer than 253 octets")
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 {
			return "", fmt.Errorf("%q: empty label or label longer than 63 octets", d)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			// Letters, digits and hyphens (RFC 1035 §2.3.1); the
			// underscore too, which DNS allows in any owner name.
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return "", fmt.Errorf("%q: invalid character %q", d, c)
			}
		}
	}
	return d, nil
}

// Aligned reports whether fromDomain is d or a subdomain of d: DMARC's
// relaxed alignment (RFC 7489 §3.1.1) without the Public Suffix List,
// which the caller replaces with its list of domains each client may
// sign for. Both are compared in normalised form (case, trailing dot,
// A-labels); a name that is not a valid domain is never aligned.
func Aligned(fromDomain, d string) bool {
	f, err := normalizeDomain(fromDomain)
	if err != nil {
		return false
	}
	d, err = normalizeDomain(d)
	if err != nil {
		return false
	}
	return f == d || strings.HasSuffix(f, "."+d)
}
