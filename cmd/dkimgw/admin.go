package main

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/dkimgw/dkimgw/policy"
)

// The admin listener's HTTP timeouts: scrapers and probes send tiny
// requests, and a slow client must not hold a connection.
const (
	adminReadTimeout  = 10 * time.Second
	adminWriteTimeout = 30 * time.Second
	adminIdleTimeout  = 60 * time.Second
	// readyTimeout bounds each /readyz check (the token and the upstream
	// are checked at once): a probe must answer before its own timeout,
	// which Kubernetes sets to 1 s by default and most set to a few.
	readyTimeout = 3 * time.Second
)

// readyCheck is one readiness condition; nil error: it holds.
type readyCheck struct {
	name  string
	check func(ctx context.Context) error
	// advisory checks are reported but leave the gateway ready (the
	// shared state store: signing goes on without it).
	advisory bool
}

// adminServer serves /metrics, /healthz and /readyz.
type adminServer struct {
	srv    *http.Server
	l      net.Listener
	log    *slog.Logger
	token  atomic.Pointer[[]byte] // the bearer token; nil or empty: none
	checks []readyCheck
	done   chan struct{}
}

// startAdmin listens on cfg.Admin and serves until shutdown. It returns
// nil when the listener is disabled.
func startAdmin(cfg *policy.Config, m *metrics, checks []readyCheck, logger *slog.Logger) (*adminServer, error) {
	addr := cfg.Admin.Addr()
	if addr == "" {
		return nil, nil
	}
	a := &adminServer{log: logger.With("component", "admin"), checks: checks, done: make(chan struct{})}
	a.setToken(cfg.Admin.BearerToken())
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", a.auth(promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:            slogErrorLog{a.log},
		Timeout:             readyTimeout + keysScrapeTimeout,
		MaxRequestsInFlight: 4,
	})))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"status": "alive"})
	})
	mux.Handle("GET /readyz", a.auth(http.HandlerFunc(a.ready)))
	a.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: adminReadTimeout,
		ReadTimeout:       adminReadTimeout,
		WriteTimeout:      adminWriteTimeout,
		IdleTimeout:       adminIdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slogErrorLog{a.log}.logger(),
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin.listen: %w", err)
	}
	if t := cfg.Admin.TLS; t != nil {
		l = tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{*t.Certificate()}, MinVersion: tls.VersionTLS12})
	}
	a.l = l
	go func() {
		defer close(a.done)
		if err := a.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("admin listener stopped", "error", err)
		}
	}()
	return a, nil
}

// Addr is where the admin listener listens.
func (a *adminServer) Addr() string { return a.l.Addr().String() }

// setToken installs the bearer token of a (re)loaded configuration.
func (a *adminServer) setToken(tok []byte) {
	if a == nil {
		return
	}
	a.token.Store(&tok)
}

// shutdown stops the listener, letting requests in flight end until
// deadline.
func (a *adminServer) shutdown(deadline time.Time) {
	if a == nil {
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := a.srv.Shutdown(ctx); err != nil {
		_ = a.srv.Close()
	}
	<-a.done
}

// auth requires the bearer token, when one is configured, compared in
// constant time. /healthz is left open: it says only that the process
// runs, which a liveness probe must learn without a secret.
func (a *adminServer) auth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := a.token.Load(); p != nil && len(*p) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), *p) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="dkimgw"`)
				writeJSON(w, http.StatusUnauthorized, map[string]any{"error": "a valid bearer token is required"})
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// ready runs every check at once, each bounded by readyTimeout, and
// answers 200 when all hold, 503 with what is wrong otherwise.
func (a *adminServer) ready(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
	defer cancel()
	results := make([]error, len(a.checks))
	var wg sync.WaitGroup
	for i, c := range a.checks {
		wg.Go(func() {
			done := make(chan error, 1)
			go func() { done <- c.check(ctx) }()
			select {
			case results[i] = <-done:
			case <-ctx.Done():
				results[i] = fmt.Errorf("no answer within %v", readyTimeout)
			}
		})
	}
	wg.Wait()
	checks := map[string]string{}
	status, code := "ready", http.StatusOK
	for i, c := range a.checks {
		if results[i] != nil {
			checks[c.name] = results[i].Error()
			if !c.advisory {
				status, code = "unready", http.StatusServiceUnavailable
			}
		} else {
			checks[c.name] = "ok"
		}
	}
	writeJSON(w, code, map[string]any{"status": status, "checks": checks})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// dialCheck reports whether a TCP connection to addr can be opened
// within ctx: the upstream is reachable. It does not talk SMTP, so that
// a probe every few seconds does not fill the upstream's log.
func dialCheck(addr func() string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr())
		if err != nil {
			return fmt.Errorf("upstream %s: %w", addr(), err)
		}
		return c.Close()
	}
}

// slogErrorLog sends net/http's and promhttp's error lines to slog.
type slogErrorLog struct{ log *slog.Logger }

func (s slogErrorLog) Println(v ...any) { s.log.Warn(strings.TrimSpace(fmt.Sprintln(v...))) }

func (s slogErrorLog) logger() *log.Logger {
	return slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
}
