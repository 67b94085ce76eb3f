package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"
)

// pprofEnv names the environment variable that makes serve offer Go's
// profiler (net/http/pprof) on a loopback address, for `make bench` and
// for profiling a gateway under load: DKIMGW_PPROF=127.0.0.1:6060, then
// go tool pprof http://127.0.0.1:6060/debug/pprof/profile?seconds=10.
// It is not a configuration key: it is a developer's tool, off unless
// asked for, and never on a non-loopback address.
const pprofEnv = "DKIMGW_PPROF"

// startPprof serves the profiler on addr (empty: not at all) and returns
// the address it listens on and a stop function.
func startPprof(addr string, logger *slog.Logger) (string, func(), error) {
	if addr == "" {
		return "", func() {}, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", nil, fmt.Errorf("%s=%q: %w", pprofEnv, addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return "", nil, fmt.Errorf("%s=%q: the profiler listens on a loopback address only (127.0.0.1:PORT)", pprofEnv, addr)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", pprofEnv, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Warn("profiler stopped", "error", err)
		}
	}()
	logger.Info("Go profiler serving /debug/pprof/ ("+pprofEnv+")", "pprof_listen", l.Addr().String())
	return l.Addr().String(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}
