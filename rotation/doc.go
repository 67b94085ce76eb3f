// Package rotation rotates DKIM keys on a schedule: a reconciler, in the
// manner of a certificate manager, compares each domain's [Policy] with
// what it observes (the keys in the [KeyStore], the records every
// authoritative server serves, its own [Store]) and takes the next step.
// It never signs mail itself; it decides which keys the relay may sign
// with ([Reconciler.Active]).
//
// # Lifecycle
//
//	planned -> generated -> published -> visible -> active -> retired -> revoked -> destroyed
//
// The states:
//
//   - planned: the selector is reserved in the state store; nothing exists
//     yet. Selectors come from the policy's template (default
//     {alg}{yyyymmdd}: rsa20261201, ed20261201), are one DNS label
//     (letters, digits, inner hyphens: RFC 6376 §3.1), get a "-2", "-3"...
//     suffix when taken, and are never used again for another key: a
//     destroyed key's record stays in the store as a tombstone, and a
//     selector the key store holds is also taken.
//   - generated: the key pair exists in the key store; its record value
//     ("v=DKIM1; k=...; p=...") is recorded.
//   - published: the publisher holds the record.
//   - visible: every authoritative server has served exactly that record
//     (one TXT record, that value) for the longest of the record's TTL and
//     the zone's negative-caching TTL (RFC 2308): from then on no resolver
//     can still hold "no such name" from before, or another value.
//     Should a server stop serving it exactly, the wait starts again.
//   - active: a probe message signed with the key (package signer, the
//     signing code the relay uses) has verified, with go-msgauth, against
//     the record as every server serves it at that moment. In the same
//     transaction the previous active key of the algorithm is retired:
//     never two active keys of one algorithm for a domain (the store
//     refuses such a write whatever the caller computed).
//   - retired: no longer signing; the record stays published for the
//     grace period, for mail in queues and later re-verification.
//   - revoked: the record is replaced by "v=DKIM1; p=" (RFC 6376 §3.6.1:
//     an empty p= means the key was revoked) for revoke_for.
//   - destroyed: the record is deleted, and the key destroyed in the key
//     store if dkimgw generated it. dkimgw never destroys a key it did not
//     create: an adopted key is left in the key store for its operator.
//
// A pass ([Reconciler.Reconcile]) takes at most one step per key, under
// the store's lock. It first adopts unknown keys, then plans a new key
// for each algorithm that needs one, then steps the keys on their way in,
// then (reading the state again) the active, retired and revoked ones, so
// that the key an activation retired is looked at in the same pass. A
// newly planned (or adopted) key takes its first step in the pass that
// recorded it.
//
// # When a new key is started
//
// For each algorithm of the policy: when there is no active key and none
// on its way in (the first run of a domain: until the first key is
// visible the domain has no active key, and the relay must answer 451);
// and when the active key is older than the interval less the time it
// itself took from planned to active, so that its successor is active
// about one interval after it. The measured lead is capped at half the
// interval, so that one slow publication (a DNS admin who publishes by
// hand, late) does not make rotation continuous. Estimating the lead
// from the predecessor rather than from the TTLs covers what TTLs do not
// show: slow secondaries, a manual publisher, the pass period.
//
// # Crash safety
//
// Each step observes before it acts and records after it acted, with a
// compare-and-set on the revision it read ([Change]). A crash (or kill -9)
// between any two of these leaves the old state recorded, and the next
// pass's observation shows the side effect done, so it is recorded, not
// repeated:
//
//   - planned -> generated: the selector was reserved before anything was
//     generated. A key under it in the key store is that generation's
//     result and is taken as is; only when there is none is one generated.
//   - generated -> published, retired -> revoked: the publisher is read
//     first; a name that already holds exactly the value is not written
//     again.
//   - published -> visible, visible -> active: observations and a probe,
//     no side effect outside the store; the activation and the retirement
//     of the predecessor are one transaction.
//   - revoked -> destroyed: the record is deleted only if the publisher
//     still holds one, the key destroyed only if the key store still holds
//     it; then the tombstone is written.
//   - A failed store write (or a crash after it) is the same: the next
//     pass reads what was written, or what was not, and goes on.
//
// A key in the key store under a managed domain that the state does not
// know (made by hand, or the state store was lost) is reported; it is
// adopted (as generated, not created by dkimgw) only when the policy lists
// its algorithm and no other key of that algorithm is on its way in.
//
// # Emergency rotation
//
// [Reconciler.Emergency] treats every key of a domain as compromised: the
// active keys are retired at once (they stop signing: a key that may be in
// someone else's hands must not sign one more message), keys on their way
// in are withdrawn, and all of them are revoked at once, without grace
// (since a crash may have published a withdrawn one). A new key per
// algorithm is planned, then generated and published at once, and
// activated as soon as it is visible. Until then the domain has no active
// key: [Reconciler.Active] lists none for it and the relay must answer
// 451, as for a domain's very first key. All of it is logged at WARN and
// ERROR and sent to the event sink with Emergency set.
//
// # Interfaces
//
// The package declares what it consumes, with its own types, so that it
// imports neither the token layer nor a DNS library (cmd/dkimgw adapts
// them):
//
//   - [KeyStore]: generate, list, get (a [crypto.Signer]) and destroy keys
//     named by (domain, selector).
//   - [Publisher]: get, set and delete TXT records of a zone, shaped like
//     libdns's record getter, setter and deleter.
//   - [Checker]: what each authoritative server of the zone serves for a
//     name, asked directly, with TTLs and the zone's negative TTL.
//   - [Store]: the state, transactional with a compare-and-set on each
//     key's revision, and a lock. [Bolt] is the embedded implementation
//     (one bbolt file under the data directory, whose flock is the lock; a
//     second reconciler waits as long as its context allows, then names
//     the holder's pid, host and start). Package etcdstore implements it
//     on etcd for several gateways: one transaction per update comparing
//     each key's version (and the domain's key range when a key becomes
//     active), and a lease-based election for the lock.
//   - [EventSink]: every transition, for the audit log; every transition
//     is also logged with log/slog.
//
// [Reconciler.Run] calls Reconcile periodically, recovers a panicking pass
// and carries on, and hands each [Report] to [Options.AfterPass] (the
// relay's keyring switch). [Reconciler.Status] lists every key with its
// next step and when it is due; [Reconciler.Pass] with DryRun says what a
// pass would do without doing it.
package rotation
