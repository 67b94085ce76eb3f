package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
)

// hsmEnv names the environment variable that holds the token URI when
// --hsm is not given: keeping a pin-source URI in the environment keeps it
// out of shell history and process listings.
const hsmEnv = "DKIMGW_HSM"

// tokenFlags are the flags every command that opens the token shares.
type tokenFlags struct {
	uri     string
	timeout time.Duration
}

func (f *tokenFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.uri, "hsm", "", "PKCS#11 URI of the token (default $"+hsmEnv+"), e.g.\n"+
		"pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin")
	fs.DurationVar(&f.timeout, "timeout", 2*time.Minute, "give up on the token after this long")
}

// open opens the token named by --hsm or $DKIMGW_HSM. It returns the exit
// status to use when it fails, after printing the reason.
func (f *tokenFlags) open(ctx context.Context, c *cli, logger *slog.Logger) (*hsm.Token, int) {
	uri := f.uri
	if uri == "" {
		uri = c.getenv(hsmEnv)
	}
	if uri == "" {
		return nil, failf(c, exitUsage, "no token: give --hsm URI or set %s", hsmEnv)
	}
	tok, err := hsm.Open(ctx, uri, hsm.Options{Logger: logger, Getenv: c.getenv})
	if err != nil {
		return nil, failToken(c, err, "%v", err)
	}
	return tok, exitOK
}

// tokenExitCode maps a token error to a sysexits(3) status, so that
// scripts can tell "try again later" from "fix something first". A token
// that is not there when a command starts is a configuration error (a
// wrong label, or SoftHSM looking in another directory); serve's own
// recovery treats one lost later as temporary, without coming here.
func tokenExitCode(err error) int {
	switch {
	case errors.Is(err, hsm.ErrPINIncorrect), errors.Is(err, hsm.ErrPINLocked):
		return 77 // EX_NOPERM
	case errors.Is(err, hsm.ErrInvalidURI), errors.Is(err, hsm.ErrModuleNotFound),
		errors.Is(err, hsm.ErrPINSource), errors.Is(err, hsm.ErrTokenNotFound):
		return exitConfig
	case errors.Is(err, hsm.ErrInvalidName), errors.Is(err, hsm.ErrUnknownAlgorithm):
		return exitUsage
	case errors.Is(err, hsm.ErrKeyExists):
		return 73 // EX_CANTCREAT
	case errors.Is(err, hsm.ErrKeyNotFound), errors.Is(err, hsm.ErrMechanismMissing):
		return exitUnavailable
	case errors.Is(err, hsm.ErrUnsafeKey), errors.Is(err, hsm.ErrWeakKey):
		return exitKeyUnusable
	case hsm.IsTemporary(err), errors.Is(err, context.DeadlineExceeded):
		return exitTempFail
	}
	return exitFailure
}

// failToken prints a token error, with what to check when the token was
// not found, and returns its exit status.
func failToken(c *cli, err error, format string, args ...any) int {
	code := failf(c, tokenExitCode(err), format, args...)
	if errors.Is(err, hsm.ErrTokenNotFound) && strings.Contains(err.Error(), "p11-kit-client") {
		// p11-kit's client lists no token when its server is down or
		// serves another token: it cannot tell the two apart.
		addr := c.getenv("P11_KIT_SERVER_ADDRESS")
		if addr == "" {
			addr = "unset, so $XDG_RUNTIME_DIR/p11-kit/pkcs11"
		}
		fmt.Fprintf(c.stderr, "dkimgw: check that the p11-kit server runs, serves this token, and listens where $P11_KIT_SERVER_ADDRESS says (now: %s)\n", addr)
	} else if errors.Is(err, hsm.ErrTokenNotFound) {
		conf := c.getenv("SOFTHSM2_CONF")
		if conf == "" {
			conf = "unset, so /etc/softhsm/softhsm2.conf"
		}
		fmt.Fprintf(c.stderr, "dkimgw: check the token label or serial in the URI; SoftHSM reads its token directory from $SOFTHSM2_CONF (now: %s)\n", conf)
	}
	return code
}

// errorLogger logs token events (recoveries) to stderr without the noise
// of routine ones: the CLI prints its own results.
func errorLogger(c *cli) *slog.Logger {
	return slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// openFor opens the token for one command's work, bounded by --timeout.
// release closes the token and ends the timeout; when tok is nil, code is
// the exit status (the reason is printed).
func (f *tokenFlags) openFor(ctx context.Context, c *cli) (_ context.Context, tok *hsm.Token, release func(), code int) {
	ctx, cancel := f.withTimeout(ctx)
	tok, code = f.open(ctx, c, errorLogger(c))
	if tok == nil {
		cancel()
		return ctx, nil, nil, code
	}
	return ctx, tok, func() { tok.Close(); cancel() }, exitOK
}

// withTimeout bounds a command's token work.
func (f *tokenFlags) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if f.timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, f.timeout)
}

// loadConfig loads a configuration file; without hsm.uri it takes the
// token URI from $DKIMGW_HSM, as the commands without a file do.
func loadConfig(getenv func(string) string, path string) (*policy.Config, error) {
	cfg, err := policy.LoadWith(path, policy.LoadOptions{HSMURI: getenv(hsmEnv)})
	if err != nil && path == defaultConfig && errors.Is(err, fs.ErrNotExist) {
		// The user may not know a default was read at all.
		return nil, fmt.Errorf("%w\n(%s is the default; give --config FILE)", err, defaultConfig)
	}
	return cfg, err
}
