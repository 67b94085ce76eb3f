// Package signer adds DKIM-Signature header fields (RFC 6376) to mail
// messages, with private keys it sees only as [crypto.Signer]s: RSA keys
// give a=rsa-sha256 (RFC 6376, key sizes per RFC 8301), Ed25519 keys give
// a=ed25519-sha256 (RFC 8463). It knows nothing about where keys live.
//
// Signing is two steps. [Spool] reads a message once, as a stream: it
// normalises line endings to CRLF, keeps the bytes in memory or, past a
// threshold, in a temporary file, checks the header section (RFC 5322,
// RFC 6532 for UTF-8) and refuses messages no one should sign, and hashes
// the relaxed-canonical body on the way. [Sign] then produces one
// DKIM-Signature field per [Identity] from that single body hash, so a
// dual-signed message (rsa-sha256 + ed25519-sha256) costs one pass over
// the body, and [WriteSigned] writes the fields followed by the message.
// [SpoolAt] is [Spool] for a message already stored whole, such as a file:
// it keeps no copy, and the message is read again from where it is stored
// when it is written.
//
// What every signature looks like (docs/architecture.md, "Signing defaults"):
// c=relaxed/relaxed; t= always; x= when [Options.Expire] is set; never l=
// (a body length limit lets anyone append content); h= lists each of From,
// Reply-To, Sender, To, Cc, Subject, Date, Message-ID, In-Reply-To,
// References, MIME-Version, Content-Type, Content-Transfer-Encoding,
// List-Id, List-Unsubscribe, List-Unsubscribe-Post and Feedback-ID once
// per instance present, plus one more entry, present or not, for From,
// Subject, Date, To, Cc, Reply-To, Sender, Content-Type, MIME-Version,
// List-Unsubscribe and List-Unsubscribe-Post, so that no further instance
// of those can be added after signing (RFC 6376 §5.4.2, §8.15).
// Fields are folded so that no line exceeds 78 characters where the tag
// values allow it (RFC 5322 §2.1.1), and never 998.
//
// # Why not go-msgauth's Signer
//
// github.com/emersion/go-msgauth/dkim (v0.7.0) is the verifier the tests
// use, and its signer was the starting point, but it cannot produce what
// dkimgw needs:
//
//   - t= comes from a package variable, so a caller cannot fix the clock and
//     there can be no known-answer test;
//   - the h= tag is never folded: with the header list above a plain
//     newsletter gets a line of 157 characters, and it cannot be refolded
//     afterwards, because relaxed canonicalization turns an added fold
//     inside a tag value into a space the signature did not cover;
//   - every Signer hashes the body again, in a goroutine behind an
//     io.Pipe: dual-signing a 1 MiB message that way takes about six times
//     as long as here, where the body is hashed once, while spooling
//     (BenchmarkDualSignBody);
//   - its relaxed body canonicalizer buffers every run of blank lines in
//     memory, so a message of blank lines grows the heap by its size.
//
// This package therefore canonicalizes (RFC 6376 §3.4.2, §3.4.4), formats
// and hashes the field itself; go-msgauth's verifier and three independent
// ones (dkimpy, OpenDKIM, Mail::DKIM) check every signature it makes.
//
// Alignment: [Aligned] is DMARC's relaxed identifier alignment (RFC 7489
// §3.1.1) without the Public Suffix List: the caller decides which d= a
// client may use, so "From domain is d= or below it" is the check needed.
package signer
