package dnsname

// MaxCharacterString is the longest <character-string> a TXT record can
// hold (RFC 1035 section 3.3): longer values are split into several
// strings, which verifiers concatenate (RFC 6376 section 3.6.2.2).
const MaxCharacterString = 255

// SplitTXT splits a record value into character-strings of at most
// MaxCharacterString bytes, the form a TXT record's RDATA (RFC 1035
// section 3.3.14), a zone-file line and miekg/dns's dns.TXT.Txt need.
// Both the token's zone lines (hsm) and the DNS publishers (dnspub) split
// here, so a record is cut at the same places wherever it is written.
func SplitTXT(value string) []string {
	var parts []string
	for len(value) > MaxCharacterString {
		parts = append(parts, value[:MaxCharacterString])
		value = value[MaxCharacterString:]
	}
	return append(parts, value)
}
