package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

const (
	stateUsage = "state migrate --config FILE --from bbolt:PATH|etcd --to etcd|bbolt:PATH [--force]"
	stateLong  = `
state migrate copies every record of the rotation state (each key of
each domain, destroyed ones included, as their selectors are never
reused) from one store to another: from a single gateway's bbolt file
to the etcd cluster of the configuration's state section, or back.

  bbolt:PATH   the bbolt store in directory PATH (a data_dir), or the
               file PATH/rotation.db itself
  etcd         the etcd store that state: {type: etcd, ...} of --config
               describes (endpoints, prefix, tls, username)

Stop the gateways (or their reconcilers) first: migrate holds both
stores' locks while it copies, and a reconciler that writes to the old
store afterwards writes where nobody reads. It refuses a destination
that already has records, unless --force: then a record of the same
domain and selector is overwritten and the destination's other records
stay (the store still refuses two active keys of one algorithm).

Exit status: 0 copied; 64 bad arguments; 66 the bbolt source does not
exist; 73 the destination has records (use --force); 75 a store is
unreachable or locked by a reconciler: try again; 78 the configuration
is invalid or has no etcd state section; 1 anything else.`
)

var stateCommand = &command{
	name:  "state",
	usage: stateUsage,
	short: "move the rotation state between bbolt and etcd",
	long:  stateLong,
	run:   runState,
}

// migrateBatch bounds the records written in one transaction: etcd
// refuses a transaction of more than --max-txn-ops operations (128 by
// default), and each record is a comparison and a write.
const migrateBatch = 50

// migrateTimeout bounds the whole migration.
const migrateTimeout = 2 * time.Minute

func runState(ctx context.Context, c *cli, args []string) int {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprintf(c.stdout, "usage: dkimgw %s\n%s\n", stateUsage, stateLong)
		return exitOK
	}
	if len(args) == 0 || args[0] != "migrate" {
		fmt.Fprintf(c.stderr, "usage: dkimgw %s\nrun 'dkimgw state --help' for more\n", stateUsage)
		return exitUsage
	}
	fs := newFlagSet(c, "state migrate")
	path := fs.String("config", defaultConfig, "configuration `file` (its state section is the etcd store)")
	from := fs.String("from", "", "the source: bbolt:PATH or etcd")
	to := fs.String("to", "", "the destination: etcd or bbolt:PATH")
	force := fs.Bool("force", false, "write into a destination that already has records")
	if code, ok := parseFlags(c, fs, stateUsage, stateLong, args[1:]); !ok {
		return code
	}
	fromBolt, fromOK := boltPath(*from)
	toBolt, toOK := boltPath(*to)
	if !(fromOK && *to == "etcd") && !(*from == "etcd" && toOK) {
		return failf(c, exitUsage, "state migrate: want --from bbolt:PATH --to etcd, or --from etcd --to bbolt:PATH (got --from %q --to %q)", *from, *to)
	}
	cfg, err := loadConfig(c.getenv, *path)
	if err != nil {
		return failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	if cfg.State.Type != policy.StateEtcd {
		return failf(c, exitConfig, "%s: state.type is %q: migrate needs the etcd store's settings (state: {type: etcd, endpoints: [...]})", *path, cfg.State.Type)
	}
	if fromOK {
		if _, err := os.Stat(filepath.Join(fromBolt, rotation.BoltFile)); err != nil {
			return failf(c, exitNoInput, "state migrate: source %s: %v", *from, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, migrateTimeout)
	defer cancel()
	logger := errorLogger(c)
	etcd, err := openEtcd(cfg.State, "dkimgw state migrate", logger)
	if err != nil {
		return failf(c, setupExitCode(err), "%s: %v", *path, err)
	}
	defer etcd.Close()
	boltDir := fromBolt
	if toOK {
		boltDir = toBolt
	}
	b, err := rotation.OpenBolt(boltDir)
	if err != nil {
		return failf(c, exitCantCreate, "state migrate: %v", err)
	}
	bs := &stateStore{Store: b, bolt: b}
	src, dst := bs, etcd
	if toOK {
		src, dst = etcd, bs
	}
	n, err := migrate(ctx, src, dst, *force)
	if err != nil {
		var ne *notEmptyError
		switch {
		case errors.As(err, &ne):
			return failf(c, exitCantCreate, "state migrate: %v", err)
		case storeUnavailable(err), isLocked(err), errors.Is(err, context.DeadlineExceeded):
			return failf(c, exitTempFail, "state migrate: %v", err)
		}
		return failf(c, exitFailure, "state migrate: %v", err)
	}
	fmt.Fprintf(c.stdout, "copied %d records from %s to %s\n", n, src, dst)
	return exitOK
}

// boltPath parses "bbolt:PATH" into the data directory.
func boltPath(arg string) (string, bool) {
	p, ok := strings.CutPrefix(arg, "bbolt:")
	if !ok || p == "" {
		return "", false
	}
	if filepath.Base(p) == rotation.BoltFile {
		p = filepath.Dir(p)
	}
	return p, true
}

func isLocked(err error) bool {
	var le *rotation.LockedError
	return errors.As(err, &le)
}

// notEmptyError is a destination that has records without --force.
type notEmptyError struct {
	dst     string
	domains []string
}

func (e *notEmptyError) Error() string {
	return fmt.Sprintf("the destination %s already has records (domains %s): nothing copied; use --force to write over them", e.dst, strings.Join(e.domains, ", "))
}

// migrator is what migrate needs of a store.
type migrator interface {
	rotation.Store
	Domains(ctx context.Context) ([]string, error)
	String() string
}

func (s *stateStore) Domains(ctx context.Context) ([]string, error) {
	if s.etcd != nil {
		return s.etcd.Domains(ctx)
	}
	return s.bolt.Domains(ctx)
}

// migrate copies every record of src into dst, holding both locks, and
// returns how many it wrote. Without force, a dst with records is
// refused before anything is written.
func migrate(ctx context.Context, src, dst migrator, force bool) (int, error) {
	unlockSrc, err := src.Lock(ctx)
	if err != nil {
		return 0, fmt.Errorf("lock the source: %w", err)
	}
	defer unlockSrc()
	unlockDst, err := dst.Lock(ctx)
	if err != nil {
		return 0, fmt.Errorf("lock the destination: %w", err)
	}
	defer unlockDst()
	have, err := dst.Domains(ctx)
	if err != nil {
		return 0, fmt.Errorf("read the destination: %w", err)
	}
	if len(have) > 0 && !force {
		return 0, &notEmptyError{dst: dst.String(), domains: have}
	}
	domains, err := src.Domains(ctx)
	if err != nil {
		return 0, fmt.Errorf("read the source: %w", err)
	}
	n := 0
	for _, d := range domains {
		keys, err := src.Keys(ctx, d)
		if err != nil {
			return n, fmt.Errorf("read the source's %s: %w", d, err)
		}
		old, err := dst.Keys(ctx, d)
		if err != nil {
			return n, fmt.Errorf("read the destination's %s: %w", d, err)
		}
		prev := map[string]uint64{}
		for _, k := range old {
			prev[k.Selector] = k.Rev
		}
		// Records that are no longer active go first, so that a forced
		// copy over an older state never has two active keys of one
		// algorithm in between.
		var changes []rotation.Change
		for _, active := range []bool{false, true} {
			for _, k := range keys {
				if (k.State == rotation.StateActive) == active {
					changes = append(changes, rotation.Change{Prev: prev[k.Selector], Key: k})
				}
			}
		}
		for len(changes) > 0 {
			batch := changes[:min(migrateBatch, len(changes))]
			changes = changes[len(batch):]
			if err := dst.Update(ctx, batch...); err != nil {
				return n, fmt.Errorf("write %s to the destination (%d records copied so far): %w", d, n, err)
			}
			n += len(batch)
		}
	}
	return n, nil
}
