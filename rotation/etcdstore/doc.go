// Package etcdstore is the rotation state store shared by several
// gateways: a [rotation.Store] on etcd (go.etcd.io/etcd/client/v3), with
// a lock whose holder can die without leaving it taken, an [Election]
// that chooses the one gateway whose reconciler acts, and a watch
// ([Store.Watch]) that tells every gateway of each transition within
// moments, so that all switch to a newly active key together. The
// embedded [rotation.Bolt] stays the store of a single gateway.
//
// It is a package of its own so that the rotation logic, and a gateway
// that keeps its state in bbolt, do not link the etcd client and gRPC.
//
// # Key layout
//
// Everything lives under one prefix (Options.Prefix, default "/dkimgw/"),
// so that several deployments can share a cluster and an etcd role can be
// limited to it:
//
//	<prefix>keys/<domain>/<selector>  one JSON record (rotation.Key) per key, tombstones included
//	<prefix>lock/<lease id>           the lock's candidates (concurrency.Election), on their leases
//	<prefix>leader/<lease id>         the election's candidates, on their leases
//
// The value of a lock or leader key names the gateway ([Participant]:
// name, pid, host, since), which is how a waiter says who holds the lock
// and how [Election.Leader] says who leads. A record's [rotation.Key.Rev]
// is the etcd version of its key: the number of writes since it was
// created, so that a write at Prev leaves it at Prev+1, as the contract
// says. Records are never deleted (a destroyed key stays as a
// tombstone), so a version never goes back.
//
// # The transaction
//
// [Store.Update] is one etcd transaction (Txn) whatever the number of
// changes. Its comparisons:
//
//   - for each changed record, that its version is still the one the
//     caller read (Change.Prev; 0: the key must not exist). This is the
//     compare-and-set: of two gateways moving one key from the same
//     revision, exactly one succeeds, and the other gets
//     [rotation.ErrConflict] and decides again on its next pass.
//   - for each domain where the update makes a key active: the store
//     reads the domain's records first, checks that the result has at
//     most one active key per algorithm (refusing with ErrConflict if
//     not), and the transaction then compares that no record of the
//     domain has changed since that read (a comparison on the mod
//     revision of the domain's whole key range). The check and the
//     write therefore see the same state: two gateways activating two
//     keys of one algorithm at once cannot both succeed, whatever each
//     computed. An update that activates nothing cannot add an active
//     key and compares only its own records.
//   - while this store holds the lock: that its lock key still exists
//     (fencing). A holder that lost its lease (a pause, or etcd out of
//     reach for longer than the TTL) writes nothing more: [ErrLockLost].
//
// When a comparison fails nothing is written, and the error says which
// record moved.
//
// # Lock and election
//
// [Store.Lock] and [Election] are both a concurrency.Election on a lease
// of Options.TTL (default 10 s) kept alive by the process. A holder that
// exits unlocks at once (its lease is revoked); one that is killed, or
// loses its network, holds on only until its lease expires, and the next
// in line takes over then. A lock waiter whose context ends gets a
// [rotation.LockedError] naming the holder. The lock serialises
// reconciler passes (and `dkimgw rotate` run by hand) exactly as the
// bbolt lock does; the election decides which gateway runs its
// reconciler loop at all: [Election.Lead] runs a function (the loop)
// with a context that ends when the leadership does. Leadership is a
// hint: for a moment around an expiry two gateways may both believe they
// lead, which is harmless because each pass also takes the lock and every
// write compares revisions.
//
// # When etcd is down
//
// Every call is bounded by Options.CallTimeout (default 5 s) and fails
// with an [*UnavailableError] (Temporary) when no majority of members
// answers: the lifecycle pauses, and the next pass, after etcd returns,
// goes on from what the store holds. A write that failed so may or may
// not have been applied; the next pass reads before it decides. A
// leader loses its leadership once its lease cannot be renewed for the
// TTL ([Election.Done] closes), and campaigns again when etcd answers.
// The watch sends an event with Err set and tries again every second; it
// starts over with a Full event once it can read.
//
// For the wiring into the gateway: signing must go on while etcd is
// down. A gateway keeps signing with the active keys of the last view it
// had (from the watch) and only the lifecycle pauses; a gateway that
// starts while etcd is down has no view, and answers 451 for the domains
// it has no active key for, as on a first run. With a username set, Open
// authenticates at once and fails while etcd is unreachable: the caller
// retries it.
//
// # Security
//
// The store holds no secret: key names, states, timestamps and the
// public DKIM records. Private keys stay in the token; PINs and TSIG
// secrets are never written here. etcd still decides which selector the
// gateways sign with, so access to the prefix must be limited: run etcd
// with TLS (https:// endpoints; Options.CAFile verifies the members,
// CertFile and KeyFile are the client's certificate for members that
// require one) and with authentication (Username, and a Password the
// caller reads from a file), with a role that has readwrite permission
// on the prefix only. [Store.Check] tells, without writing, whether the
// endpoints answer, TLS works, the credentials are accepted and the
// permission is there, and says what to fix.
package etcdstore
