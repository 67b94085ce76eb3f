package rotation

import (
	"context"
	"crypto"
	"errors"
	"time"
)

// Algorithm is a key type and size, spelled as in the configuration
// ("rsa-2048", "rsa-3072", "rsa-4096", "ed25519").
type Algorithm string

// The algorithms a rotation policy may list.
const (
	RSA2048 Algorithm = "rsa-2048"
	RSA3072 Algorithm = "rsa-3072"
	RSA4096 Algorithm = "rsa-4096"
	Ed25519 Algorithm = "ed25519"
)

func (a Algorithm) valid() bool {
	switch a {
	case RSA2048, RSA3072, RSA4096, Ed25519:
		return true
	}
	return false
}

// short is the {alg} placeholder of selector templates: "rsa" or "ed".
func (a Algorithm) short() string {
	if a == Ed25519 {
		return "ed"
	}
	return "rsa"
}

// State is a key's place in the lifecycle. See the package documentation.
type State string

// The lifecycle, in order. StatePlanned is the recorded intent to
// generate: it exists so that a crash during generation is repaired by
// finding the key under its reserved selector, not by making another.
const (
	StatePlanned   State = "planned"
	StateGenerated State = "generated"
	StatePublished State = "published"
	StateVisible   State = "visible"
	StateActive    State = "active"
	StateRetired   State = "retired"
	StateRevoked   State = "revoked"
	StateDestroyed State = "destroyed"
)

// candidate reports whether s is before active: a key on its way in.
func (s State) candidate() bool {
	switch s {
	case StatePlanned, StateGenerated, StatePublished, StateVisible:
		return true
	}
	return false
}

// RevokedRecord is the value that replaces a withdrawn key's record: an
// empty p= means "this key has been revoked" (RFC 6376 §3.6.1), so a
// verifier fails signatures of the selector instead of treating it as
// unknown.
const RevokedRecord = "v=DKIM1; p="

// Key is the state store's record of one key of one domain. Selectors
// are never reused: a destroyed key's record stays, as a tombstone.
type Key struct {
	Domain    string    `json:"domain"`
	Selector  string    `json:"selector"`
	Algorithm Algorithm `json:"algorithm"`
	State     State     `json:"state"`
	// Rev is the store's revision of this record, set by the store. An
	// Update must name the revision it read (compare-and-set).
	Rev uint64 `json:"rev"`
	// Created is true when dkimgw generated the key; only such keys are
	// ever destroyed. An adopted key is left in the key store at the end.
	Created bool `json:"created"`
	// Compromised marks keys of an emergency rotation: they get no grace.
	Compromised bool `json:"compromised,omitempty"`
	// Record is the TXT value to publish, rendered from the public key.
	Record string `json:"record,omitempty"`

	// Since is when the key entered State.
	Since     time.Time `json:"since"`
	CreatedAt time.Time `json:"created_at"`
	// SeenEverywhere is when a published record was first served exactly
	// by every authoritative server; zero while it is not.
	SeenEverywhere time.Time `json:"seen_everywhere,omitzero"`
	// Wait is how long after SeenEverywhere the key becomes visible: the
	// largest of the record TTL and the zone's negative-caching TTL.
	Wait        time.Duration `json:"wait,omitempty"`
	ActivatedAt time.Time     `json:"activated_at,omitzero"`
	RetiredAt   time.Time     `json:"retired_at,omitzero"`
	RevokedAt   time.Time     `json:"revoked_at,omitzero"`
	// Note says why the key is waiting, or what last went wrong.
	Note string `json:"note,omitempty"`
}

// Change is one compare-and-set write of a Store.Update: Key is written
// if the stored record's revision is still Prev (0: no record for the
// selector may exist).
type Change struct {
	Prev uint64
	Key  Key
}

// ErrConflict is returned (wrapped) by Store.Update when a revision does
// not match, a selector is already used, or the write would leave two
// active keys of one algorithm for a domain. Nothing was written; the
// next pass reads again and decides again.
var ErrConflict = errors.New("state changed concurrently")

// Store is the reconciler's state store. Implementations must be safe for
// concurrent use and honour ctx. Keys and Update work with or without the
// lock held; Reconcile always holds it.
type Store interface {
	// Lock takes the store's exclusive lock, waiting no longer than ctx
	// allows; an error when ctx ends should say who holds the lock. The
	// returned func releases it.
	Lock(ctx context.Context) (unlock func() error, err error)
	// Keys returns every record of domain, tombstones included, sorted by
	// CreatedAt then selector.
	Keys(ctx context.Context, domain string) ([]Key, error)
	// Update writes all changes in one transaction, or none of them
	// (ErrConflict). Each written key gets Rev = Prev+1.
	Update(ctx context.Context, changes ...Change) error
}

// KeyInfo is a key the key store holds.
type KeyInfo struct {
	Domain    string
	Selector  string
	Algorithm Algorithm
}

// KeyStore is where keys live (a PKCS#11 token in production). Keys are
// named by (domain, selector); the private key never leaves the store.
type KeyStore interface {
	// GenerateKey generates a key pair for (domain, selector).
	GenerateKey(ctx context.Context, domain, selector string, alg Algorithm) (crypto.Signer, error)
	// Keys lists every key the store holds.
	Keys(ctx context.Context) ([]KeyInfo, error)
	// Key returns the key for (domain, selector), ready to sign.
	Key(ctx context.Context, domain, selector string) (crypto.Signer, error)
	// DestroyKey destroys the key for (domain, selector).
	DestroyKey(ctx context.Context, domain, selector string) error
}

// Record is a TXT record of a zone, shaped like libdns's: Name is relative
// to the zone ("rsa20261201._domainkey" in example.com.), Value the whole
// text, unsplit.
type Record struct {
	Name  string
	TTL   time.Duration
	Value string
}

// Publisher changes the records of a zone (an RFC 2136 server, a DNS
// provider's API, or a file a DNS admin loads by hand). zone is the
// zone's name with a trailing dot.
type Publisher interface {
	// GetRecords returns the TXT records the publisher knows of in zone;
	// at least those under _domainkey.
	GetRecords(ctx context.Context, zone string) ([]Record, error)
	// SetRecords makes each record's name hold exactly that value,
	// replacing the TXT records it had.
	SetRecords(ctx context.Context, zone string, recs []Record) error
	// DeleteRecords removes the TXT records with the records' names.
	DeleteRecords(ctx context.Context, zone string, recs []Record) error
}

// Served is what one authoritative server answered for a name.
type Served struct {
	Server string
	// Values are the TXT records served, each with its strings joined;
	// none when the name does not exist or has no TXT record.
	Values []string
	// TTL is the largest TTL of the answer's records.
	TTL time.Duration
	// Err is set when the server could not be asked or answered an error.
	Err error
}

// Observation is what every authoritative server of a zone serves for one
// name, asked directly (no recursive resolver, no cache).
type Observation struct {
	Servers []Served
	// NegativeTTL is the zone's negative-caching TTL (RFC 2308 §5: the
	// smaller of the SOA's TTL and MINIMUM): how long a resolver may keep
	// "no such name" from before the record existed.
	NegativeTTL time.Duration
}

// Checker asks the authoritative servers of zone what they serve for the
// fully qualified name (no trailing dot).
type Checker interface {
	Check(ctx context.Context, zone, name string) (Observation, error)
}

// Event is one lifecycle transition or noteworthy finding, for the audit
// log.
type Event struct {
	Time      time.Time
	Domain    string
	Selector  string
	Algorithm Algorithm
	From, To  State // equal when nothing changed (a warning)
	Emergency bool
	Message   string
}

// EventSink receives every transition. Event must not block for long: it
// is called with the store lock held.
type EventSink interface {
	Event(ctx context.Context, e Event)
}
