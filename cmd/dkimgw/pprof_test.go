package main

import (
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
)

func TestPprofLoopbackOnly(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	if _, _, err := startPprof("0.0.0.0:0", logger); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("a non-loopback address: %v, want refused", err)
	}
	addr, stop, err := startPprof("", logger)
	if err != nil || addr != "" {
		t.Errorf("unset: %q, %v; want nothing started", addr, err)
	}
	stop()

	addr, stop, err = startPprof("127.0.0.1:0", logger)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	resp, err := http.Get("http://" + addr + "/debug/pprof/allocs?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), "heap profile") {
		t.Errorf("allocs profile: %d %.100q", resp.StatusCode, b)
	}
}
