// Package policy is dkimgw's configuration model and the decisions made
// from it: which client is talking (by source address or by SMTP AUTH user),
// which identity (d= and selectors) signs a message with a given From
// domain, and whether that client may have that domain signed.
//
// A configuration is one YAML file. It is decoded strictly (an unknown key
// is an error that names the file and line), defaults are applied, and the
// whole is validated with cross-field checks before anything uses it; see
// [Load] and [Parse]. A *Config is immutable once returned, so a server
// swaps configurations by swapping pointers.
//
// The package does no I/O apart from reading the configuration file and
// the files it names (password hashes, TLS certificate, key and CA files),
// so every decision is a pure function and is tested as one.
//
// Standards:
//   - RFC 6376 (DKIM): d= and s= syntax, x= (signature expiration).
//   - RFC 7489 section 3.1.1 (DMARC relaxed alignment): a message is
//     signed with the From domain or its nearest parent listed under
//     domains, so d= aligns with From.
//   - RFC 4954 (SMTP AUTH) and RFC 4616 (PLAIN): users authenticate with a
//     password checked against a bcrypt hash.
//   - RFC 5321 section 4.5.3: size and line limits, and the 5-minute
//     server timeout used as the default for idle reads.
package policy
