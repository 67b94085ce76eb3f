// Package audit is dkimgw's tamper-evident audit trail: a JSON-lines file
// of every key and policy event (keys generated, published, activated,
// retired, revoked, destroyed; configuration loaded or refused; token
// login failures; key commands run from the CLI), who did it and on which
// host.
//
// # The hash chain
//
// Every record carries, in "prev", the hex SHA-256 of the previous
// record's line: the exact bytes of that line without its newline. The
// first record's prev is 64 zeros. A deleted, changed, inserted or moved
// line breaks the chain at the record after it. Records also carry a
// sequence number ("seq", 1 for the first), so a report can name them.
//
// # Checkpoints
//
// A chain alone does not stop someone who can write the file from
// rewriting all of it. So a checkpoint record ("event":"checkpoint")
// carries a signature, by a key held in the PKCS#11 token, of the chain
// head it follows: the signed message is the SHA-256 of
//
//	"dkimgw-audit-checkpoint\n" + seq + "\n" + prev
//
// (seq in decimal, prev in hex), signed as dkimgw signs DKIM digests:
// PKCS#1 v1.5 with SHA-256 for RSA, pure Ed25519 over the 32 bytes for
// Ed25519. Only the token can make it, so a rewritten log fails at its
// first checkpoint. Records after the last checkpoint are not sealed yet:
// a writer that could edit the file could change them undetected, and
// deleting the tail of the file is only detected up to the last
// checkpoint an auditor saw.
//
// # Several writers
//
// serve and CLI commands may append to one file. An append takes an
// exclusive flock(2) on the file, reads the last line, writes the new one
// with O_APPEND and fsyncs before releasing the lock, so the chain stays
// linear and a record is on disk before the action it records is
// reported as done.
package audit
