package audit

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/dkimgw/dkimgw/internal/fsync"
)

// Event names. Rotation transitions are "key " + the state entered
// (key published, key visible, key active, ...).
const (
	EventKeyGenerated   = "key generated"
	EventKeyDestroyed   = "key destroyed"
	EventRotateRun      = "rotate run"
	EventEmergency      = "emergency rotation"
	EventConfigLoaded   = "config loaded"
	EventReloadRefused  = "reload refused"
	EventLoginFailed    = "token login failed"
	EventUnauthorized   = "authorization refused"
	EventDrift          = "dns drift"
	EventCheckpoint     = "checkpoint"
	EventRotationStatus = "rotation warning"
)

// Event is what a caller records; the log adds time, actor, host,
// sequence number and chain hash.
type Event struct {
	Event    string
	Domain   string
	Selector string
	KeyID    string
	Details  map[string]any
}

// Record is one line of the log.
type Record struct {
	Seq      uint64         `json:"seq"`
	Time     time.Time      `json:"time"`
	Actor    string         `json:"actor"`
	Host     string         `json:"host"`
	Event    string         `json:"event"`
	Domain   string         `json:"domain,omitempty"`
	Selector string         `json:"selector,omitempty"`
	KeyID    string         `json:"key_id,omitempty"`
	Details  map[string]any `json:"details,omitempty"`
	// Sig is a checkpoint's signature (base64) of the chain head Prev,
	// made by the audit key KeyID (see the package documentation).
	Sig    string `json:"sig,omitempty"`
	SigAlg string `json:"sig_alg,omitempty"`
	Prev   string `json:"prev"`
}

// genesis is the prev of the first record.
var genesis = hex.EncodeToString(make([]byte, sha256.Size))

// LineHash is the chain hash of one line (without its newline).
func LineHash(line []byte) string {
	h := sha256.Sum256(line)
	return hex.EncodeToString(h[:])
}

// CheckpointDigest is what the checkpoint with sequence number seq and
// chain head prev signs (see the package documentation).
func CheckpointDigest(seq uint64, prev string) []byte {
	h := sha256.Sum256([]byte("dkimgw-audit-checkpoint\n" + strconv.FormatUint(seq, 10) + "\n" + prev))
	return h[:]
}

// KeyID is the audit key's identifier in checkpoints: the hex SHA-256 of
// its SubjectPublicKeyInfo, first 16 bytes.
func KeyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("audit: marshal the audit public key: %w", err)
	}
	h := sha256.Sum256(der)
	return hex.EncodeToString(h[:16]), nil
}

// Options configure a Log.
type Options struct {
	// Actor is who acts: "serve", or the Unix user of a CLI command.
	Actor string
	// Host is the machine's name. Empty: os.Hostname.
	Host string
	// Sealer signs checkpoints (the token's audit key). Nil: the log
	// writes no checkpoint; Checkpoint returns ErrNoSealer.
	Sealer Sealer
	// Now is the clock; nil: time.Now.
	Now func() time.Time
}

// Sealer is the audit key: a crypto.Signer whose signatures may block on
// a token, bounded by ctx.
type Sealer interface {
	Public() crypto.PublicKey
	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

// ErrNoSealer is returned by Checkpoint on a log without an audit key.
var ErrNoSealer = errors.New("audit: no audit key to sign checkpoints with")

// Log appends records to one audit file. It is safe for concurrent use,
// and several processes may append to the same file.
type Log struct {
	path  string
	actor string
	host  string
	now   func() time.Time

	mu     sync.Mutex // serialises this process's appends; flock serialises processes
	sealer Sealer
}

// Open prepares the log at path: it creates the file (mode 0600) and its
// directory when missing, and checks it can be locked and written. It
// keeps no descriptor open: each append opens the file again, so that a
// log rotated by a tool (renamed away) is recreated rather than written
// behind its back.
func Open(path string, opts Options) (*Log, error) {
	if path == "" {
		return nil, errors.New("audit: no path for the audit log")
	}
	l := &Log{path: path, actor: opts.Actor, host: opts.Host, now: opts.Now, sealer: opts.Sealer}
	if l.host == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("audit: host name: %w", err)
		}
		l.host = h
	}
	if l.now == nil {
		l.now = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("audit: create the directory of %s: %w", path, err)
	}
	_, statErr := os.Stat(path)
	f, err := l.openLocked()
	if err != nil {
		return nil, err
	}
	f.Close()
	if os.IsNotExist(statErr) {
		// A new file's name must survive a crash as well as its records.
		if err := fsync.Dir(filepath.Dir(path)); err != nil {
			return nil, fmt.Errorf("audit: fsync the directory of %s: %w", path, err)
		}
	}
	return l, nil
}

// Path is the log's file.
func (l *Log) Path() string { return l.path }

// SetSealer sets the key that signs checkpoints (nil: none).
func (l *Log) SetSealer(s Sealer) {
	l.mu.Lock()
	l.sealer = s
	l.mu.Unlock()
}

// openLocked opens the file for appending and takes its exclusive lock;
// closing the file releases it.
func (l *Log) openLocked() (*os.File, error) {
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open %s: %w; check audit.path and its permissions", l.path, err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit: lock %s: %w", l.path, err)
	}
	return f, nil
}

// tail is the chain head: the last line's record and hash.
type tail struct {
	seq        uint64
	hash       string
	checkpoint bool // the last record is a checkpoint
	torn       bool // the file does not end with a newline
}

// readTail reads the last line of f.
func readTail(f *os.File) (tail, error) {
	fi, err := f.Stat()
	if err != nil {
		return tail{}, fmt.Errorf("audit: stat %s: %w", f.Name(), err)
	}
	size := fi.Size()
	if size == 0 {
		return tail{hash: genesis}, nil
	}
	// Read backwards in chunks until the start of the last line.
	const chunk = 64 << 10
	var buf []byte
	end := size
	for {
		start := max(end-chunk, 0)
		b := make([]byte, end-start)
		if _, err := f.ReadAt(b, start); err != nil && !errors.Is(err, io.EOF) {
			return tail{}, fmt.Errorf("audit: read %s: %w", f.Name(), err)
		}
		buf = append(b, buf...)
		body := buf
		if len(body) > 0 && body[len(body)-1] == '\n' {
			body = body[:len(body)-1]
		}
		if i := bytes.LastIndexByte(body, '\n'); i >= 0 || start == 0 {
			t := tail{torn: buf[len(buf)-1] != '\n'}
			line := body[i+1:]
			t.hash = LineHash(line)
			var r Record
			if err := json.Unmarshal(line, &r); err != nil || t.torn {
				// A torn or unreadable last line: the new record chains to
				// it as it is, and verify-log reports it as broken.
				t.seq = 0
				if err == nil {
					t.seq = r.Seq
				}
				return t, nil
			}
			t.seq, t.checkpoint = r.Seq, r.Event == EventCheckpoint
			return t, nil
		}
		end = start
	}
}

// Record appends one record and fsyncs it before returning: when it
// returns nil, the record is on disk.
func (l *Log) Record(ctx context.Context, e Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err := l.append(ctx, func(t tail) (*Record, error) {
		return &Record{Event: e.Event, Domain: e.Domain, Selector: e.Selector, KeyID: e.KeyID, Details: e.Details}, nil
	})
	return err
}

// Checkpoint appends a checkpoint sealing every record before it, unless
// the last record is a checkpoint already (nothing new to seal). It
// returns whether it wrote one.
//
// The token signs without the log locked: a token call can take long (a
// network HSM, a lost session), and records must not wait for it. When
// another record came in meanwhile, the head is signed again, up to
// checkpointTries times; after that the next checkpoint seals them.
func (l *Log) Checkpoint(ctx context.Context) (bool, error) {
	l.mu.Lock()
	sealer := l.sealer
	l.mu.Unlock()
	if sealer == nil {
		return false, ErrNoSealer
	}
	keyID, err := KeyID(sealer.Public())
	if err != nil {
		return false, err
	}
	alg, opts, err := sigAlg(sealer.Public())
	if err != nil {
		return false, err
	}
	for range checkpointTries {
		head, err := l.head(ctx)
		if err != nil {
			return false, err
		}
		if head.checkpoint || head.seq == 0 && head.hash == genesis {
			return false, nil
		}
		sig, err := sealer.SignContext(ctx, CheckpointDigest(head.seq+1, head.hash), opts)
		if err != nil {
			return false, fmt.Errorf("audit: sign a checkpoint: %w", err)
		}
		l.mu.Lock()
		moved := false
		wrote, err := l.append(ctx, func(t tail) (*Record, error) {
			if t.seq != head.seq || t.hash != head.hash {
				moved = true
				return nil, nil
			}
			return &Record{Event: EventCheckpoint, KeyID: keyID, SigAlg: alg, Sig: base64.StdEncoding.EncodeToString(sig)}, nil
		})
		l.mu.Unlock()
		if !moved {
			return wrote, err
		}
	}
	return false, nil
}

// checkpointTries bounds the signatures of one Checkpoint on a busy log.
const checkpointTries = 3

// head reads the chain head under the lock.
func (l *Log) head(ctx context.Context) (tail, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var head tail
	_, err := l.append(ctx, func(t tail) (*Record, error) {
		head = t
		return nil, nil
	})
	return head, err
}

func sigAlg(pub crypto.PublicKey) (string, crypto.SignerOpts, error) {
	switch pub.(type) {
	case ed25519.PublicKey:
		return "ed25519", crypto.Hash(0), nil
	case *rsa.PublicKey:
		return "rsa-sha256", crypto.SHA256, nil
	}
	return "", nil, fmt.Errorf("audit: the audit key is a %T; it must be RSA or Ed25519", pub)
}

// append writes the record build makes from the chain head (nil: write
// nothing) under the file lock.
func (l *Log) append(ctx context.Context, build func(tail) (*Record, error)) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, fmt.Errorf("audit: %w", err)
	}
	f, err := l.openLocked()
	if err != nil {
		return false, err
	}
	defer f.Close()
	t, err := readTail(f)
	if err != nil {
		return false, err
	}
	r, err := build(t)
	if r == nil || err != nil {
		return false, err
	}
	r.Seq, r.Prev, r.Time, r.Actor, r.Host = t.seq+1, t.hash, l.now().UTC(), l.actor, l.host
	line, err := json.Marshal(r)
	if err != nil {
		return false, fmt.Errorf("audit: encode a record: %w", err)
	}
	var out []byte
	if t.torn {
		out = append(out, '\n')
	}
	out = append(append(out, line...), '\n')
	if _, err := f.Write(out); err != nil {
		return false, fmt.Errorf("audit: write %s: %w", l.path, err)
	}
	if err := f.Sync(); err != nil {
		return false, fmt.Errorf("audit: fsync %s: %w", l.path, err)
	}
	return true, nil
}
