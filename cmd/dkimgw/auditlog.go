package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/milter"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

// This file connects the audit log to the commands: who the actor is,
// where the log is, the rotation event sink, the summary of refused
// messages, and the audit key that seals the log.

// auditEnv names the audit log of key commands that are given no
// --audit-log (they read no configuration otherwise).
const auditEnv = "DKIMGW_AUDIT_LOG"

// serveActor is the actor of serve's records.
const serveActor = "serve"

// auditWait bounds writing one record (a lock held by a hung writer).
const auditWait = 30 * time.Second

// unixUser is the actor of a CLI command: the Unix user running it.
func unixUser() string {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	return "uid:" + strconv.Itoa(os.Getuid())
}

// cliAuditPath is the audit log of a key command: --audit-log, else
// $DKIMGW_AUDIT_LOG, else audit.path of the default configuration when
// that file exists; "" when there is none.
func cliAuditPath(c *cli, flagPath string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	if p := c.getenv(auditEnv); p != "" {
		return p, nil
	}
	if _, err := os.Stat(defaultConfig); err != nil {
		return "", nil
	}
	cfg, err := loadConfig(c.getenv, defaultConfig)
	if err != nil {
		return "", fmt.Errorf("read audit.path from %s: %w", defaultConfig, err)
	}
	return cfg.Audit.Path, nil
}

// cliAudit is the audit log of one CLI command run, or nil when it has
// none (a warning says so).
type cliAudit struct {
	log *audit.Log
}

// openCLIAudit opens the command's audit log. ok is false when the
// command must stop (the reason is printed, code is the exit status).
func openCLIAudit(c *cli, flagPath string) (a *cliAudit, code int, ok bool) {
	path, err := cliAuditPath(c, flagPath)
	if err != nil {
		return nil, failf(c, exitConfig, "%v", err), false
	}
	if path == "" {
		fmt.Fprintf(c.stderr, "dkimgw: warning: no audit log (give --audit-log, set %s, or configure audit.path in %s): this command is not recorded\n", auditEnv, defaultConfig)
		return &cliAudit{}, exitOK, true
	}
	l, err := audit.Open(path, audit.Options{Actor: unixUser()})
	if err != nil {
		return nil, failf(c, exitCantCreate, "%v", err), false
	}
	return &cliAudit{log: l}, exitOK, true
}

// exitCantCreate is EX_CANTCREAT: an output file cannot be written.
const exitCantCreate = 73

// record writes e; a failure is printed and returned.
func (a *cliAudit) record(ctx context.Context, c *cli, e audit.Event) error {
	if a == nil || a.log == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditWait)
	defer cancel()
	if err := a.log.Record(ctx, e); err != nil {
		fmt.Fprintf(c.stderr, "dkimgw: %v\n", err)
		return err
	}
	return nil
}

// seal writes a checkpoint with the token's audit key when the token has
// one: a command that changed the token leaves its records sealed.
func (a *cliAudit) seal(ctx context.Context, c *cli, tok *hsm.Token) {
	if a == nil || a.log == nil || tok == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditWait)
	defer cancel()
	key, err := tok.AuditKey(ctx)
	if err != nil {
		return // no audit key yet: serve generates it, and seals then
	}
	a.log.SetSealer(key)
	if _, err := a.log.Checkpoint(ctx); err != nil {
		fmt.Fprintf(c.stderr, "dkimgw: warning: %v\n", err)
	}
}

// outcome is the details of a command's record.
func outcome(err error, details map[string]any) map[string]any {
	if details == nil {
		details = map[string]any{}
	}
	if err != nil {
		details["result"] = "failed"
		details["error"] = err.Error()
	} else {
		details["result"] = "ok"
	}
	return details
}

// auditKey returns the token's audit key, generating it when the token
// has none (create).
func auditKey(ctx context.Context, tok *hsm.Token, create bool) (*hsm.Key, bool, error) {
	key, err := tok.AuditKey(ctx)
	if err == nil || !create || !errors.Is(err, hsm.ErrKeyNotFound) {
		return key, false, err
	}
	key, err = tok.GenerateAuditKey(ctx)
	if errors.Is(err, hsm.ErrKeyExists) {
		key, err = tok.AuditKey(ctx) // another process generated it meanwhile
		return key, false, err
	}
	return key, err == nil, err
}

// auditEvents is the rotation event sink of serve and rotate: every
// transition logged (as before) and recorded in the audit log.
type auditEvents struct {
	logEvents
	audit *audit.Log
}

var _ rotation.EventSink = (*auditEvents)(nil)

// eventName is the audit event of a rotation transition.
func eventName(e rotation.Event) string {
	switch {
	case e.From == e.To:
		return audit.EventRotationStatus
	case e.Emergency && e.To == rotation.StateRevoked:
		return audit.EventEmergency
	}
	return "key " + string(e.To)
}

func (a *auditEvents) Event(ctx context.Context, e rotation.Event) {
	a.logEvents.Event(ctx, e)
	if a.audit == nil {
		return
	}
	details := map[string]any{"algorithm": string(e.Algorithm), "from": string(e.From), "to": string(e.To), "what": e.Message}
	switch e.To {
	case rotation.StatePublished:
		details["dns"] = "record published"
	case rotation.StateRevoked:
		details["dns"] = "record replaced by the revoked form (p=)"
	case rotation.StateDestroyed:
		details["dns"] = "record removed"
	}
	if e.Emergency {
		details["emergency"] = true
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditWait)
	defer cancel()
	if err := a.audit.Record(ctx, audit.Event{Event: eventName(e), Domain: e.Domain, Selector: e.Selector, Details: details}); err != nil {
		a.log.Error("audit record not written", "event", eventName(e), "domain", e.Domain, "selector", e.Selector, "error", err)
	}
}

// refusals is the serve's policy as smtpproxy sees it, counting the
// messages refused because their client may not use the From domain:
// they go to the audit log as one summary record per client and domain
// and period, not one per message (a misconfigured sender refuses
// thousands).
type refusals struct {
	*policy.Config
	sum *refusalSummary
}

func (r refusals) Sign(client *policy.Client, fromDomain string) (policy.Signing, error) {
	s, err := r.Config.Sign(client, fromDomain)
	if ue, ok := errors.AsType[*policy.UnauthorizedError](err); ok {
		r.sum.add(ue.Client, ue.FromDomain)
	}
	return s, err
}

type refusalKey struct{ client, domain string }

// refusalSummary counts refusals between flushes.
type refusalSummary struct {
	mu     sync.Mutex
	counts map[refusalKey]int
	since  time.Time
}

func newRefusalSummary() *refusalSummary {
	return &refusalSummary{counts: map[refusalKey]int{}, since: time.Now()}
}

func (s *refusalSummary) add(client, domain string) {
	s.mu.Lock()
	s.counts[refusalKey{client, domain}]++
	s.mu.Unlock()
}

// Unauthorized counts a milter's refusal with the relay's: one summary
// for both.
func (s *refusalSummary) Unauthorized(client, fromDomain string) { s.add(client, fromDomain) }

var _ milter.Refusals = (*refusalSummary)(nil)

// flush records what was counted since the last flush.
func (s *refusalSummary) flush(ctx context.Context, l *audit.Log, logger *slog.Logger) {
	s.mu.Lock()
	counts, since := s.counts, s.since
	s.counts, s.since = map[refusalKey]int{}, time.Now()
	s.mu.Unlock()
	keys := make([]refusalKey, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return keys[i].client < keys[j].client || keys[i].client == keys[j].client && keys[i].domain < keys[j].domain
	})
	for _, k := range keys {
		err := l.Record(ctx, audit.Event{Event: audit.EventUnauthorized, Domain: k.domain, Details: map[string]any{
			"client": k.client, "messages": counts[k], "since": since.UTC().Format(time.RFC3339),
		}})
		if err != nil {
			logger.Error("audit record not written", "event", audit.EventUnauthorized, "error", err)
		}
	}
}

// serveAudit is serve's audit log: its records, the refusal summary and
// the checkpoints every audit.checkpoint_every and at shutdown.
type serveAudit struct {
	log     *audit.Log
	refused *refusalSummary
	logger  *slog.Logger
	cancel  context.CancelFunc
	done    chan struct{}

	// pinErr is the serving token's remembered PIN failure (a login
	// refused while recovering a lost session, between two reloads);
	// pinReported keeps it to one record. Used by the sealing loop only.
	pinErr      func() error
	pinReported bool
}

func openServeAudit(cfg *policy.Config, logger *slog.Logger) (*serveAudit, error) {
	l, err := audit.Open(cfg.Audit.Path, audit.Options{Actor: serveActor})
	if err != nil {
		return nil, err
	}
	return &serveAudit{log: l, refused: newRefusalSummary(), logger: logger.With("component", "audit")}, nil
}

// record writes e, logging a failure: serve's actions do not wait on
// the audit log's disk beyond auditWait.
func (a *serveAudit) record(ctx context.Context, e audit.Event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditWait)
	defer cancel()
	if err := a.log.Record(ctx, e); err != nil {
		a.logger.Error("audit record not written", "event", e.Event, "error", err)
	}
}

// DriftReported records the start and the end of a DNS drift of a key's
// record: the drift watch's driftSink.
func (a *serveAudit) DriftReported(ctx context.Context, e driftEvent) {
	details := map[string]any{"state": string(e.State), "drifted": e.Drifted}
	if e.Detail != "" {
		details["servers"] = e.Detail
	}
	a.record(ctx, audit.Event{Event: audit.EventDrift, Domain: e.Domain, Selector: e.Selector, Details: details})
}

var _ driftSink = (*serveAudit)(nil)

// recordTokenError records a login failure when err is one.
func (a *serveAudit) recordTokenError(ctx context.Context, err error) {
	if errors.Is(err, hsm.ErrPINIncorrect) || errors.Is(err, hsm.ErrPINLocked) {
		a.record(ctx, audit.Event{Event: audit.EventLoginFailed, Details: map[string]any{"error": err.Error()}})
	}
}

// useToken makes tok's audit key (generated on first use) seal the log.
func (a *serveAudit) useToken(ctx context.Context, tok *hsm.Token) {
	ctx, cancel := context.WithTimeout(ctx, tokenTimeout)
	defer cancel()
	key, created, err := auditKey(ctx, tok, true)
	if err != nil {
		a.logger.Error("no audit key in the token: the audit log is not sealed by checkpoints", "error", err)
		return
	}
	a.log.SetSealer(key)
	if created {
		id, _ := audit.KeyID(key.Public())
		a.record(ctx, audit.Event{Event: audit.EventKeyGenerated, KeyID: id, Details: map[string]any{
			"label": hsm.AuditKeyLabel, "algorithm": string(key.Info().Algorithm), "purpose": "audit log checkpoints"}})
		a.logger.Info("audit key generated in the token", "label", hsm.AuditKeyLabel, "algorithm", string(key.Info().Algorithm))
	}
}

// policy wraps cfg so that refusals are counted.
func (a *serveAudit) policy(cfg *policy.Config) refusals {
	return refusals{Config: cfg, sum: a.refused}
}

// start writes the refusal summary, a PIN failure of the token pinErr
// returns, and a checkpoint every period.
func (a *serveAudit) start(every time.Duration, pinErr func() error) {
	a.pinErr = pinErr
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel, a.done = cancel, make(chan struct{})
	go func() {
		defer close(a.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				a.seal(ctx)
			}
		}
	}()
}

func (a *serveAudit) seal(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, auditWait)
	defer cancel()
	if a.pinErr != nil {
		err := a.pinErr()
		if err != nil && !a.pinReported {
			a.recordTokenError(ctx, err)
		}
		a.pinReported = err != nil
	}
	a.refused.flush(ctx, a.log, a.logger)
	if _, err := a.log.Checkpoint(ctx); err != nil && !errors.Is(err, audit.ErrNoSealer) && ctx.Err() == nil {
		a.logger.Error("audit checkpoint not written", "error", err)
	}
}

// stop ends the periodic sealing and seals a last time, before the token
// closes.
func (a *serveAudit) stop(deadline time.Time) {
	if a.cancel != nil {
		a.cancel()
		<-a.done
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	a.seal(ctx)
}

// configEvent describes a configuration in a record: the file, its
// SHA-256 (what exactly was loaded), and what it signs.
func configEvent(event string, cfg *policy.Config, details map[string]any) audit.Event {
	if details == nil {
		details = map[string]any{}
	}
	details["config"] = cfg.Path
	if b, err := os.ReadFile(cfg.Path); err == nil {
		sum := sha256.Sum256(b)
		details["sha256"] = hex.EncodeToString(sum[:])
	}
	details["domains"] = len(cfg.Domains)
	details["keys"] = len(cfg.Selectors())
	details["rotating"] = len(cfg.Rotating())
	return audit.Event{Event: event, Details: details}
}
