package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// scrape is one /metrics answer: every sample by its name and sorted
// labels, as the text format writes them ("name{a=\"x\",b=\"y\"}").
type scrape map[string]float64

// get returns the sample of name with exactly labels (k, v, k, v, ...).
func (s scrape) get(name string, labels ...string) (float64, bool) {
	var parts []string
	for i := 0; i+1 < len(labels); i += 2 {
		parts = append(parts, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
	}
	key := name
	if len(parts) > 0 {
		// The text format sorts labels by name, as the callers give them.
		key += "{" + strings.Join(parts, ",") + "}"
	}
	v, ok := s[key]
	return v, ok
}

// has reports whether any sample of name exists.
func (s scrape) has(name string) bool {
	for k := range s {
		if k == name || strings.HasPrefix(k, name+"{") {
			return true
		}
	}
	return false
}

func adminGet(t *testing.T, url, token string) (int, string) {
	t.Helper()
	return adminDo(t, &http.Client{Timeout: 15 * time.Second}, url, token)
}

func adminDo(t *testing.T, c *http.Client, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

func scrapeMetrics(t *testing.T, gw *gateway, token string) scrape {
	t.Helper()
	code, text := adminGet(t, "http://"+gw.admin+"/metrics", token)
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, text)
	}
	s := scrape{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("/metrics line %q: %v", line, err)
		}
		s[line[:i]] = v
	}
	return s
}

// TestServeAdmin runs `dkimgw serve` with its admin listener: metrics
// move as messages flow, the bearer token is enforced, /readyz follows
// the token and the upstream.
func TestServeAdmin(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	t.Run("Metrics", func(t *testing.T) { testAdminMetrics(t, bin) })
	t.Run("BearerTokenTLS", func(t *testing.T) { testAdminBearerTokenTLS(t, bin) })
	t.Run("Readyz", func(t *testing.T) { testAdminReadyz(t, bin) })
}

func testAdminMetrics(t *testing.T, bin string) {
	_, uri, _ := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))
	if gw.admin == "" {
		t.Fatal("serve logged no admin listener")
	}
	before := scrapeMetrics(t, gw, "")
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "dkimgw_build_info", "dkimgw_token_sessions", "dkimgw_smtp_connections", "dkimgw_spool_bytes", "dkimgw_config_reloads_total"} {
		if !before.has(name) {
			t.Errorf("/metrics has no %s", name)
		}
	}
	if v, ok := before.get("dkimgw_key_state", "domain", "example.com", "selector", "rsa1", "state", "active"); !ok || v != 1 {
		t.Errorf("dkimgw_key_state of the fixed selector rsa1, active = %v (%v), want 1", v, ok)
	}

	for i := range 2 {
		id := fmt.Sprintf("m%d@e2e.test", i)
		if res := sendDirect(t, gw.addr, "a@example.com", []string{"x@example.net"}, testMessage("a@example.com", "x@example.net", id, "metrics", "Hello.\r\n")); res.data != nil {
			t.Fatalf("message %d: %v", i, res.data)
		}
	}
	res := sendDirect(t, gw.addr, "a@example.org", []string{"x@example.net"}, testMessage("a@example.org", "x@example.net", "other@e2e.test", "other", "Not ours.\r\n"))
	if code, _, _ := smtpCode(res.data); code != 550 {
		t.Fatalf("message From a domain the client may not use: %v, want 550", res.data)
	}
	// The transaction log line (and the metrics) follow the reply.
	deadline := time.Now().Add(10 * time.Second)
	var after scrape
	for {
		after = scrapeMetrics(t, gw, "")
		if v, _ := after.get("dkimgw_messages_total", "client", "mta", "domain", "", "outcome", "refused"); v == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	delta := func(name string, labels ...string) float64 {
		a, _ := after.get(name, labels...)
		b, _ := before.get(name, labels...)
		return a - b
	}
	checks := []struct {
		what string
		got  float64
		want float64
	}{
		{"signed messages", delta("dkimgw_messages_total", "client", "mta", "domain", "example.com", "outcome", "signed"), 2},
		{"refused messages (unknown From domain: no domain label)", delta("dkimgw_messages_total", "client", "mta", "domain", "", "outcome", "refused"), 1},
		{"rsa1 signatures", delta("dkimgw_signatures_total", "algorithm", "rsa-sha256", "domain", "example.com", "selector", "rsa1"), 2},
		{"ed1 signatures", delta("dkimgw_signatures_total", "algorithm", "ed25519-sha256", "domain", "example.com", "selector", "ed1"), 2},
		{"RSA sign latency observations", delta("dkimgw_token_sign_duration_seconds_count", "algorithm", "rsa-sha256"), 2},
		{"Ed25519 sign latency observations", delta("dkimgw_token_sign_duration_seconds_count", "algorithm", "ed25519-sha256"), 2},
		{"upstream 2xx replies", delta("dkimgw_upstream_replies_total", "class", "2xx"), 2},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: moved by %v, want %v", c.what, c.got, c.want)
		}
	}
	for k := range after {
		if strings.Contains(k, "example.org") {
			t.Errorf("a series names the unknown From domain: %s", k)
		}
	}
	if v, _ := after.get("dkimgw_token_sessions", "state", "idle"); v < 1 {
		t.Errorf("idle token sessions after signing = %v, want at least 1", v)
	}

	// A reload is counted, and so is a refused one.
	gw.signal(syscall.SIGHUP)
	waitMetric(t, gw, "", "dkimgw_config_reloads_total", []string{"result", "success"}, 1)
	gw.writeConfigText("not: [valid")
	gw.signal(syscall.SIGHUP)
	waitMetric(t, gw, "", "dkimgw_config_reloads_total", []string{"result", "failure"}, 1)
}

// waitMetric waits until a sample has the value want.
func waitMetric(t *testing.T, gw *gateway, token, name string, labels []string, want float64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, ok := scrapeMetrics(t, gw, token).get(name, labels...)
		if ok && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v = %v (present: %v), want %v", name, labels, got, ok, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// testAdminBearerTokenTLS: with admin.tls and a bearer token, /metrics
// and /readyz need the token over HTTPS; /healthz does not.
func testAdminBearerTokenTLS(t *testing.T, bin string) {
	_, uri, _ := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	const token = "s3cret-scraper-token-0123456789"
	tokFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM := testCert(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key")
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := standardConfig(uri, sink.Addr())
	cfg.admin = fmt.Sprintf("admin:\n  listen: \"127.0.0.1:0\"\n  bearer_token_file: %q\n  tls: {cert_file: %q, key_file: %q}\n", tokFile, certFile, keyFile)
	gw := startGateway(t, bin, cfg)
	base := "https://" + gw.admin
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(certPEM)
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "relay.test"},
	}}
	for _, c := range []struct {
		path, token string
		want        int
	}{
		{"/metrics", "", http.StatusUnauthorized},
		{"/metrics", "wrong", http.StatusUnauthorized},
		{"/metrics", token + "x", http.StatusUnauthorized},
		{"/metrics", token, http.StatusOK},
		{"/readyz", "", http.StatusUnauthorized},
		{"/readyz", token, http.StatusOK},
		{"/healthz", "", http.StatusOK},
	} {
		code, body := adminDo(t, client, base+c.path, c.token)
		if code != c.want {
			t.Errorf("GET %s with token %q: %d %s, want %d", c.path, c.token, code, body, c.want)
		}
		if c.want == http.StatusUnauthorized && strings.Contains(body, "dkimgw_") {
			t.Errorf("GET %s without the token leaked metrics: %s", c.path, body)
		}
	}
}

type readyBody struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks"`
}

func readyz(t *testing.T, gw *gateway) (int, readyBody) {
	t.Helper()
	code, text := adminGet(t, "http://"+gw.admin+"/readyz", "")
	var b readyBody
	if err := json.Unmarshal([]byte(text), &b); err != nil {
		t.Fatalf("/readyz body %q: %v", text, err)
	}
	return code, b
}

// waitReady polls /readyz until its status is want (bounded).
func waitReady(t *testing.T, gw *gateway, want int, what string) readyBody {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, b := readyz(t, gw)
		if code == want {
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: /readyz = %d %+v, want %d", what, code, b, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func testAdminReadyz(t *testing.T, bin string) {
	st, uri, _ := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))
	b := waitReady(t, gw, http.StatusOK, "at start")
	for _, c := range []string{"config", "token", "upstream"} {
		if b.Checks[c] != "ok" {
			t.Errorf("check %s = %q at start, want ok", c, b.Checks[c])
		}
	}

	// The token goes away, as in testNoLossTokenUnavailable.
	back := tokenAway(t, st)
	b = waitReady(t, gw, http.StatusServiceUnavailable, "token away")
	if b.Status != "unready" || b.Checks["token"] == "ok" || b.Checks["upstream"] != "ok" {
		t.Errorf("/readyz with the token away: %+v, want unready for the token only", b)
	}
	back()
	waitReady(t, gw, http.StatusOK, "token back")

	// The upstream stops listening.
	sink.Stop()
	b = waitReady(t, gw, http.StatusServiceUnavailable, "upstream down")
	if b.Checks["upstream"] == "ok" || b.Checks["token"] != "ok" {
		t.Errorf("/readyz with the upstream down: %+v, want unready for the upstream only", b)
	}
	sink.Start()
	waitReady(t, gw, http.StatusOK, "upstream back")
	if code, _ := adminGet(t, "http://"+gw.admin+"/healthz", ""); code != http.StatusOK {
		t.Errorf("/healthz = %d", code)
	}
}
