// Package dnsname is dkimgw's one definition of the names a DKIM key is
// known by: the signing domain (d=) and the selector (s=). The
// configuration (policy), the signer and the token (hsm) all check and
// normalise names here, so a name one of them accepts is never refused by
// another.
//
// A valid name is one or more dot-separated labels of ASCII letters,
// digits and inner hyphens, 1 to 63 octets each (the LDH syntax of RFC
// 1035 section 2.3.1 and RFC 5321's sub-domain, which RFC 6376 section
// 3.1 uses for selectors). The underscore is refused: DNS could store it,
// but it is not part of that syntax and some DNS providers and verifiers
// reject it. Internationalised labels are written as IDNA A-labels
// ("xn--..."); U-labels are converted to A-labels (RFC 5891, with
// golang.org/x/net/idna's lookup profile). The normal form is lower case
// without a trailing dot.
//
// A signing domain has at least two labels; a domain and a selector
// together must make a DNS name (selector._domainkey.domain) of at most
// 253 octets.
//
// SplitTXT is here for the same reason: the token's zone-file lines and
// the DNS publishers cut a key record into character-strings the same
// way.
package dnsname
