package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

const (
	rotateUsage = "rotate [status] --config FILE [--domain D] [--dry-run] [--emergency] [--json]"
	rotateLong  = `
rotate runs one pass of the key rotation reconciler over the domains
that have a rotation policy (domains.D.rotation), and prints each action
it took: a key generated in the token, published in DNS, found visible on
every authoritative server, activated, retired, revoked, destroyed.
'serve' runs the same passes every rotation.check_every; rotate is for
cron, for a first run, and to see what is going on.

  dkimgw rotate --config F [--domain D] [--dry-run]
        one pass (--dry-run: print what would be done, change nothing)
  dkimgw rotate status --config F [--json]
        every managed key: domain, selector, algorithm, state, since,
        next step and when it is due
  dkimgw rotate --config F --domain D --emergency
        after a suspected key compromise: the domain's active keys stop
        signing now and their records are revoked now (no grace); new
        keys are generated and published at once and become active as
        soon as every authoritative server serves them. Until then the
        domain's mail gets 451 4.7.0 (relayed unsigned with
        on_token_error: relay-unsigned).

Every pass (not status) is recorded in the audit log (audit.path) with
the Unix user, each transition too, and sealed when the token has the
audit key.

Only one reconciler works on the state (data_dir/rotation.db, or etcd
with state.type etcd) at a time: a second one waits up to --wait, then
says who holds the lock.

Exit status: 0 done (rotate status: listed); 1 a step failed (the
others were taken; the next pass retries); 64 bad arguments; 69 a key
is missing or unusable; 75 the state store is locked by another
reconciler, the etcd state store is unreachable (rotate status too: the
gateways keep signing with the keys they last saw active), or the token
is unavailable: try again; 77 wrong PIN; 78 the configuration is
invalid.`
)

var rotateCommand = &command{
	name:  "rotate",
	usage: rotateUsage,
	short: "run a key rotation pass, show rotation status, or rotate in an emergency",
	long:  rotateLong,
	run:   runRotate,
}

// defaultLockWait is how long `rotate` waits for another reconciler
// (serve's, a cron job's) to finish its pass: a pass takes seconds.
const defaultLockWait = time.Minute

func runRotate(ctx context.Context, c *cli, args []string) int {
	if len(args) > 0 && args[0] == "status" {
		return rotateStatus(ctx, c, args[1:])
	}
	fs := newFlagSet(c, "rotate")
	path := fs.String("config", defaultConfig, "configuration `file`")
	domain := fs.String("domain", "", "only this `domain` (required with --emergency)")
	dry := fs.Bool("dry-run", false, "print what a pass would do, change nothing")
	emergency := fs.Bool("emergency", false, "emergency rotation of --domain after a suspected key compromise")
	wait := fs.Duration("wait", defaultLockWait, "wait this long for another reconciler holding the state lock")
	var tf tokenFlags
	fs.DurationVar(&tf.timeout, "timeout", 10*time.Minute, "give up on the whole pass after this long")
	if code, ok := parseFlags(c, fs, rotateUsage, rotateLong, args); !ok {
		return code
	}
	if *emergency && (*domain == "" || *dry) {
		return failf(c, exitUsage, "rotate: --emergency needs --domain and cannot be a --dry-run")
	}
	cfg, code := loadRotating(c, *path)
	if cfg == nil {
		return code
	}
	if d := strings.TrimSuffix(strings.ToLower(*domain), "."); d != "" && !slices.Contains(cfg.Rotating(), d) {
		return failf(c, exitUsage, "rotate: domain %q has no rotation policy in %s (rotating: %s)", *domain, *path, strings.Join(cfg.Rotating(), ", "))
	}
	ctx, cancel := tf.withTimeout(ctx)
	defer cancel()
	logger := errorLogger(c)
	tok, err := hsm.Open(ctx, cfg.HSM.URI, hsm.Options{Logger: logger, Getenv: c.getenv})
	if err != nil {
		return failToken(c, err, "%s: hsm.uri: %v", *path, err)
	}
	defer tok.Close()
	alog, err := audit.Open(cfg.Audit.Path, audit.Options{Actor: unixUser()})
	if err != nil {
		return failf(c, exitCantCreate, "%s: audit.path: %v", *path, err)
	}
	setup, err := newAuditedRotation(cfg, tok, logger, nil, *wait, alog)
	if err != nil {
		return failf(c, setupExitCode(err), "%s: %v", *path, err)
	}
	defer setup.Close()
	var rep rotation.Report
	if *emergency {
		fmt.Fprintf(c.stderr, "dkimgw: EMERGENCY ROTATION of %s: its active keys stop signing NOW and their DNS records are revoked NOW, without grace; its mail gets 451 4.7.0 until the new keys are visible in DNS\n", *domain)
		rep, err = setup.rec.Emergency(ctx, *domain)
	} else {
		opts := rotation.PassOptions{DryRun: *dry}
		if *domain != "" {
			opts.Domains = []string{*domain}
		}
		rep, err = setup.rec.Pass(ctx, opts)
	}
	ca := &cliAudit{log: alog}
	ev := audit.Event{Event: audit.EventRotateRun, Domain: *domain, Details: outcome(err, map[string]any{
		"command": "rotate", "dry_run": *dry, "emergency": *emergency, "actions": len(rep.Actions),
	})}
	if aerr := ca.record(ctx, c, ev); aerr != nil && err == nil {
		err = aerr
	}
	ca.seal(ctx, c, tok)
	printReport(c.stdout, rep, *dry)
	if err != nil {
		return failf(c, rotateExitCode(err), "%v", err)
	}
	return exitOK
}

func rotateExitCode(err error) int {
	var le *rotation.LockedError
	switch {
	case errors.As(err, &le), storeUnavailable(err):
		return exitTempFail
	case errors.Is(err, hsm.ErrPINIncorrect), errors.Is(err, hsm.ErrPINLocked):
		return 77
	case errors.Is(err, hsm.ErrKeyNotFound), errors.Is(err, hsm.ErrMechanismMissing):
		return exitUnavailable
	case errors.Is(err, hsm.ErrUnsafeKey), errors.Is(err, hsm.ErrWeakKey):
		// The token's key under a planned selector (a pass interrupted
		// after generating) that dkimgw refuses: as sign and config check.
		return exitKeyUnusable
	case hsm.IsTemporary(err), errors.Is(err, context.DeadlineExceeded):
		return exitTempFail
	}
	return exitFailure
}

// setupExitCode is the exit status of a failure to build the reconciler:
// the etcd state store out of reach (authenticating needs it) is 75, try
// again; anything else is the configuration's (78).
func setupExitCode(err error) int {
	if storeUnavailable(err) {
		return exitTempFail
	}
	return exitConfig
}

// printReport prints a pass's actions and warnings, one per line.
func printReport(w io.Writer, rep rotation.Report, dry bool) {
	for _, a := range rep.Actions {
		line := a.String()
		if strings.Contains(a.What, "emergency") || strings.Contains(a.What, "compromised") {
			line = "EMERGENCY: " + line
		}
		fmt.Fprintln(w, line)
	}
	for _, warn := range rep.Warnings {
		fmt.Fprintln(w, "warning:", warn)
	}
	if len(rep.Actions) == 0 {
		if dry {
			fmt.Fprintln(w, "nothing would be done")
		} else {
			fmt.Fprintln(w, "nothing to do")
		}
	}
	for d, keys := range rep.Active {
		if len(keys) == 0 {
			fmt.Fprintf(w, "%s: no active key yet: its mail gets 451 4.7.0 until one is visible in DNS\n", d)
		}
	}
}

// loadRotating loads the configuration and checks that it has rotating
// domains; on failure it returns nil and the exit status.
func loadRotating(c *cli, path string) (*policy.Config, int) {
	cfg, err := loadConfig(c.getenv, path)
	if err != nil {
		return nil, failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	if len(cfg.Rotating()) == 0 {
		return nil, failf(c, exitConfig, "%s: no domain has a rotation policy (domains.D.rotation)", path)
	}
	return cfg, exitOK
}

func rotateStatus(ctx context.Context, c *cli, args []string) int {
	const usage = "rotate status --config FILE [--json]"
	const long = `Prints every key of the rotating domains as the state store records
it, destroyed ones included (their selectors are never reused): domain,
selector, algorithm, state, since when, the next step and when it is
due ("-" when it waits for DNS or the next pass). It does not open the
token, contact DNS, or take the lock for longer than one read.`
	fs := newFlagSet(c, "rotate status")
	path := fs.String("config", defaultConfig, "configuration `file`")
	asJSON := fs.Bool("json", false, "print JSON")
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	cfg, code := loadRotating(c, *path)
	if cfg == nil {
		return code
	}
	setup, err := newRotation(cfg, nil, slog.New(slog.DiscardHandler), nil, defaultLockWait)
	if err != nil {
		return failf(c, setupExitCode(err), "%s: %v", *path, err)
	}
	defer setup.Close()
	ctx, cancel := context.WithTimeout(ctx, defaultLockWait)
	defer cancel()
	st, err := setup.rec.Status(ctx)
	if err != nil {
		if storeUnavailable(err) {
			return failf(c, exitTempFail, "rotate status: the state store (%s) is unreachable; the gateways keep signing with the keys they last saw active, and no rotation step happens until it is back: %v", setup.store, err)
		}
		return failf(c, rotateExitCode(err), "%v", err)
	}
	if *asJSON {
		if st == nil {
			st = []rotation.Status{}
		}
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return failf(c, exitFailure, "rotate status: %v", err)
		}
		return exitOK
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tSELECTOR\tALGORITHM\tSTATE\tSINCE\tNEXT\tWHEN")
	for _, s := range st {
		state := string(s.State)
		if s.Compromised {
			state += " (compromised)"
		}
		when := "-"
		if !s.When.IsZero() {
			when = s.When.UTC().Format(time.RFC3339)
		}
		next := s.Next
		if next == "" {
			next = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Domain, s.Selector, s.Algorithm, state, s.Since.UTC().Format(time.RFC3339), next, when)
	}
	tw.Flush()
	return exitOK
}
