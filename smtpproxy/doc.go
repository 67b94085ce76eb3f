// Package smtpproxy is dkimgw's signing relay: an SMTP server for the
// MTAs that relay outbound mail through dkimgw, and an SMTP client to the
// upstream MTA that delivers it.
//
// The envelope is relayed in lockstep: MAIL FROM (with SIZE, BODY,
// SMTPUTF8, RET and ENVID) and each RCPT TO (with NOTIFY and ORCPT) go to
// the upstream as they arrive, and the client gets the upstream's own
// answer for each. DATA is spooled, signed with the identity [policy]
// picks for its From domain, and sent upstream; dkimgw answers DATA with
// the upstream's answer, so it replies 250 only after the upstream has.
// Nothing is queued in dkimgw: any failure before the upstream's 250 is a
// 4xx, and the sending MTA keeps the message.
//
// Who gets in (admission.go, conn.go): at most smtp.max_connections
// connections, and smtp.max_connections_per_ip from one source (an IPv4
// address or an IPv6 /64), both counted at accept time and refused with a
// 421; a host that is no client gets 530 at MAIL and is then closed;
// failed AUTH attempts are counted per source across connections, and
// each reply waits longer than the last (bounded, forgotten after a quiet
// period, with a cap on the sources remembered).
//
// Upstream connections are pooled. A reused connection found dead at MAIL
// is replaced by a new one (and the other idle ones are dropped); while
// the client sends its message, NOOPs keep the upstream from dropping
// the connection as idle. Client-side limits (read_timeout per command or
// chunk, data_timeout per message, DATA or BDAT alike, and
// max_session_duration) are enforced by the client connection's read
// deadlines, which go-smtp would otherwise reset before every command.
//
// Every error returned to go-smtp is a bare *smtp.SMTPError (go-smtp
// type-asserts it and would otherwise answer 554), built in errors.go.
//
// The package does not know where keys live: it asks a [KeySource] and
// treats an error with a Temporary() bool method that returns true as a
// token failure. For a domain whose keys rotate (policy.Signing.Rotating)
// it asks a [SignerSource] for the domain's active keys, selector and key
// together, at the moment it signs; a domain with none gets 451 4.7.0
// ([ErrNoActiveKey]), never a signature DNS cannot verify. Nor does it read the configuration: its decisions (which
// client this is, who signs mail From a domain, whether AUTH is offered,
// what to do on a token error or an unauthorised From) come from a
// [Policy], which *policy.Config implements, and its limits, timeouts and
// addresses from a plain [Settings]. Reload swaps both at once, for new
// transactions; a transaction keeps the pair it started with.
//
// Standards:
//   - RFC 5321 (SMTP), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2920
//     (PIPELINING), RFC 2034 and RFC 3463 (enhanced status codes),
//     RFC 3030 (CHUNKING), RFC 6531 (SMTPUTF8), RFC 3461 (DSN parameters).
//   - RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 4616 (PLAIN); AUTH LOGIN
//     is the de-facto draft-murchison-sasl-login.
//   - RFC 6376 (DKIM), through package signer.
package smtpproxy
