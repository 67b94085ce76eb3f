package rotation

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// BoltFile is the state file's name under the data directory.
const BoltFile = "rotation.db"

// lockPoll is how often a waiting Lock tries the file lock again.
const lockPoll = 50 * time.Millisecond

// Bolt is the embedded state store: one bbolt file, one bucket per
// domain, one JSON record per selector. The file itself is the lock:
// bbolt takes an exclusive flock when it opens a file for writing, so a
// second process (or a second Bolt on the same file) waits until the
// first closes it, and a crashed holder's lock goes with its process.
// The holder's pid, host and start time are written next to the file
// (BoltFile + ".owner") so that a waiter can say who it waits for.
//
// The file is open only while the lock is held (or for the duration of
// one Keys or Update call without it), so that `rotate status` can read
// between the passes of a running reconciler.
type Bolt struct {
	path string

	// mu guards db and held. Calls on the held database keep a read lock
	// for their duration, so that unlock closes it only after them.
	mu     sync.RWMutex
	sem    chan struct{}
	db     *bolt.DB
	held   bool
	nowFn  func() time.Time
	hostFn func() (string, error)
	// noSync skips fsync: for tests, whose "crashes" are of the process,
	// not of the machine.
	noSync bool
}

var _ Store = (*Bolt)(nil)

// OpenBolt returns the store in dir/BoltFile, creating dir if needed. It
// does not open the file yet.
func OpenBolt(dir string) (*Bolt, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("rotation: create data directory: %w", err)
	}
	return &Bolt{path: filepath.Join(dir, BoltFile), sem: make(chan struct{}, 1), nowFn: time.Now, hostFn: os.Hostname}, nil
}

// Path is the state file.
func (b *Bolt) Path() string { return b.path }

// Owner is who holds a store's lock.
type Owner struct {
	PID   int       `json:"pid"`
	Host  string    `json:"host"`
	Since time.Time `json:"since"`
}

// LockedError is returned when ctx ended while waiting for the lock.
type LockedError struct {
	Path  string
	Owner *Owner // nil when the owner file could not be read
	Err   error  // ctx's error
}

func (e *LockedError) Error() string {
	if e.Owner == nil {
		return fmt.Sprintf("rotation: state store %s is locked by another reconciler: %v", e.Path, e.Err)
	}
	return fmt.Sprintf("rotation: state store %s is locked by pid %d on %s since %s; wait for it to finish, or stop it: %v",
		e.Path, e.Owner.PID, e.Owner.Host, e.Owner.Since.UTC().Format(time.RFC3339), e.Err)
}

func (e *LockedError) Unwrap() error { return e.Err }

// open opens the file, waiting for its flock no longer than ctx allows.
func (b *Bolt) open(ctx context.Context, readOnly bool) (*bolt.DB, error) {
	if readOnly {
		// A reader must not open a file a writer has created but not yet
		// initialised: bbolt would try to initialise it through a
		// read-only descriptor (EBADF). Until it has data, the store is
		// empty. A writer initialises under its exclusive flock, so a
		// file with data is either complete or waited for.
		if fi, err := os.Stat(b.path); errors.Is(err, os.ErrNotExist) || (err == nil && fi.Size() == 0) {
			return nil, nil
		}
	}
	for {
		// A timeout shorter than bbolt's own retry makes Open try the
		// flock once; the wait is here, where ctx can end it.
		db, err := bolt.Open(b.path, 0o600, &bolt.Options{Timeout: time.Nanosecond, ReadOnly: readOnly, NoSync: b.noSync})
		if readOnly && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		if err == nil {
			return db, nil
		}
		if !errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("rotation: open state store %s: %w", b.path, err)
		}
		t := time.NewTimer(lockPoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, &LockedError{Path: b.path, Owner: b.owner(), Err: ctx.Err()}
		case <-t.C:
		}
	}
}

func (b *Bolt) owner() *Owner {
	data, err := os.ReadFile(b.path + ".owner")
	if err != nil {
		return nil
	}
	var o Owner
	if json.Unmarshal(data, &o) != nil {
		return nil
	}
	return &o
}

// Lock opens the store exclusively until unlock is called.
func (b *Bolt) Lock(ctx context.Context) (func() error, error) {
	// Goroutines sharing this Bolt queue here; other Bolts and processes
	// on the flock.
	select {
	case b.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, &LockedError{Path: b.path, Owner: b.owner(), Err: ctx.Err()}
	}
	db, err := b.open(ctx, false)
	if err != nil {
		<-b.sem
		return nil, err
	}
	host, _ := b.hostFn()
	o, _ := json.Marshal(Owner{PID: os.Getpid(), Host: host, Since: b.nowFn().UTC()})
	// Best effort: the owner file only improves the waiter's message.
	_ = os.WriteFile(b.path+".owner", o, 0o600)
	b.mu.Lock()
	b.db, b.held = db, true
	b.mu.Unlock()
	var once sync.Once
	return func() error {
		var err error
		once.Do(func() {
			b.mu.Lock() // waits for calls on db in flight
			b.db, b.held = nil, false
			b.mu.Unlock()
			_ = os.Remove(b.path + ".owner")
			if cerr := db.Close(); cerr != nil {
				err = fmt.Errorf("rotation: close state store %s: %w", b.path, cerr)
			}
			<-b.sem
		})
		return err
	}, nil
}

// with runs fn on the held database, or on one opened for the call.
func (b *Bolt) with(ctx context.Context, readOnly bool, fn func(*bolt.DB) error) error {
	b.mu.RLock()
	if b.held {
		defer b.mu.RUnlock()
		return fn(b.db)
	}
	b.mu.RUnlock()
	db, err := b.open(ctx, readOnly)
	if err != nil {
		return err
	}
	if db == nil { // read-only and no file yet: an empty store
		return nil
	}
	defer db.Close()
	return fn(db)
}

// Keys returns the domain's records.
func (b *Bolt) Keys(ctx context.Context, domain string) ([]Key, error) {
	var keys []Key
	err := b.with(ctx, true, func(db *bolt.DB) error {
		return db.View(func(tx *bolt.Tx) error {
			bk := tx.Bucket([]byte(domain))
			if bk == nil {
				return nil
			}
			return bk.ForEach(func(k, v []byte) error {
				var key Key
				if err := json.Unmarshal(v, &key); err != nil {
					return fmt.Errorf("rotation: state store %s: record %s/%s is corrupt: %w", b.path, domain, k, err)
				}
				keys = append(keys, key)
				return nil
			})
		})
	})
	sortKeys(keys)
	return keys, err
}

// Domains lists the domains the store has records of, sorted: for
// moving a whole state to another store (`dkimgw state migrate`).
func (b *Bolt) Domains(ctx context.Context) ([]string, error) {
	var out []string
	err := b.with(ctx, true, func(db *bolt.DB) error {
		return db.View(func(tx *bolt.Tx) error {
			return tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
				out = append(out, string(name))
				return nil
			})
		})
	})
	return out, err
}

func sortKeys(keys []Key) {
	sort.SliceStable(keys, func(i, j int) bool {
		if !keys[i].CreatedAt.Equal(keys[j].CreatedAt) {
			return keys[i].CreatedAt.Before(keys[j].CreatedAt)
		}
		return keys[i].Selector < keys[j].Selector
	})
}

// Update applies changes in one bbolt transaction.
func (b *Bolt) Update(ctx context.Context, changes ...Change) error {
	return b.with(ctx, false, func(db *bolt.DB) error {
		return db.Update(func(tx *bolt.Tx) error {
			touched := map[string]bool{}
			for _, c := range changes {
				bk, err := tx.CreateBucketIfNotExists([]byte(c.Key.Domain))
				if err != nil {
					return fmt.Errorf("rotation: state store %s: %w", b.path, err)
				}
				var rev uint64
				if v := bk.Get([]byte(c.Key.Selector)); v != nil {
					var old Key
					if err := json.Unmarshal(v, &old); err != nil {
						return fmt.Errorf("rotation: state store %s: record %s/%s is corrupt: %w", b.path, c.Key.Domain, c.Key.Selector, err)
					}
					rev = old.Rev
				}
				if rev != c.Prev {
					return fmt.Errorf("rotation: %w: %s/%s is at revision %d, not %d", ErrConflict, c.Key.Domain, c.Key.Selector, rev, c.Prev)
				}
				k := c.Key
				k.Rev = c.Prev + 1
				v, err := json.Marshal(k)
				if err != nil {
					return fmt.Errorf("rotation: encode %s/%s: %w", k.Domain, k.Selector, err)
				}
				if err := bk.Put([]byte(k.Selector), v); err != nil {
					return fmt.Errorf("rotation: state store %s: %w", b.path, err)
				}
				touched[k.Domain] = true
			}
			// The one invariant the store itself guarantees, whatever the
			// caller computed: never two active keys of one algorithm.
			for d := range touched {
				active := map[Algorithm]string{}
				err := tx.Bucket([]byte(d)).ForEach(func(k, v []byte) error {
					var key Key
					if err := json.Unmarshal(v, &key); err != nil {
						return err
					}
					if key.State != StateActive {
						return nil
					}
					if other, ok := active[key.Algorithm]; ok && !bytes.Equal([]byte(other), k) {
						return fmt.Errorf("rotation: %w: %s would have two active %s keys (%s and %s)", ErrConflict, d, key.Algorithm, other, k)
					}
					active[key.Algorithm] = string(k)
					return nil
				})
				if err != nil {
					return err
				}
			}
			return nil
		})
	})
}
