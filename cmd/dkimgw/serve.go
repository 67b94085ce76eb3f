package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/smtpproxy"
)

const (
	serveUsage = "serve [--config FILE]"
	serveLong  = `
serve accepts mail from the clients of the configuration, signs it with
the token's keys and relays it to the upstream MTA, replying to each
command with the upstream's own answer (see the README).

Before it listens, it checks every configured key, as 'config check' does.
Domains with a rotation policy are signed with their active keys: serve
runs the rotation reconciler every rotation.check_every (see 'dkimgw
rotate --help') and switches a domain's keys as soon as a new one is
active, or within a second when another process changed the rotation
state; a rotating domain without an active key gets 451 4.7.0.
Every rotation.drift_every it checks that DNS serves the records of the
active and retired keys as published (rotation.on_drift says what a
drift does). On admin.listen (default 127.0.0.1:9465) it serves /metrics
(Prometheus), /healthz and /readyz (see the README). With milter.listen
set, serve also runs the milter for Postfix and Sendmail, with the same
keys (see 'dkimgw milter --help').
SIGTERM or SIGINT: stop accepting, finish the transactions in flight
(at most shutdown_grace), exit 0, within shutdown_grace even when a
token call hangs. SIGHUP: reload the configuration and read the token's
PIN again from its pin-source; when the PIN changed, or the token refused
the PIN (it is then not tried again until the reload), the token is
re-opened with the new one; the reconciler is rebuilt from the new
rotation policies. A configuration that is invalid, names a missing
key, changes a setting that needs a restart (hsm.uri, log.format,
data_dir, admin.listen, admin.tls), or brings a PIN the token refuses is
logged and refused, and the old one keeps serving.

serve records its start, each reload (done or refused), a PIN the token
refuses, every rotation transition and a summary of refused messages in
the audit log (audit.path), and seals it with a checkpoint signed by the
token's audit key every audit.checkpoint_every and at shutdown; it
generates the audit key (label dkimgw-audit) in the token on its first
start. See 'dkimgw audit --help'.

Without hsm.uri, the token URI comes from $DKIMGW_HSM.

Exit status: 0 stopped by SIGTERM or SIGINT; 64 bad arguments; 69 a
configured key is missing or unusable; 71 the SMTP or admin listen
address cannot be bound (in use, no permission); 73 the audit log
cannot be written; 75 token unavailable; 77 wrong or locked PIN; 78
invalid configuration, bad pin-source, or no such token.`
)

var serveCommand = &command{
	name:  "serve",
	usage: serveUsage,
	short: "run the signing SMTP relay",
	long:  serveLong,
	run:   runServe,
}

func runServe(ctx context.Context, c *cli, args []string) int {
	fs := newFlagSet(c, "serve")
	path := fs.String("config", defaultConfig, "configuration `file`")
	if code, ok := parseFlags(c, fs, serveUsage, serveLong, args); !ok {
		return code
	}
	return runGateway(ctx, c, *path, true)
}

// runGateway runs what the configuration at path asks for: the relay
// when relay is set (serve), and the milter listener when milter.listen
// is set (always, for 'dkimgw milter'). Both share the token, the
// keyring, the reconciler, the drift watch, the admin listener and the
// audit log, and SIGHUP reloads both.
func runGateway(ctx context.Context, c *cli, path string, relay bool) int {
	cfg, err := loadConfig(c.getenv, path)
	if err != nil {
		return failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	if relay && cfg.Upstream.Address == "" {
		return failf(c, exitConfig, "%s: upstream.address is required for serve (only 'dkimgw milter' runs without one)", path)
	}
	if !relay && cfg.Milter.Listen == "" {
		return failf(c, exitConfig, "%s: milter.listen is required for 'dkimgw milter' (inet:HOST:PORT or unix:/path)", path)
	}
	level := new(slog.LevelVar)
	logger := newLogger(c.stderr, cfg.Log, level)
	logWarnings(logger, cfg)
	alog, err := openServeAudit(cfg, logger)
	if err != nil {
		return failf(c, exitCantCreate, "%s: audit.path: %v", path, err)
	}

	openCtx, cancel := context.WithTimeout(ctx, tokenTimeout)
	tok, err := hsm.Open(openCtx, cfg.HSM.URI, hsm.Options{Logger: logger, Getenv: c.getenv})
	var ring keyring
	if err == nil {
		var keys map[policy.KeyRef]*hsm.Key
		if keys, err = checkKeys(openCtx, tok, cfg, nil); err != nil {
			tok.Close()
		} else {
			ring.set(tok, keys)
		}
	}
	cancel()
	if err != nil {
		alog.recordTokenError(ctx, err)
		return failToken(c, err, "%v", err)
	}
	alog.useToken(ctx, tok)

	ring.rk.log = logger
	rot, err := prepareRotator(ctx, cfg, &ring, logger, alog.log, nil)
	if err != nil {
		closeToken(ring.token(), time.Now().Add(shortClose), logger)
		return failf(c, setupExitCode(err), "%s: rotation: %v", path, err)
	}
	obs := newServeObs(cfg, &ring, rot)
	obs.driftSink = alog
	var srv *smtpproxy.Server
	var l net.Listener
	if relay {
		srv, err = smtpproxy.New(smtpproxy.Options{Policy: alog.policy(cfg), Settings: relaySettings(cfg), Keys: &ring, Logger: logger, Observer: obs.m})
		if err != nil {
			closeToken(ring.token(), time.Now().Add(shortClose), logger)
			return failf(c, exitConfig, "%v", err)
		}
		l, err = net.Listen("tcp", cfg.SMTP.Listen)
		if err != nil {
			closeToken(ring.token(), time.Now().Add(shortClose), logger)
			return failf(c, exitOSErr, "smtp.listen: %v", err)
		}
		obs.srv.Store(srv)
	}
	ms, err := startMilter(cfg, &ring, obs.m, alog.refused, logger)
	if err != nil {
		if l != nil {
			l.Close()
		}
		closeToken(ring.token(), time.Now().Add(shortClose), logger)
		return failf(c, exitOSErr, "%v", err)
	}
	_, stopPprof, err := startPprof(c.getenv(pprofEnv), logger)
	if err != nil {
		if l != nil {
			l.Close()
		}
		ms.close()
		closeToken(ring.token(), time.Now().Add(shortClose), logger)
		return failf(c, exitConfig, "%v", err)
	}
	defer stopPprof()
	admin, err := startAdmin(cfg, obs.m, obs.readyChecks(relay), logger)
	if err != nil {
		if l != nil {
			l.Close()
		}
		ms.close()
		closeToken(ring.token(), time.Now().Add(shortClose), logger)
		return failf(c, exitOSErr, "%v", err)
	}
	if admin != nil {
		logger.Info("admin listener serving /metrics, /healthz, /readyz", "admin_listen", admin.Addr(), "tls", cfg.Admin.TLS != nil, "bearer_token", len(cfg.Admin.BearerToken()) > 0)
	}
	serveErr := make(chan error, 2)
	if relay {
		go func() { serveErr <- srv.Serve(l) }()
	}
	ms.serve(serveErr)

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	alog.record(ctx, configEvent(audit.EventConfigLoaded, cfg, nil))
	if relay {
		logger.Info("dkimgw serving", "version", version(), "listen", l.Addr().String(), "config", path)
	}
	if ms != nil {
		logger.Info("dkimgw milter serving", "version", version(), "milter_listen", ms.addr(), "config", path)
	}
	alog.start(cfg.Audit.CheckpointEvery.D(), func() error { return ring.token().PINError() })
	if rot != nil {
		rot.start(&ring, logger)
		logger.Info("key rotation running", "domains", strings.Join(cfg.Rotating(), ","), "check_every_s", rot.every.Seconds())
	}
	drift := newDriftWatch(cfg, rot, &ring, obs.m, obs.driftSink, logger)
	drift.start()

	for {
		select {
		case <-hup:
			next, nrot := reload(ctx, srv, ms, cfg, &ring, rot, path, logger, level, c.getenv, alog)
			obs.m.reloaded(next != nil)
			if next != nil {
				cfg, rot = next, nrot
				obs.cfg.Store(cfg)
				obs.rot.Store(rot)
				admin.setToken(cfg.Admin.BearerToken())
				drift.stop(time.Now().Add(rotatorStopWait))
				drift = newDriftWatch(cfg, rot, &ring, obs.m, obs.driftSink, logger)
				drift.start()
			}
		case err := <-serveErr:
			ms.close()
			drift.stop(time.Now().Add(shortClose))
			admin.shutdown(time.Now().Add(shortClose))
			rot.stop(time.Now().Add(shortClose), logger)
			alog.stop(time.Now().Add(shortClose))
			closeToken(ring.token(), time.Now().Add(shortClose), logger)
			return failf(c, exitSoftware, "serve: %v", err)
		case <-ctx.Done():
			grace := cfg.ShutdownGrace
			logger.Info("shutting down", "grace_s", grace.Seconds())
			deadline := time.Now().Add(grace)
			sctx, cancel := context.WithDeadline(context.Background(), deadline)
			drift.stop(deadline)
			rot.stop(deadline, logger)
			var err error
			if srv != nil {
				err = srv.Shutdown(sctx)
				<-serveErr
			}
			if merr := ms.shutdown(sctx); merr != nil && err == nil {
				err = merr
			}
			cancel()
			// The admin listener goes last: /metrics and /readyz answer
			// (unready is not reported; the relay is draining) while
			// transactions finish.
			admin.shutdown(deadline)
			if err != nil {
				logger.Warn("shutdown: transactions cut short", "error", err)
			}
			// The last checkpoint seals the log while the token is open.
			alog.stop(deadline)
			// Whatever the token does, the process exits within the grace
			// period: a token call that hangs is not waited for.
			closeToken(ring.token(), deadline, logger)
			logger.Info("stopped")
			return exitOK
		}
	}
}

// rotatorStopWait bounds the wait for the old reconciler's pass at a
// reload: its calls honour cancellation, except a token call in flight.
const rotatorStopWait = 30 * time.Second

// shortClose bounds closing the token when serve fails.
const shortClose = 5 * time.Second

// closeToken closes tok, waiting for it until deadline at most: Close is
// bounded by itself, and a process that exits needs no more than that.
func closeToken(tok *hsm.Token, deadline time.Time, logger *slog.Logger) {
	done := make(chan struct{})
	go func() {
		tok.Close()
		close(done)
	}()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		logger.Warn("token not closed in time; exiting without waiting for it")
	}
}

// reload builds the new configuration completely (decoded, validated,
// its keys checked) before swapping it in for cur, and returns it; any
// failure leaves cur serving and returns nil. The token's PIN is read
// again from the pin-source: when it changed, or the token refused the
// PIN it has (the PIN was changed in the token), a new Token is opened
// with it and replaces the old one once its keys check out. A PIN that
// fails is refused like any other error, after one login attempt, and
// the old Token keeps serving.
//
// With rotation, the reconciler is rebuilt from the new policies and
// replaces the old one once everything else checked out; the active keys
// are read from the state again, so the keyring stays as it was for the
// domains whose policy did not change.
func reload(ctx context.Context, srv *smtpproxy.Server, ms *milterListener, cur *policy.Config, ring *keyring, rot *rotator, path string, logger *slog.Logger, level *slog.LevelVar, getenv func(string) string, alog *serveAudit) (*policy.Config, *rotator) {
	cfg, err := loadConfig(getenv, path)
	if err == nil && cfg.HSM.URI != cur.HSM.URI {
		err = errors.New("hsm.uri changed, which needs a restart")
	}
	if err == nil && cfg.DataDir != cur.DataDir && len(cur.Rotating()) > 0 {
		err = errors.New("data_dir changed, which needs a restart (move the rotation state with it)")
	}
	if err == nil && cfg.Log.Format != cur.Log.Format {
		err = errors.New("log.format changed, which needs a restart")
	}
	if err == nil && !sameAdminListener(cfg, cur) {
		err = errors.New("admin.listen or admin.tls changed, which needs a restart")
	}
	if err == nil && !sameMilterListener(cfg, cur) {
		err = errors.New("milter.listen, its socket or timeouts changed, which needs a restart")
	}
	if err == nil && srv != nil && cfg.Upstream.Address == "" {
		err = errors.New("upstream.address is required for serve")
	}
	kctx, cancel := context.WithTimeout(ctx, tokenTimeout)
	defer cancel()
	oldTok := ring.token()
	tok, opened := oldTok, false
	if err == nil {
		tok, opened, err = reopenIfPINChanged(kctx, oldTok, cfg.HSM.URI, logger, getenv)
	}
	var keys map[policy.KeyRef]*hsm.Key
	if err == nil {
		keys, err = checkKeys(kctx, tok, cfg, nil)
	}
	var nrot *rotator
	if err == nil {
		// The new keys (and token) go in first: a transaction that already
		// sees the new configuration must find its selectors.
		old := ring.set(tok, keys)
		oldRot := ring.rot.Load()
		nrot, err = prepareRotator(kctx, cfg, ring, logger, alog.log, rot)
		if err != nil {
			err = fmt.Errorf("rotation: %w", err)
		} else if srv != nil {
			err = srv.Reload(alog.policy(cfg), relaySettings(cfg))
		}
		if err != nil {
			ring.restore(old)
			ring.rot.Store(oldRot)
			nrot.stop(time.Now(), logger)
		}
	}
	if err != nil {
		if opened {
			tok.Close()
		}
		logger.Error("reload refused, the old configuration keeps serving", "config", path, "error", err)
		alog.recordTokenError(ctx, err)
		alog.record(ctx, audit.Event{Event: audit.EventReloadRefused, Details: map[string]any{"config": path, "error": err.Error()}})
		return nil, nil
	}
	ms.reload(cfg)
	nrot.takeOver(rot)
	rot.stop(time.Now().Add(rotatorStopWait), logger)
	if nrot != nil {
		nrot.start(ring, logger)
	}
	if opened {
		alog.useToken(ctx, tok)
		logger.Info("token re-opened with the PIN from the pin-source", "token", tok.Info().Label)
		// Transactions still signing with the old token's keys get a
		// temporary error (451) and are retried by their MTA.
		go oldTok.Close()
	}
	alog.record(ctx, configEvent(audit.EventConfigLoaded, cfg, map[string]any{"reload": true, "token_reopened": opened}))
	logger.Info("configuration reloaded", "config", path)
	level.Set(cfg.Log.SlogLevel())
	logWarnings(logger, cfg)
	return cfg, nrot
}

// relaySettings are the relay's settings in cfg; its decisions come from
// cfg itself, as a smtpproxy.Policy.
func relaySettings(cfg *policy.Config) smtpproxy.Settings {
	s, u, sp := cfg.SMTP, cfg.Upstream, cfg.Spool
	set := smtpproxy.Settings{
		Listen:              s.Listen,
		Hostname:            s.Hostname,
		MaxMessageBytes:     s.MaxMessageBytes,
		MaxRecipients:       s.MaxRecipients,
		MaxLineLength:       s.MaxLineLength,
		MaxConnections:      s.MaxConnections,
		MaxConnectionsPerIP: s.MaxConnectionsPerIP,
		ReadTimeout:         s.ReadTimeout,
		WriteTimeout:        s.WriteTimeout,
		DataTimeout:         s.DataTimeout,
		MaxSessionDuration:  s.MaxSessionDuration,
		MaxAuthFailures:     s.MaxAuthFailures,
		Upstream: smtpproxy.UpstreamSettings{
			Address:        u.Address,
			TLS:            u.TLS,
			TLSServerName:  u.TLSServerName,
			RootCAs:        u.RootCAs(),
			Timeout:        u.Timeout,
			ConnectTimeout: u.ConnectTimeout,
			IdleTimeout:    u.IdleTimeout,
			Keepalive:      u.Keepalive,
			MaxConnections: u.MaxConnections,
			MaxIdle:        u.MaxIdle,
		},
		Spool: smtpproxy.SpoolSettings{
			Dir:            sp.Dir,
			MemoryLimit:    sp.MemoryLimit,
			MemoryTotal:    sp.MemoryTotal,
			MaxHeaderBytes: sp.MaxHeaderBytes,
		},
	}
	if s.TLS != nil {
		set.Certificate = s.TLS.Certificate()
	}
	return set
}

// reopenIfPINChanged returns tok when the pin-source still gives its PIN
// and the token has not refused it; otherwise a new Token opened with the
// PIN the pin-source gives now (opened is true).
func reopenIfPINChanged(ctx context.Context, tok *hsm.Token, uri string, logger *slog.Logger, getenv func(string) string) (_ *hsm.Token, opened bool, err error) {
	same, err := tok.SamePIN(uri, getenv)
	if err != nil {
		return nil, false, err
	}
	if same && tok.PINError() == nil {
		return tok, false, nil
	}
	nt, err := hsm.Open(ctx, uri, hsm.Options{Logger: logger, Getenv: getenv})
	if err != nil {
		return nil, false, err
	}
	return nt, true, nil
}

// keyring is the smtpproxy.KeySource of serve: the token and the keys of
// the configuration, looked up once by the key check and kept, since
// finding a key costs a dozen token calls and signing must not. hsm.Key
// re-finds its own handle when the token reconnects. A key found gone
// (destroyed, or replaced under the same selector) is looked up again, as
// is a selector the configuration does not name (which policy never asks
// for).
type keyring struct {
	cur atomic.Pointer[ringState]
	// rot holds the active keys of the rotating domains (Signers).
	rot atomic.Pointer[rotatingSet]
	rk  rotatingKeys
	// drifted are the rotating domains whose active key's record DNS no
	// longer serves as published, with rotation.on_drift: tempfail (the
	// drift watch sets it); nil: none.
	drifted atomic.Pointer[map[string]bool]
	// observeSign, when set before serving, times every signature.
	observeSign func(alg string, d time.Duration)
}

// ringState is one token with its keys, swapped as a whole.
type ringState struct {
	tok  *hsm.Token
	keys map[policy.KeyRef]*hsm.Key

	mu      sync.Mutex
	refound map[policy.KeyRef]*hsm.Key // looked up again after the check
}

var _ smtpproxy.KeySource = (*keyring)(nil)

// set installs tok and keys and returns the previous state, for restore.
func (r *keyring) set(tok *hsm.Token, keys map[policy.KeyRef]*hsm.Key) *ringState {
	return r.cur.Swap(&ringState{tok: tok, keys: keys})
}

func (r *keyring) restore(old *ringState) { r.cur.Store(old) }

// token is the token the keys come from.
func (r *keyring) token() *hsm.Token { return r.cur.Load().tok }

// Key returns the key for (domain, selector). hsm's errors name the key
// and carry Temporary() where it applies, which smtpproxy reads.
func (r *keyring) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	st := r.cur.Load()
	ref := policy.KeyRef{Domain: domain, Selector: selector}
	if k := st.keys[ref]; k != nil && k.Err() == nil {
		return timed(k, r.observeSign), nil
	}
	st.mu.Lock()
	k := st.refound[ref]
	st.mu.Unlock()
	if k != nil && k.Err() == nil {
		return timed(k, r.observeSign), nil
	}
	k, err := st.tok.Key(ctx, domain, selector)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	if st.refound == nil {
		st.refound = make(map[policy.KeyRef]*hsm.Key)
	}
	st.refound[ref] = k
	st.mu.Unlock()
	return timed(k, r.observeSign), nil
}
