package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// TestSecretsNeverShown runs the real `dkimgw serve` with its PIN in a
// pin-source file and looks for the PIN (and a wrong one it was given)
// everywhere the process shows anything: its arguments and environment,
// its log at debug level through signing, refusals and a reload refused
// for a wrong PIN, its /metrics, /healthz and /readyz, the goroutine dump SIGQUIT makes the Go runtime print,
// and the output of `config check` and `keys list`, also when they fail
// with the PIN given inline. It ends by checking, with pkcs11-tool, that
// the keys are still sensitive and never extractable, and cannot be read.
func TestSecretsNeverShown(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end: builds and runs the binary (not in -short)")
	}
	bin := buildBinary(t, t.TempDir())
	st, uri, _ := e2eToken(t, standardKeys...)
	_, pinFile, ok := strings.Cut(uri, "pin-source=file:")
	if !ok {
		t.Fatalf("URI %q has no pin file", uri)
	}
	// The runtime prints every goroutine on SIGQUIT.
	t.Setenv("GOTRACEBACK", "all")
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, sink.Addr())
	gw := startGateway(t, bin, cfg)
	pid := gw.cmd.Process.Pid

	type output struct{ what, text string }
	var outputs []output
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		if err != nil {
			t.Fatal(err)
		}
		outputs = append(outputs, output{"/proc/PID/" + f, string(b)})
	}

	// Debug logging, by a reload (which reads the PIN again).
	mark := gw.mark()
	gw.writeConfigText(strings.Replace(cfg.yaml(), "level: info", "level: debug", 1))
	gw.signal(syscall.SIGHUP)
	gw.waitLog(mark, 30*time.Second, "configuration reloaded", func(l logLine) bool { return l.str("msg") == "configuration reloaded" })

	// Traffic: signed, refused for its domain, refused as malformed.
	if r := sendDirect(t, gw.addr, "a@example.com", []string{"x@example.net"},
		testMessage("news@example.com", "x@example.net", "s1@secrets.test", "signed", "hello\r\n")); r.data != nil {
		t.Fatalf("signed message: %v", r.data)
	}
	sendDirect(t, gw.addr, "a@example.com", []string{"x@example.net"},
		testMessage("news@other.test", "x@example.net", "s2@secrets.test", "refused", "hello\r\n"))
	sendDirect(t, gw.addr, "a@example.com", []string{"x@example.net"}, "Subject: no from\r\n\r\nx\r\n")

	// A wrong PIN in the pin file: the reload is refused and logged.
	const wrongPIN = "WrongPin7f3a9c"
	if err := os.WriteFile(pinFile, []byte(wrongPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mark = gw.mark()
	gw.signal(syscall.SIGHUP)
	gw.waitLog(mark, 30*time.Second, "reload refused", func(l logLine) bool { return strings.HasPrefix(l.str("msg"), "reload refused") })
	if err := os.WriteFile(pinFile, []byte(st.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// The admin listener's pages, after all of the above.
	if gw.admin == "" {
		t.Fatal("the gateway logged no admin listener")
	}
	for _, page := range []string{"/metrics", "/healthz", "/readyz"} {
		hc := http.Client{Timeout: 10 * time.Second}
		resp, err := hc.Get("http://" + gw.admin + page)
		if err != nil {
			t.Fatalf("GET %s: %v", page, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if page == "/metrics" && !strings.Contains(string(body), "dkimgw_") {
			t.Errorf("GET /metrics: %s, no dkimgw_ metric in %.300q", resp.Status, body)
		}
		outputs = append(outputs, output{"GET " + page, string(body)})
	}

	// The runtime's goroutine dump.
	gw.signal(syscall.SIGQUIT)
	gw.waitExit(30 * time.Second)
	log := gw.logText()
	if !strings.Contains(log, "SIGQUIT") || !strings.Contains(log, "goroutine ") {
		t.Errorf("no goroutine dump after SIGQUIT in the output:\n%.2000s", log)
	}
	outputs = append(outputs, output{"serve's output (log, SIGQUIT dump)", log})

	// The commands an operator runs, with the PIN from the file and inline.
	run := func(what string, env []string, args ...string) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, _ := cmd.CombinedOutput()
		outputs = append(outputs, output{what, string(out)})
	}
	run("config check", nil, "config", "check", "--config", gw.config)
	run("keys list", []string{"DKIMGW_HSM=" + uri}, "keys", "list")
	inline := strings.Replace(uri, "pin-source=file:"+pinFile, "pin-value="+st.PIN, 1)
	gone := strings.Replace(inline, "token="+st.Label, "token=no-such-token", 1)
	bad := gw.config + ".inline"
	if err := os.WriteFile(bad, []byte(strings.Replace(cfg.yaml(), uri, gone, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	run("config check, PIN inline, no such token", nil, "config", "check", "--config", bad)
	run("keys list, PIN inline, no such token", []string{"DKIMGW_HSM=" + gone}, "keys", "list")
	run("keys list, wrong PIN inline", []string{"DKIMGW_HSM=" + strings.Replace(inline, st.PIN, wrongPIN, 1)}, "keys", "list")
	run("serve, PIN inline, no such token", nil, "serve", "--config", bad)

	for _, o := range outputs {
		for _, secret := range []string{st.PIN, wrongPIN} {
			if strings.Contains(o.text, secret) {
				t.Errorf("%s shows a PIN:\n%.3000s", o.what, o.text)
			}
		}
	}
	// The failing runs did fail, and said why: the checks above looked
	// at real error output.
	for _, o := range outputs[len(outputs)-4:] {
		if !strings.Contains(o.text, "no-such-token") && !strings.Contains(strings.ToLower(o.text), "pin") {
			t.Errorf("%s: output does not say what failed:\n%s", o.what, o.text)
		}
	}

	// The two DKIM keys, and the audit key serve generated at start.
	checkKeysStayInToken(t, st, 3)
}

// checkKeysStayInToken checks with pkcs11-tool, independently of dkimgw's
// code, that the token's private keys are still sensitive and never
// extractable, and that reading one fails.
func checkKeysStayInToken(t *testing.T, st *testenv.SoftHSMToken, want int) {
	t.Helper()
	checkWithPkcs11Tool(t, st, want)
	tool := testenv.Require(t, "pkcs11-tool")[0]
	out, err := exec.Command(tool, "--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN,
		"--list-objects", "--type", "privkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	var ids []string
	for _, line := range strings.Split(string(out), "\n") {
		if id, ok := strings.CutPrefix(strings.TrimSpace(line), "ID:"); ok {
			ids = append(ids, strings.TrimSpace(id))
		}
	}
	if len(ids) != want {
		t.Fatalf("pkcs11-tool listed %d private key IDs, want %d:\n%s", len(ids), want, out)
	}
	// pkcs11-tool (OpenSC 0.23) answers a read of a private key with
	// "sorry, reading private keys not (yet) supported" and exit status
	// 0: what counts is that no byte of the key is written out.
	for _, id := range ids {
		dst := filepath.Join(t.TempDir(), "key-"+id)
		out, err := exec.Command(tool, "--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN,
			"--read-object", "--type", "privkey", "--id", id, "--output-file", dst).CombinedOutput()
		if b, rerr := os.ReadFile(dst); rerr == nil && len(b) > 0 {
			t.Errorf("pkcs11-tool read private key %s out of the token: %d bytes (exit %v): %s", id, len(b), err, out)
		}
	}
}
