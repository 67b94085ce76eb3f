package main

// The token in another process: dkimgw loads p11-kit-client.so, which
// talks over a Unix socket to a p11-kit server in front of SoftHSM, the
// shape of a network HSM and its vendor's client library. The gateway
// gets no SoftHSM configuration: it cannot reach the token's files.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// p11kitEnv is what a dkimgw process needs to reach s: the server's
// address, and a SOFTHSM2_CONF that names no file, so that the process
// provably works without the token's store.
func p11kitEnv(t *testing.T, s *testenv.P11KitServer) []string {
	return []string{"SOFTHSM2_CONF=" + filepath.Join(t.TempDir(), "absent.conf"), s.Env()}
}

// runBin runs the dkimgw binary with env added to the test's and returns
// its exit status, stdout and stderr.
func runBin(t *testing.T, bin string, env []string, stdin []byte, args ...string) (int, []byte, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(cmd.Environ(), env...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("dkimgw %s: %v", strings.Join(args, " "), err)
	}
	return cmd.ProcessState.ExitCode(), stdout.Bytes(), stderr.String()
}

var quoted = regexp.MustCompile(`"([^"]*)"`)

// zoneRecord turns the zone-file line `keys generate` prints into the
// record map of the verifiers (owner name → TXT value).
func zoneRecord(t *testing.T, line string) map[string]string {
	t.Helper()
	f := strings.Fields(line)
	var val strings.Builder
	for _, m := range quoted.FindAllStringSubmatch(line, -1) {
		val.WriteString(m[1])
	}
	if len(f) < 5 || val.Len() == 0 {
		t.Fatalf("not a zone-file TXT line: %q", line)
	}
	return map[string]string{strings.TrimSuffix(f[0], "."): val.String()}
}

func TestP11Kit(t *testing.T) {
	bin := buildBinary(t, t.TempDir())
	s := testenv.StartP11Kit(t)
	uri := s.URIWithPINFile(t)
	env := p11kitEnv(t, s)
	audit := filepath.Join(t.TempDir(), "audit.log")

	// Key generation through the server: RSA works; Ed25519 does not,
	// because p11-kit's RPC carries neither CKM_EC_EDWARDS_KEY_PAIR_GEN
	// nor CKM_EDDSA (it drops both from the mechanism list), which
	// dkimgw reports as a missing mechanism.
	code, out, errText := runBin(t, bin, env, nil, "keys", "generate", "--hsm", uri, "--audit-log", audit,
		"--domain", "example.com", "--selector", "rsa1", "--algorithm", "rsa-2048")
	if code != exitOK {
		t.Fatalf("keys generate rsa-2048 through p11-kit: exit %d\n%s", code, errText)
	}
	records := zoneRecord(t, strings.TrimSpace(string(out)))
	code, _, errText = runBin(t, bin, env, nil, "keys", "generate", "--hsm", uri, "--audit-log", audit,
		"--domain", "example.com", "--selector", "ed1", "--algorithm", "ed25519")
	if code != exitUnavailable || !strings.Contains(errText, "CKM_EC_EDWARDS_KEY_PAIR_GEN") {
		t.Errorf("keys generate ed25519 through p11-kit: exit %d, %q; want %d naming the missing mechanism", code, errText, exitUnavailable)
	}

	// An Ed25519 key made in the token directly (SoftHSM can) is listed
	// through p11-kit, but as unusable; sign refuses it as a missing
	// mechanism (exit 69), not as a token failure.
	code, _, errText = runBin(t, bin, []string{s.DirectEnv()}, nil, "keys", "generate", "--hsm", s.DirectURI(), "--audit-log", audit,
		"--domain", "example.com", "--selector", "ed1", "--algorithm", "ed25519")
	if code != exitOK {
		t.Fatalf("keys generate ed25519 in SoftHSM directly: exit %d\n%s", code, errText)
	}
	t.Run("Ed25519Unusable", func(t *testing.T) {
		keys, out := listKeysJSON(t, bin, env, uri)
		found := false
		for _, k := range keys {
			if k.Selector == "ed1" {
				found = true
				if k.Usable || !strings.Contains(k.Problem, "CKM_EDDSA") {
					t.Errorf("keys list through p11-kit shows ed1 usable=%v problem=%q; want unusable, naming CKM_EDDSA", k.Usable, k.Problem)
				}
			}
		}
		if !found {
			t.Fatalf("keys list through p11-kit does not show ed1: %s", out)
		}
		msg := testMessage("a@example.com", "b@example.net", "ed@p11kit.test", "p11-kit", "Ed25519.\r\n")
		code, out, errText = runBin(t, bin, env, []byte(msg), "sign", "--hsm", uri, "--domain", "example.com", "--selector", "ed1")
		if code != exitKeyUnusable || len(out) != 0 || !strings.Contains(errText, "CKM_EDDSA") {
			t.Errorf("sign with ed1 through p11-kit: exit %d, %d bytes out, %q; want %d, nothing, naming CKM_EDDSA", code, len(out), errText, exitKeyUnusable)
		}
		// A configuration that names it is refused before serve starts.
		cfg := gwConfig{uri: uri, upstream: "127.0.0.1:1", clientDomains: []string{"example.com"},
			domains: map[string][]string{"example.com": {"rsa1", "ed1"}}}
		path := filepath.Join(t.TempDir(), "dkimgw.yaml")
		text := cfg.yaml() + fmt.Sprintf("audit: {path: %q}\n", filepath.Join(t.TempDir(), "audit.log"))
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errText = runBin(t, bin, env, nil, "config", "check", "--config", path)
		if code != exitUnavailable || !strings.Contains(errText, "ed1") || !strings.Contains(errText, "CKM_EDDSA") {
			t.Errorf("config check with ed1 through p11-kit: exit %d, %q; want %d naming ed1 and CKM_EDDSA", code, errText, exitUnavailable)
		}
	})

	t.Run("ServerAbsent", func(t *testing.T) {
		absent := "unix:path=" + filepath.Join(t.TempDir(), "absent.sock")
		code, _, errText := runBin(t, bin, []string{testenv.P11KitAddressEnv + "=" + absent}, nil, "keys", "list", "--hsm", uri)
		if code != exitConfig || !strings.Contains(errText, "$P11_KIT_SERVER_ADDRESS says (now: "+absent+")") {
			t.Errorf("keys list with no p11-kit server: exit %d, %q; want %d and a hint naming the server's address", code, errText, exitConfig)
		}
	})

	t.Run("KeysList", func(t *testing.T) {
		keys, _ := listKeysJSON(t, bin, env, uri)
		var k keyJSON
		for _, key := range keys {
			if key.Selector == "rsa1" {
				k = key
			}
		}
		if k.Selector != "rsa1" || k.Algorithm != "rsa-2048" || k.Extractable || !k.Sensitive || !k.NeverExtractable ||
			!k.AlwaysSensitive || !k.Local || k.Decrypt || k.Unwrap || k.Derive || !k.Usable {
			t.Errorf("keys list through p11-kit: %+v; want a sensitive, never-extractable, local, sign-only, usable rsa-2048 key", k)
		}
	})

	t.Run("Sign", func(t *testing.T) {
		msg := testMessage("a@example.com", "b@example.net", "sign@p11kit.test", "p11-kit", "Signed in another process.\r\n")
		code, out, errText := runBin(t, bin, env, []byte(msg), "sign", "--hsm", uri, "--domain", "example.com", "--selector", "rsa1")
		if code != exitOK {
			t.Fatalf("sign through p11-kit: exit %d\n%s", code, errText)
		}
		want := []wantSig{{"example.com", "rsa1", "rsa-sha256"}}
		checkSigned(t, records, out, want)
		res := testenv.DKIMPy.Verify(t, records, out)
		if len(res) != 1 || len(res[0]) != 1 || !res[0][0].Pass {
			t.Errorf("dkimpy on the message signed through p11-kit: %v", res)
		}
	})

	t.Run("Serve", func(t *testing.T) { testP11KitServe(t, bin, s, uri, records) })
}

// testP11KitServe: serve relays signed mail with the token in the p11-kit
// server. When the server and its token processes are killed, every
// message gets a 4xx (nothing is relayed, signed or not) and /readyz says
// unready; when the server starts again on the same socket, the gateway
// signs again without a restart.
func testP11KitServe(t *testing.T, bin string, s *testenv.P11KitServer, uri string, records map[string]string) {
	sink := testenv.NewSMTPSink(t)
	cfg := gwConfig{
		uri: uri, upstream: sink.Addr(),
		clientDomains: []string{"example.com"},
		domains:       map[string][]string{"example.com": {"rsa1"}},
		env:           p11kitEnv(t, s),
	}
	gw := startGateway(t, bin, cfg)
	want := []wantSig{{"example.com", "rsa1", "rsa-sha256"}}
	msg := func(id string) string {
		return testMessage("a@example.com", "b@example.net", id, "p11-kit "+id, "Relayed with the token in another process.\r\n")
	}

	if r := sendDirect(t, gw.addr, "a@example.com", []string{"b@example.net"}, msg("before@p11kit.test")); r.data != nil {
		t.Fatalf("before the kill: %v", r.data)
	}
	checkSigned(t, records, exactlyOne(t, sink, "before@p11kit.test").Data, want)
	waitReady(t, gw, http.StatusOK, "with the p11-kit server up")

	s.Kill()
	mark := gw.mark()
	for i := range 3 {
		r := sendDirect(t, gw.addr, "a@example.com", []string{"b@example.net"}, msg("dead"+string(rune('a'+i))+"@p11kit.test"))
		if code, _, text := smtpCode(r.data); code/100 != 4 {
			t.Errorf("message %d with the p11-kit server dead: reply %d %q (%v), want 4xx", i, code, text, r.data)
		}
	}
	if n := len(sink.Messages()); n != 1 {
		t.Fatalf("the sink has %d messages after the p11-kit server died, want the 1 from before", n)
	}
	for _, tx := range gw.transactions(mark) {
		if tx.fields["signed"] != false || !strings.HasPrefix(tx.str("reply"), "451 4.7.0") {
			t.Errorf("transaction with the p11-kit server dead: %s", tx.raw)
		}
	}
	b := waitReady(t, gw, http.StatusServiceUnavailable, "with the p11-kit server dead")
	if b.Checks["token"] == "ok" {
		t.Errorf("/readyz token check %q with the p11-kit server dead", b.Checks["token"])
	}
	for _, l := range gw.logLines(mark) {
		if l.str("msg") == "token operation failed, recovering" {
			t.Logf("measured: %s → recovery %q", l.str("error"), l.str("recovery"))
			break
		}
	}

	mark = gw.mark()
	s.Restart()
	restarted := time.Now()
	var recovered time.Duration
	for i := 0; ; i++ {
		id := "after" + string(rune('a'+i%26)) + "@p11kit.test"
		r := sendDirect(t, gw.addr, "a@example.com", []string{"b@example.net"}, msg(id))
		if r.data == nil {
			recovered = time.Since(restarted)
			got := exactlyOne(t, sink, id)
			checkSigned(t, records, got.Data, want)
			res := testenv.DKIMPy.Verify(t, records, got.Data)
			if len(res) != 1 || len(res[0]) != 1 || !res[0][0].Pass {
				t.Errorf("dkimpy on the message relayed after the restart: %v", res)
			}
			t.Logf("measured: message %d after the p11-kit server's restart was signed and relayed, %v after the restart", i+1, recovered.Round(time.Millisecond))
			break
		}
		if code, _, _ := smtpCode(r.data); code/100 != 4 {
			t.Fatalf("after the restart: reply %v, want 250 or 4xx", r.data)
		}
		if time.Since(restarted) > 30*time.Second || i > 200 {
			t.Fatalf("the gateway does not sign 30s after the p11-kit server came back: %v", r.data)
		}
		time.Sleep(100 * time.Millisecond)
	}
	gw.waitLog(mark, 10*time.Second, "the token's recovery", func(l logLine) bool {
		return l.str("msg") == "token recovered"
	})
	waitReady(t, gw, http.StatusOK, "after the p11-kit server's restart")
	if n := len(sink.Messages()); n != 2 {
		t.Errorf("the sink has %d messages, want 2 (before the kill, after the restart)", n)
	}
}

// listKeysJSON runs keys list --json through the token at uri and
// returns the keys and the raw output.
func listKeysJSON(t *testing.T, bin string, env []string, uri string) ([]keyJSON, []byte) {
	t.Helper()
	code, out, errText := runBin(t, bin, env, nil, "keys", "list", "--json", "--hsm", uri)
	if code != exitOK {
		t.Fatalf("keys list: exit %d\n%s", code, errText)
	}
	var keys []keyJSON
	if err := json.Unmarshal(out, &keys); err != nil {
		t.Fatalf("keys list --json: %v\n%s", err, out)
	}
	return keys, out
}
