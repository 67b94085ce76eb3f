package main

// End-to-end tests of serve when the token misbehaves: a key destroyed
// behind its back, a PIN changed behind its back, a token call that hangs.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// testDestroyedSelector: a selector destroyed in the token while dkimgw
// serves (rotation, an operator) gets its domain's mail 451 4.7.0 with a
// log line naming it, cheaply: no re-initialisation of the module, no
// recovery for the other domain's keys, which go on signing.
func testDestroyedSelector(t *testing.T, bin string) {
	st, uri, records := e2eToken(t, append(slices.Clone(standardKeys), tokenKey{"example.org", "rsa2", hsm.RSA2048})...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, gwConfig{
		uri: uri, upstream: sink.Addr(),
		clientDomains: []string{"example.com", "example.org"},
		domains:       map[string][]string{"example.com": {"rsa1", "ed1"}, "example.org": {"rsa2"}},
	})
	orgSigs := []wantSig{{"example.org", "rsa2", "rsa-sha256"}}
	send := func(domain, id string) smtpResult {
		return sendDirect(t, gw.addr, "news@"+domain, []string{"x@example.net"},
			testMessage("news@"+domain, "x@example.net", id, domain, "From "+domain+".\r\n"))
	}
	orgSigned := func(id string) {
		t.Helper()
		n := len(sink.Messages())
		if res := send("example.org", id); res.data != nil {
			t.Fatalf("<%s>: DATA %v, want 250", id, res.data)
		}
		sink.WaitMessages(t, n+1, 10*time.Second)
		checkSigned(t, records, exactlyOne(t, sink, id).Data, orgSigs)
	}
	if res := send("example.com", "com-before@e2e.test"); res.data != nil {
		t.Fatalf("example.com before the destruction: DATA %v, want 250", res.data)
	}
	orgSigned("org-before@e2e.test")

	// Another process destroys ed1, as `dkimgw keys destroy` does.
	out, err := exec.Command(bin, "keys", "destroy", "--domain", "example.com", "--selector", "ed1", "--yes", "--hsm", st.URI()).CombinedOutput()
	if err != nil {
		t.Fatalf("keys destroy: %v\n%s", err, out)
	}
	mark := gw.mark()
	for i := range 3 {
		res := send("example.com", "com-after@e2e.test")
		if code, ec, _ := smtpCode(res.data); code != 451 || ec != (smtp.EnhancedCode{4, 7, 0}) {
			t.Errorf("example.com after ed1 was destroyed: DATA %v, want 451 4.7.0", res.data)
		}
		orgSigned("org-after-" + string(rune('a'+i)) + "@e2e.test")
		// Longer than the module's re-initialisation throttle, so that an
		// escalating recovery would show each time.
		time.Sleep(600 * time.Millisecond)
	}
	for _, tx := range gw.transactions(mark) {
		if tx.str("from_domain") == "example.com" && !strings.Contains(tx.str("error"), "ed1._domainkey.example.com") {
			t.Errorf("the transaction's log line does not name the destroyed selector: %s", tx.raw)
		}
	}
	recoveries := 0
	for _, l := range gw.logLines(mark) {
		switch msg := l.str("msg"); {
		case strings.Contains(msg, "re-initialis"):
			t.Errorf("a destroyed key re-initialised the module: %s", l.raw)
		case msg == "token operation failed, recovering":
			recoveries++
			if !strings.Contains(l.str("op"), "ed1._domainkey") {
				t.Errorf("another key had to recover: %s", l.raw)
			}
		}
	}
	if recoveries > 1 {
		t.Errorf("%d recoveries for the destroyed key, want at most 1 (then it is known gone)", recoveries)
	}
}

// testPINChangeSIGHUP: the user PIN is changed in the token and the token
// restarts (its files go away and come back), so dkimgw must log in again
// with the PIN it has. That login fails once; later mail gets 451 without
// another login (real HSMs lock the PIN after a few). Once the pin file
// has the new PIN, SIGHUP re-opens the token and mail is signed again.
func testPINChangeSIGHUP(t *testing.T, bin string) {
	st, uri, records := e2eToken(t, standardKeys...)
	_, pinFile, ok := strings.Cut(uri, "pin-source=file:")
	if !ok {
		t.Fatalf("URI %q has no pin file", uri)
	}
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, sink.Addr())
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	cfg.extra += fmt.Sprintf("audit: {path: %q, checkpoint_every: 1s}\n", auditPath)
	gw := startGateway(t, bin, cfg)
	send := func(id string) smtpResult {
		return sendDirect(t, gw.addr, "news@example.com", []string{"x@example.net"},
			testMessage("news@example.com", "x@example.net", id, "pin", "PIN change.\r\n"))
	}
	if res := send("before@e2e.test"); res.data != nil {
		t.Fatalf("before the PIN change: DATA %v, want 250", res.data)
	}

	newPIN := "n" + st.PIN
	out, err := exec.Command("pkcs11-tool", "--module", st.Module, "--token-label", st.Label,
		"--login", "--pin", st.PIN, "--change-pin", "--new-pin", newPIN).CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --change-pin: %v\n%s", err, out)
	}
	// The token restarts: away, then back.
	back := tokenAway(t, st)
	if code, _, _ := smtpCode(send("away@e2e.test").data); code != 451 {
		t.Fatalf("with the token away: reply %d, want 451", code)
	}
	back()

	// dkimgw finds the token again and logs in with the old PIN: refused.
	mark := gw.mark()
	var failedAt int
	for i := 0; ; i++ {
		res := send("old-pin@e2e.test")
		if code, ec, _ := smtpCode(res.data); code != 451 || ec != (smtp.EnhancedCode{4, 7, 0}) {
			t.Fatalf("with the old PIN: DATA %v, want 451 4.7.0", res.data)
		}
		if txs := gw.transactions(mark); len(txs) > 0 && strings.Contains(txs[len(txs)-1].str("error"), "PIN incorrect") {
			failedAt = gw.mark()
			break
		}
		if i == 20 {
			t.Fatalf("dkimgw never tried the old PIN; log:\n%s", gw.logText())
		}
		time.Sleep(300 * time.Millisecond)
	}
	for range 5 {
		res := send("old-pin@e2e.test")
		if code, _, _ := smtpCode(res.data); code != 451 {
			t.Fatalf("with the old PIN: DATA %v, want 451", res.data)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, l := range gw.logLines(failedAt) {
		if l.str("msg") == "token operation failed, recovering" {
			t.Errorf("after the PIN failed, dkimgw went on trying: %s", l.raw)
		}
	}
	for _, tx := range gw.transactions(failedAt) {
		if !strings.Contains(tx.str("error"), "PIN incorrect") || strings.Count(tx.str("error"), "hsm: ") != 1 {
			t.Errorf("transaction after the PIN failed: %s", tx.raw)
		}
	}
	if strings.Contains(gw.logText(), st.PIN) {
		t.Error("the log contains the PIN")
	}

	// The login the token refused is in the audit log (within a
	// checkpoint period), once.
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := 0
		for _, r := range readAudit(t, auditPath) {
			if r.Event == audit.EventLoginFailed {
				n++
			}
		}
		if n == 1 {
			break
		}
		if n > 1 || time.Now().After(deadline) {
			t.Fatalf("%d %q records in the audit log", n, audit.EventLoginFailed)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The operator puts the new PIN in the pin file and sends SIGHUP.
	if err := os.WriteFile(pinFile, []byte(newPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mark = gw.mark()
	gw.signal(syscall.SIGHUP)
	l := gw.waitLog(mark, 30*time.Second, "the reload", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "reload refused") || l.str("msg") == "configuration reloaded"
	})
	if l.str("msg") != "configuration reloaded" {
		t.Fatalf("the reload with the new PIN was refused: %s", l.raw)
	}
	n := len(sink.Messages())
	if res := send("new-pin@e2e.test"); res.data != nil {
		t.Fatalf("after the reload with the new PIN: DATA %v, want 250", res.data)
	}
	sink.WaitMessages(t, n+1, 10*time.Second)
	checkSigned(t, records, exactlyOne(t, sink, "new-pin@e2e.test").Data, standardSigs)
}

// testSIGTERMHungToken: a token call hangs (SoftHSM waits for a lock on
// the token's files that this test holds: a network HSM that stopped
// answering) while a transaction signs. SIGTERM still ends dkimgw within
// shutdown_grace, with exit status 0, and the transaction is not
// answered 250.
func testSIGTERMHungToken(t *testing.T, bin string) {
	st, uri, _ := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, sink.Addr())
	const grace = 3 * time.Second
	cfg.grace = grace.String()
	gw := startGateway(t, bin, cfg)
	send := func(id string) smtpResult {
		return sendDirect(t, gw.addr, "news@example.com", []string{"x@example.net"},
			testMessage("news@example.com", "x@example.net", id, "hung", "Hung token.\r\n"))
	}
	if res := send("before@e2e.test"); res.data != nil {
		t.Fatalf("before the token hangs: DATA %v, want 250", res.data)
	}

	unlock := lockFiles(t, st.Dir())
	defer unlock()
	replied := make(chan smtpResult, 1)
	go func() { replied <- send("hung@e2e.test") }()
	// Let the transaction reach the token and hang there; nothing to
	// observe from outside, so give it a moment.
	time.Sleep(time.Second)
	select {
	case r := <-replied:
		t.Fatalf("the transaction ended (%v) although the token hangs", r.data)
	default:
	}

	mark := gw.mark()
	gw.signal(syscall.SIGTERM)
	start := time.Now()
	// The margin covers a loaded machine; without the fix dkimgw never exits.
	if code := gw.waitExit(grace + 15*time.Second); code != 0 {
		t.Errorf("dkimgw exited with status %d after SIGTERM, want 0", code)
	}
	// (A -race binary sleeps a second more at exit.)
	t.Logf("dkimgw exited %v after SIGTERM (shutdown_grace %v)", time.Since(start).Round(time.Millisecond), grace)
	gw.waitLog(mark, time.Second, "stopped", func(l logLine) bool { return l.str("msg") == "stopped" })
	select {
	case r := <-replied:
		if r.data == nil {
			t.Error("the transaction whose signature hung got 250")
		}
	case <-time.After(10 * time.Second):
		t.Error("the client got no answer and no close after dkimgw exited")
	}
	if n := len(withID(sink.Messages(), "hung@e2e.test")); n != 0 {
		t.Errorf("the sink got the message whose signature hung %d times", n)
	}
}

// lockFiles takes a POSIX write lock on every file in dir, as another
// process holding them would, and returns the function that lets go.
// SoftHSM in another process then waits in fcntl(F_SETLKW) at its next
// access to them: a token call that hangs.
func lockFiles(t *testing.T, dir string) (unlock func()) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []*os.File
	unlock = func() {
		for _, f := range files {
			f.Close() // closing drops the process's locks on the file
		}
		files = nil
	}
	for _, e := range entries {
		f, err := os.OpenFile(filepath.Join(dir, e.Name()), os.O_RDWR, 0)
		if err != nil {
			unlock()
			t.Fatal(err)
		}
		files = append(files, f)
		lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0}
		if err := syscall.FcntlFlock(f.Fd(), syscall.F_SETLKW, &lk); err != nil {
			unlock()
			t.Fatalf("lock %s: %v", f.Name(), err)
		}
	}
	return unlock
}
