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
	"sync/atomic"
	"syscall"

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
SIGTERM or SIGINT: stop accepting, finish the transactions in flight
(at most shutdown_grace), exit 0. SIGHUP: reload the configuration; a
configuration that is invalid, names a missing key or changes a setting
that needs a restart is logged and refused, and the old one keeps serving.`
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
	cfg, err := policy.Load(*path)
	if err != nil {
		return failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	level := new(slog.LevelVar)
	logger := newLogger(c.stderr, cfg.Log, level)
	logWarnings(logger, cfg)

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
		return failf(c, tokenExitCode(err), "%v", err)
	}
	defer tok.Close()

	srv, err := smtpproxy.New(smtpproxy.Options{Policy: cfg, Settings: relaySettings(cfg), Keys: &ring, Logger: logger})
	if err != nil {
		return failf(c, exitConfig, "%v", err)
	}
	l, err := net.Listen("tcp", cfg.SMTP.Listen)
	if err != nil {
		return failf(c, exitUnavailable, "smtp.listen: %v", err)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	logger.Info("dkimgw serving", "version", version(), "listen", l.Addr().String(), "config", *path)

	for {
		select {
		case <-hup:
			if next := reload(ctx, srv, cfg, tok, &ring, *path, logger, level); next != nil {
				cfg = next
			}
		case err := <-serveErr:
			return failf(c, exitSoftware, "serve: %v", err)
		case <-ctx.Done():
			grace := cfg.ShutdownGrace
			logger.Info("shutting down", "grace_s", grace.Seconds())
			sctx, cancel := context.WithTimeout(context.Background(), grace)
			err := srv.Shutdown(sctx)
			cancel()
			<-serveErr
			if err != nil {
				logger.Warn("shutdown: transactions cut short", "error", err)
			}
			logger.Info("stopped")
			return exitOK
		}
	}
}

// reload builds the new configuration completely (decoded, validated,
// its keys checked) before swapping it in for cur, and returns it; any
// failure leaves cur serving and returns nil.
func reload(ctx context.Context, srv *smtpproxy.Server, cur *policy.Config, tok *hsm.Token, ring *keyring, path string, logger *slog.Logger, level *slog.LevelVar) *policy.Config {
	cfg, err := policy.Load(path)
	if err == nil && cfg.HSM.URI != cur.HSM.URI {
		err = errors.New("hsm.uri changed, which needs a restart")
	}
	var keys map[policy.KeyRef]*hsm.Key
	if err == nil {
		kctx, cancel := context.WithTimeout(ctx, tokenTimeout)
		keys, err = checkKeys(kctx, tok, cfg, nil)
		cancel()
	}
	if err == nil && cfg.Log.Format != cur.Log.Format {
		err = errors.New("log.format changed, which needs a restart")
	}
	if err == nil {
		// The new keys go in first: a transaction that already sees the
		// new configuration must find its selectors.
		old := ring.set(tok, keys)
		if err = srv.Reload(cfg, relaySettings(cfg)); err != nil {
			ring.restore(old)
		}
	}
	if err != nil {
		logger.Error("reload refused, the old configuration keeps serving", "config", path, "error", err)
		return nil
	}
	logger.Info("configuration reloaded", "config", path)
	level.Set(cfg.Log.SlogLevel())
	logWarnings(logger, cfg)
	return cfg
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
			MaxHeaderBytes: sp.MaxHeaderBytes,
		},
	}
	if s.TLS != nil {
		set.Certificate = s.TLS.Certificate()
	}
	return set
}

// keyring is the smtpproxy.KeySource of serve: the token keys of the
// configuration, looked up once by the key check and kept, since finding
// a key costs a dozen token calls and signing must not. hsm.Key re-finds
// its own handle when the token reconnects. A selector the configuration
// does not name (which policy never asks for) is looked up in the token.
type keyring struct {
	tok  atomic.Pointer[hsm.Token]
	keys atomic.Pointer[map[policy.KeyRef]*hsm.Key]
}

var _ smtpproxy.KeySource = (*keyring)(nil)

// set installs keys and returns the previous set, for restore.
func (r *keyring) set(tok *hsm.Token, keys map[policy.KeyRef]*hsm.Key) *map[policy.KeyRef]*hsm.Key {
	r.tok.Store(tok)
	return r.keys.Swap(&keys)
}

func (r *keyring) restore(keys *map[policy.KeyRef]*hsm.Key) { r.keys.Store(keys) }

// Key returns the key for (domain, selector). hsm's temporary errors carry
// Temporary(), which smtpproxy reads to answer 451.
func (r *keyring) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	if keys := r.keys.Load(); keys != nil {
		if k, ok := (*keys)[policy.KeyRef{Domain: domain, Selector: selector}]; ok {
			return k, nil
		}
	}
	k, err := r.tok.Load().Key(ctx, domain, selector)
	if err != nil {
		return nil, fmt.Errorf("dkimgw: key %s._domainkey.%s: %w", selector, domain, err)
	}
	return k, nil
}
