package main

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
)

// defaultConfig is where serve and config check look without --config.
const defaultConfig = "/etc/dkimgw/dkimgw.yaml"

const (
	configUsage = "config check [--config FILE]"
	configLong  = `
config check decodes the configuration strictly (an unknown key is an
error naming its line), validates it as a whole, then opens the token and
checks that every selector under domains: names a usable key: present,
non-extractable, and able to sign; for the rotating domains it builds the
reconciler (selector templates, publishers, TSIG secret files) without
contacting DNS or writing the rotation state. With state.type etcd it
connects to etcd and checks, without writing, that the gateway may read
and write under state.prefix. It serves nothing. Warnings (things
that are valid but risky, such as a client network wider than /16) go
to stderr and do not change the exit status.

Without hsm.uri, the token URI comes from $DKIMGW_HSM. An unknown key is
reported with the nearest known one ("did you mean max_idle?").

Exit status: 0 valid; 64 bad arguments; 69 a key is missing, or one
dkimgw refuses to sign with (RSA below 2048 bits, extractable, imported:
the same status as from 'sign' and 'keys dns'); 75 the token or the etcd state store is
unreachable (try again); 77 wrong or locked PIN; 78 the file is invalid,
or a bad pin-source, or no such token, or etcd refuses TLS, credentials
or permissions (with what to fix).`
)

var configCommand = &command{
	name:  "config",
	usage: configUsage,
	short: "validate a configuration file and the token keys it names",
	long:  configLong,
	run:   runConfig,
}

func runConfig(ctx context.Context, c *cli, args []string) int {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprintf(c.stdout, "usage: dkimgw %s\n%s\n", configUsage, configLong)
		return exitOK
	}
	if len(args) == 0 || args[0] != "check" {
		fmt.Fprintf(c.stderr, "usage: dkimgw %s\nrun 'dkimgw config --help' for more\n", configUsage)
		return exitUsage
	}
	fs := newFlagSet(c, "config check")
	path := fs.String("config", defaultConfig, "configuration `file`")
	var tf tokenFlags
	fs.DurationVar(&tf.timeout, "timeout", tokenTimeout, "give up on the token after this long")
	if code, ok := parseFlags(c, fs, configUsage, configLong, args[1:]); !ok {
		return code
	}
	cfg, err := loadConfig(c.getenv, *path)
	if err != nil {
		return failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	for _, w := range cfg.Warnings {
		fmt.Fprintf(c.stderr, "dkimgw: warning: %s\n", w)
	}
	ctx, cancel := tf.withTimeout(ctx)
	defer cancel()
	if code, err := checkState(ctx, cfg, c.stdout); err != nil {
		return failf(c, code, "%s: %v", *path, err)
	}
	if err := checkRotation(cfg); err != nil {
		return failf(c, exitConfig, "%s: %v", *path, err)
	}
	tok, err := hsm.Open(ctx, cfg.HSM.URI, hsm.Options{Logger: errorLogger(c), Getenv: c.getenv})
	if err != nil {
		return failToken(c, err, "%s: hsm.uri: %v", *path, err)
	}
	defer tok.Close()
	if _, err := checkKeys(ctx, tok, cfg, c.stdout); err != nil {
		return failToken(c, err, "%s: %v", *path, err)
	}
	fmt.Fprintf(c.stdout, "%s: OK (%d clients, %d domains, %d keys, %d rotating domains, %d warnings)\n", *path, len(cfg.Clients), len(cfg.Domains), len(cfg.Selectors()), len(cfg.Rotating()), len(cfg.Warnings))
	return exitOK
}

// stateCheckTimeout bounds connecting to the etcd state store and
// trying its permissions.
const stateCheckTimeout = 15 * time.Second

// checkState connects to an etcd state store and checks, without
// writing, that this gateway may read and write its prefix; the error
// says what to fix (unreachable: 75; TLS, credentials, permission: 78).
func checkState(ctx context.Context, cfg *policy.Config, w io.Writer) (int, error) {
	if cfg.State.Type != policy.StateEtcd {
		return exitOK, nil
	}
	ctx, cancel := context.WithTimeout(ctx, stateCheckTimeout)
	defer cancel()
	s, err := openState(cfg, cfg.SMTP.Hostname, slog.New(slog.DiscardHandler))
	if err == nil {
		err = s.Check(ctx)
		s.Close()
	}
	if err != nil {
		if storeUnavailable(err) {
			return exitTempFail, err
		}
		return exitConfig, err
	}
	fmt.Fprintf(w, "state: %s: ok (read and write permitted)\n", s)
	return exitOK, nil
}

// logWarnings tells the operator, at WARN, what the configuration's
// validation found suspicious but allowed.
func logWarnings(logger *slog.Logger, cfg *policy.Config) {
	for _, w := range cfg.Warnings {
		logger.Warn("configuration warning", "config", cfg.Path, "warning", w)
	}
}

// tokenTimeout bounds opening the token and checking the keys.
const tokenTimeout = 2 * time.Minute

// checkKeys checks that every configured selector has a usable key: it
// exists, the token calls it safe (hsm.Token.Key refuses extractable,
// imported and weak keys), and it signs (a test signature, which also
// proves the PIN and the session work). It reports each key to w (nil: no
// report) and returns the keys, or every problem found.
func checkKeys(ctx context.Context, tok *hsm.Token, cfg *policy.Config, w io.Writer) (map[policy.KeyRef]*hsm.Key, error) {
	keys := make(map[policy.KeyRef]*hsm.Key)
	var errs []error
	for _, ref := range cfg.Selectors() {
		key, err := tok.Key(ctx, ref.Domain, ref.Selector)
		if err != nil {
			errs = append(errs, fmt.Errorf("domains.%s.selectors: %s: %w", ref.Domain, ref.Selector, err))
			continue
		}
		if err := testSign(key); err != nil {
			errs = append(errs, fmt.Errorf("domains.%s.selectors: %s: test signature: %w", ref.Domain, ref.Selector, err))
			continue
		}
		if w != nil {
			fmt.Fprintf(w, "key %s._domainkey.%s: ok (%s, id %s)\n", ref.Selector, ref.Domain, key.Info().Algorithm, key.Info().IDHex())
		}
		keys[ref] = key
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return keys, nil
}

// testSign signs a digest the way the DKIM signer does (RSA: a SHA-256
// digest; Ed25519: the digest as the message, RFC 8463).
func testSign(key crypto.Signer) error {
	digest := sha256.Sum256([]byte("dkimgw key check"))
	var opts crypto.SignerOpts = crypto.SHA256
	if _, ok := key.Public().(ed25519.PublicKey); ok {
		opts = crypto.Hash(0)
	}
	_, err := key.Sign(rand.Reader, digest[:], opts)
	return err
}

// newLogger builds the process logger from the configuration's log
// settings; level is adjustable at run time (SIGHUP).
func newLogger(w io.Writer, cfg policy.Log, level *slog.LevelVar) *slog.Logger {
	level.Set(cfg.SlogLevel())
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// checkRotation builds the reconciler of the rotating domains, as serve
// and rotate will (selector templates, publishers, TSIG secrets), without
// touching the token, DNS or the state: data_dir is not created, and a
// missing one is only what serve will create.
func checkRotation(cfg *policy.Config) error {
	if len(cfg.Rotating()) == 0 {
		return nil
	}
	probe := *cfg
	if _, err := os.Stat(cfg.DataDir); err != nil {
		dir, err := os.MkdirTemp("", "dkimgw-config-check-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		probe.DataDir = dir
		probe.DNS.Publishers = maps.Clone(cfg.DNS.Publishers)
		for name, p := range probe.DNS.Publishers {
			if _, err := os.Stat(p.Dir); p.Type == policy.PublisherManual && err != nil {
				p.Dir = filepath.Join(dir, "manual", name)
				probe.DNS.Publishers[name] = p
			}
		}
	}
	setup, err := newRotation(&probe, nil, slog.New(slog.DiscardHandler), nil, 0)
	if err != nil {
		return err
	}
	return setup.Close()
}
