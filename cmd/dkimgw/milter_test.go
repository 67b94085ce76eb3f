package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	gomilter "github.com/d--j/go-milter"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestMilter runs `dkimgw milter` behind a real Postfix (smtpd_milters):
// what Postfix delivers to the sink is signed by the token's keys and
// verifies with every independent verifier.
func TestMilter(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end: builds and runs the binary with Postfix (not in -short)")
	}
	bin := buildBinary(t, t.TempDir())
	// The subtests wait on Postfix far more than they compute: two at a
	// time (go test's -parallel is GOMAXPROCS) keep the whole under a
	// minute on a 2-core machine.
	for _, st := range []struct {
		name string
		run  func(*testing.T, string)
	}{
		{"PostfixSigns", testMilterPostfixSigns},
		{"Unauthorized", testMilterUnauthorized},
		{"UnauthorizedAudited", testMilterUnauthorizedAudited},
		{"TokenOutage", testMilterTokenOutage},
		{"ChrootedUnixSocket", testMilterChrootedUnixSocket},
		{"BesideOpenDKIM", testMilterBesideOpenDKIM},
		{"ServeToo", testServeRunsTheMilter},
	} {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			st.run(t, bin)
		})
	}
}

// testServeRunsTheMilter: serve with milter.listen set runs the relay
// and the milter, with the same keys: one Postfix signs through the
// milter, a message relayed through serve is signed too.
func testServeRunsTheMilter(t *testing.T, bin string) {
	_, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, sink.Addr())
	cfg.extra = "milter:\n  listen: \"inet:127.0.0.1:0\"\n"
	gw := startGateway(t, bin, cfg)
	l := gw.waitLog(0, 30*time.Second, "the milter listener", func(l logLine) bool { return l.str("msg") == "dkimgw milter serving" })
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Relayhost: sink.Addr(), Settings: map[string]string{
		"smtpd_milters": "inet:" + l.str("milter_listen"), "milter_default_action": "tempfail",
	}})
	msg := testMessage("a@example.com", "x@example.net", "viamilter@milter.test", "via the milter", "Signed by the milter of serve.\r\n")
	if err := pf.Submit(t.Context(), "a@example.com", []string{"x@example.net"}, []byte(msg)); err != nil {
		t.Fatalf("Postfix refused: %v", err)
	}
	msg2 := testMessage("a@example.com", "x@example.net", "viarelay@milter.test", "via the relay", "Signed by the relay.\r\n")
	if res := sendDirect(t, gw.addr, "a@example.com", []string{"x@example.net"}, msg2); res.data != nil {
		t.Fatalf("relay refused: %+v", res)
	}
	sink.WaitMessages(t, 2, 60*time.Second)
	for _, id := range []string{"viamilter@milter.test", "viarelay@milter.test"} {
		checkSigned(t, records, exactlyOne(t, sink, id).Data, standardSigs)
	}
}

// milterChain is Postfix → (milter: dkimgw) → sink.
type milterChain struct {
	sink    *testenv.SMTPSink
	gw      *gateway
	pf      *testenv.Postfix
	st      *testenv.SoftHSMToken
	records map[string]string
	cfg     gwConfig
}

// startMilterChain starts a token with the standard keys, `dkimgw
// milter` with the standard configuration plus extra (which must set
// milter.listen), and a Postfix that uses it and relays to a sink.
func startMilterChain(t *testing.T, bin string, networks []string, extra string) *milterChain {
	t.Helper()
	st, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, "")
	cfg.networks = networks
	cfg.extra = extra
	gw := startGatewayAs(t, bin, cfg, "milter")
	milter := "inet:" + gw.addr
	if strings.HasPrefix(gw.addr, "/") {
		milter = "unix:" + gw.addr
	}
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Relayhost: sink.Addr(), Settings: map[string]string{
		"smtpd_milters":          milter,
		"non_smtpd_milters":      milter,
		"milter_default_action":  "tempfail",
		"milter_protocol":        "6",
		"milter_connect_timeout": "10s",
	}})
	return &milterChain{sink: sink, gw: gw, pf: pf, st: st, records: records, cfg: cfg}
}

func (c *milterChain) submit(t *testing.T, from, to, msg string) error {
	t.Helper()
	return c.pf.Submit(t.Context(), from, []string{to}, []byte(msg))
}

// waitMessage waits for the gateway's log line of one message after mark.
func (c *milterChain) waitMessage(mark int) logLine {
	return c.gw.waitLog(mark, 30*time.Second, "a message's log line", func(l logLine) bool {
		return l.str("msg") == "message"
	})
}

func testMilterPostfixSigns(t *testing.T, bin string) {
	c := startMilterChain(t, bin, nil, "milter:\n  listen: \"inet:127.0.0.1:0\"\n")
	msgs := []struct{ from, to, id, text string }{
		{"news@mail.example.com", "alice@example.net", "plain@milter.test", testMessage(
			"News <news@mail.example.com>", "alice@example.net", "plain@milter.test",
			"Weekly news,\r\n folded onto a second line",
			"Hello Alice.\r\n.A line that starts with a dot.\r\n\r\nTrailing   spaces   \r\n\r\n\r\n")},
		{"zoe@example.com", "bob@example.net", "eightbit@milter.test", testMessage(
			"Zoe <zoe@example.com>", "bob@example.net", "eightbit@milter.test",
			"8bit body",
			"Grüße aus Köln — ça va? 日本語\r\n")},
		{"big@example.com", "carol@example.net", "big@milter.test", testMessage(
			"Big <big@example.com>", "carol@example.net", "big@milter.test",
			"larger than the milter's 64 KB chunks",
			strings.Repeat("0123456789 abcdefghij klmnopqrst\r\n", 10000))},
		// A header field with a tab after its colon and one without a
		// space: signed as the MTA delivers them.
		{"tab@example.com", "dave@example.net", "tab@milter.test", strings.Replace(testMessage(
			"Tab <tab@example.com>", "dave@example.net", "tab@milter.test", "x", "Body.\r\n"),
			"Subject: x\r\n", "Subject:\tx\r\nTo:dave2@example.net\r\n", 1)},
	}
	for _, m := range msgs {
		if err := c.submit(t, m.from, m.to, m.text); err != nil {
			t.Fatalf("<%s>: Postfix refused: %v", m.id, err)
		}
	}
	c.sink.WaitMessages(t, len(msgs), 60*time.Second)
	c.pf.WaitEmpty(30 * time.Second)
	var delivered [][]byte
	for _, m := range msgs {
		got := exactlyOne(t, c.sink, m.id)
		if want := body([]byte(m.text)); string(body(got.Data)) != string(want) {
			t.Errorf("<%s>: body changed:\n got %q\nwant %q", m.id, body(got.Data), want)
		}
		checkSigned(t, c.records, got.Data, standardSigs)
		delivered = append(delivered, got.Data)
	}
	verifyIndependently(t, c.records, standardSigs, delivered...)
	// A milter-only gateway has no upstream: it is ready with its token.
	if code, b := readyz(t, c.gw); code != 200 {
		t.Errorf("/readyz of dkimgw milter = %d %+v, want 200", code, b)
	}
	// The relay's metrics count the milter's messages and signatures.
	waitMetric(t, c.gw, "", "dkimgw_messages_total", []string{"client", "mta", "domain", "example.com", "outcome", "signed"}, float64(len(msgs)))
	waitMetric(t, c.gw, "", "dkimgw_signatures_total", []string{"algorithm", "ed25519-sha256", "domain", "example.com", "selector", "ed1"}, float64(len(msgs)))
	if strings.Contains(c.gw.logText(), c.st.PIN) {
		t.Error("the log contains the token PIN")
	}
	testMilterNonSMTP(t, c)
}

// testMilterNonSMTP: mail that enters Postfix through its sendmail
// command (pickup, non_smtpd_milters) reaches the milter as a connection
// from 127.0.0.1, and is signed for a client whose networks hold it.
func testMilterNonSMTP(t *testing.T, c *milterChain) {
	testenv.Require(t, "/usr/sbin/sendmail")
	mark := c.gw.mark()
	before := len(c.sink.Messages())
	msg := testMessage("a@example.com", "x@example.net", "nonsmtp@milter.test", "sendmail command", "Through pickup.\r\n")
	cmd := exec.CommandContext(t.Context(), "/usr/sbin/sendmail", "-C", c.pf.ConfigDir(), "-f", "a@example.com", "x@example.net")
	cmd.Stdin = strings.NewReader(strings.ReplaceAll(msg, "\r\n", "\n"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sendmail: %v\n%s", err, out)
	}
	c.sink.WaitMessages(t, before+1, 60*time.Second)
	checkSigned(t, c.records, exactlyOne(t, c.sink, "nonsmtp@milter.test").Data, standardSigs)
	if l := c.waitMessage(mark); l.str("recognised_by") != "address 127.0.0.1" {
		t.Errorf("the milter recognised the client by %q, want address 127.0.0.1: %s", l.str("recognised_by"), l.raw)
	}
}

// testMilterUnauthorized: a client that the clients table does not
// know passes unsigned by default; after a reload with on_unauthorized:
// reject, Postfix refuses its message with the milter's 550.
func testMilterUnauthorized(t *testing.T, bin string) {
	c := startMilterChain(t, bin, []string{"192.0.2.0/24"}, "milter:\n  listen: \"inet:127.0.0.1:0\"\n")
	msg := testMessage("a@example.com", "x@example.net", "unauth@milter.test", "unauthorized", "Not ours to sign.\r\n")
	if err := c.submit(t, "a@example.com", "x@example.net", msg); err != nil {
		t.Fatalf("Postfix refused: %v", err)
	}
	c.sink.WaitMessages(t, 1, 60*time.Second)
	got := exactlyOne(t, c.sink, "unauth@milter.test")
	if strings.Contains(strings.ToLower(string(got.Data)), "dkim-signature") {
		t.Errorf("an unauthorized client's message was signed:\n%s", got.Data)
	}

	cfg := c.cfg
	cfg.extra = "milter:\n  listen: \"inet:127.0.0.1:0\"\n  on_unauthorized: reject\n"
	mark := c.gw.mark()
	c.gw.writeConfig(cfg)
	c.gw.signal(syscall.SIGHUP)
	c.gw.waitLog(mark, 30*time.Second, "the reload", func(l logLine) bool { return l.str("msg") == "configuration reloaded" })

	msg = testMessage("a@example.com", "x@example.net", "refused@milter.test", "refused", "Refused.\r\n")
	err := c.submit(t, "a@example.com", "x@example.net", msg)
	if code, ec, _ := smtpCode(err); code != 550 || ec[0] != 5 || ec[1] != 7 || ec[2] != 1 {
		t.Fatalf("submit after on_unauthorized: reject: %v, want 550 5.7.1", err)
	}
	if n := len(withID(c.sink.Messages(), "refused@milter.test")); n != 0 {
		t.Errorf("the refused message reached the sink %d times", n)
	}
}

// testMilterUnauthorizedAudited: a client's message From a domain it may
// not use, refused by the milter, is in the audit log's summary of
// refusals as the relay's are: one "authorization refused" record per
// client and domain, written at the latest when the gateway stops.
func testMilterUnauthorizedAudited(t *testing.T, bin string) {
	c := startMilterChain(t, bin, nil, "milter:\n  listen: \"inet:127.0.0.1:0\"\n")
	// The client (Postfix, 127.0.0.1) now signs for a subdomain only.
	cfg := c.cfg
	cfg.clientDomains = []string{"mail.example.com"}
	cfg.extra = "milter:\n  listen: \"inet:127.0.0.1:0\"\n  on_unauthorized: reject\n"
	mark := c.gw.mark()
	c.gw.writeConfig(cfg)
	c.gw.signal(syscall.SIGHUP)
	c.gw.waitLog(mark, 30*time.Second, "the reload", func(l logLine) bool { return l.str("msg") == "configuration reloaded" })
	for i := range 2 {
		id := fmt.Sprintf("audited-%d@milter.test", i)
		err := c.submit(t, "a@example.com", "x@example.net", testMessage("a@example.com", "x@example.net", id, "refused", "Refused.\r\n"))
		if code, ec, _ := smtpCode(err); code != 550 || ec != [3]int{5, 7, 1} {
			t.Fatalf("submit From a domain the client may not use: %v, want 550 5.7.1", err)
		}
	}
	c.gw.signal(syscall.SIGTERM)
	if code := c.gw.waitExit(30 * time.Second); code != 0 {
		t.Fatalf("dkimgw milter exited %d after SIGTERM", code)
	}
	var got []audit.Record
	for _, r := range readAudit(t, filepath.Join(filepath.Dir(c.gw.config), "audit.log")) {
		if r.Event == audit.EventUnauthorized {
			got = append(got, r)
		}
	}
	if len(got) != 1 || got[0].Domain != "example.com" || got[0].Details["client"] != "mta" || got[0].Details["messages"] != float64(2) {
		t.Errorf("authorization refused records %+v, want one for client mta, example.com, 2 messages", got)
	}
}

// testMilterTokenOutage: with the token gone, Postfix answers its client
// 451 (the milter's tempfail) and nothing unsigned reaches the sink.
func testMilterTokenOutage(t *testing.T, bin string) {
	c := startMilterChain(t, bin, nil, "milter:\n  listen: \"inet:127.0.0.1:0\"\n")
	tokenAway(t, c.st)
	mark := c.gw.mark()
	msg := testMessage("a@example.com", "x@example.net", "outage@milter.test", "outage", "During the outage.\r\n")
	err := c.submit(t, "a@example.com", "x@example.net", msg)
	if code, ec, _ := smtpCode(err); code != 451 || ec[0] != 4 || ec[1] != 7 || ec[2] != 0 {
		t.Fatalf("submit during a token outage: %v, want 451 4.7.0", err)
	}
	l := c.waitMessage(mark)
	if !strings.HasPrefix(l.str("outcome"), "tempfailed") {
		t.Errorf("log line: %s", l.raw)
	}
	// Postfix refused the message: it is not in its queue either.
	if q := c.pf.Queue(); len(q) != 0 {
		t.Errorf("Postfix queued the message it refused: %+v", q)
	}
	if n := len(c.sink.Messages()); n != 0 {
		t.Errorf("%d messages reached the sink during the token outage", n)
	}
}

// fileGID is the group of a file, as user.Group.Gid spells it.
func fileGID(fi os.FileInfo) string {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return strconv.Itoa(int(st.Gid))
	}
	return ""
}

// TestImportOpenDKIM converts a KeyTable and a refile: SigningTable in
// the format Debian's opendkim documents (README.opendkim, opendkim.conf(5)),
// generates the replacement keys with the commands it prints, and the
// configuration it wrote passes 'config check' against the token.
func TestImportOpenDKIM(t *testing.T) {
	st := testenv.SoftHSM(t)
	uri := st.URIWithPINFile(t)
	dir := t.TempDir()
	keyDir := filepath.Join(dir, "keys")
	if err := os.MkdirAll(keyDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// A key file that exists; its content must never be read.
	secret := "-----BEGIN PRIVATE KEY-----\nNOT A REAL KEY, AND NEVER TO BE COPIED\n-----END PRIVATE KEY-----\n"
	if err := os.WriteFile(filepath.Join(keyDir, "excom"), []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	keyTable := filepath.Join(dir, "keytable")
	signingTable := filepath.Join(dir, "signingtable")
	writeFile(t, keyTable, `# KeyTable, as README.opendkim writes it
preskey	example.com:foo:`+keyDir+`/president
comkey	example.com:bar:`+keyDir+`/excom
netkey	example.net:baz:`+keyDir+`/exnet
anykey	%:any:`+keyDir+`/any
`)
	writeFile(t, signingTable, `president@example.com	preskey
*@example.com		comkey
*@*.example.net		netkey
*@example.org		comkey
*			anykey
`)
	out := filepath.Join(dir, "dkimgw.yaml")
	r := runCLI(t, nil, "", "milter", "import-opendkim", "--keytable", keyTable, "--signingtable", "refile:"+signingTable, "--hsm", uri, "--out", out)
	if r.code != exitOK {
		t.Fatalf("exit %d, stderr:\n%s", r.code, r.stderr)
	}
	for _, want := range []string{
		keyDir + "/excom  (d=example.com s=bar, present)",
		keyDir + "/exnet  (d=example.net s=baz, missing)",
		"*@example.org is signed with d=example.com", // not a parent: left out
		"signingtable:5: *: a pattern for every From domain",
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	conf, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(conf)+r.stderr+r.stdout, "NEVER TO BE COPIED") {
		t.Fatal("the key file's content was read into the output")
	}

	// Before the keys exist, config check says which are missing.
	if r := runCLI(t, nil, "", "config", "check", "--config", out); r.code == exitOK {
		t.Fatalf("config check passed before the replacement keys were generated:\n%s", r.stdout)
	}
	var gens int
	for _, line := range strings.Split(r.stderr, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "dkimgw keys generate ") {
			continue
		}
		gens++
		args := strings.Fields(strings.TrimPrefix(line, "dkimgw "))
		for i, a := range args {
			args[i] = strings.Trim(a, "'")
		}
		env := map[string]string{auditEnv: filepath.Join(dir, "audit.log")}
		if g := runCLI(t, env, "", args...); g.code != exitOK {
			t.Fatalf("%s: exit %d\n%s", line, g.code, g.stderr)
		}
	}
	// foo and bar for example.com, baz for example.net.
	if gens != 3 {
		t.Fatalf("%d generate commands, want 3:\n%s", gens, r.stderr)
	}
	c := runCLI(t, nil, "", "config", "check", "--config", out)
	if c.code != exitOK {
		t.Fatalf("config check of the imported configuration: exit %d\n%s%s\nconfiguration:\n%s", c.code, c.stdout, c.stderr, conf)
	}
	for _, want := range []string{"foo-hsm._domainkey.example.com: ok", "bar-hsm._domainkey.example.com: ok", "baz-hsm._domainkey.example.net: ok"} {
		if !strings.Contains(c.stdout, want) {
			t.Errorf("config check does not report %q:\n%s", want, c.stdout)
		}
	}
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// testMilterChrootedUnixSocket: Debian runs smtpd chrooted in the queue
// directory; the milter socket is then made inside it, with mode 0660
// and group postfix (smtpd runs as postfix), and Postfix names it
// relative to the chroot. SIGTERM removes the socket. (An unchrooted
// smtpd with the socket anywhere it can traverse works too: measured
// while this test was written, not kept, as it adds nothing.)
func testMilterChrootedUnixSocket(t *testing.T, bin string) {
	g, err := user.LookupGroup("postfix")
	if err != nil {
		t.Fatalf("the postfix group: %v", err)
	}
	_, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Relayhost: sink.Addr(), ChrootSMTPD: true, Settings: map[string]string{
		"smtpd_milters": "unix:/dkimgw/milter.sock", "milter_default_action": "tempfail",
	}})
	sock := filepath.Join(pf.QueueDir(), "dkimgw", "milter.sock")
	cfg := standardConfig(uri, "")
	cfg.extra = "milter:\n  listen: \"unix:" + sock + "\"\n  socket_mode: \"0660\"\n  socket_group: postfix\n"
	gw := startGatewayAs(t, bin, cfg, "milter")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want 0660", fi.Mode().Perm())
	}
	if gid := fileGID(fi); gid != g.Gid {
		t.Errorf("socket group %s, want postfix (%s)", gid, g.Gid)
	}
	msg := testMessage("a@example.com", "x@example.net", "chroot@milter.test", "chroot", "Through a chrooted smtpd.\r\n")
	if err := pf.Submit(t.Context(), "a@example.com", []string{"x@example.net"}, []byte(msg)); err != nil {
		t.Fatalf("Postfix refused: %v", err)
	}
	sink.WaitMessages(t, 1, 60*time.Second)
	checkSigned(t, records, exactlyOne(t, sink, "chroot@milter.test").Data, standardSigs)

	gw.signal(syscall.SIGTERM)
	if code := gw.waitExit(30 * time.Second); code != 0 {
		t.Errorf("dkimgw milter exited %d after SIGTERM", code)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("the socket is left behind after SIGTERM: %v", err)
	}
}

// testMilterBesideOpenDKIM: during a switch (docs/milter.md), Postfix runs
// the OpenDKIM milter and then dkimgw's; each message carries both
// signatures and every verifier passes all three (OpenDKIM's file key,
// dkimgw's RSA and Ed25519).
func testMilterBesideOpenDKIM(t *testing.T, bin string) {
	testenv.Require(t, "/usr/sbin/opendkim")
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "odk.private"), string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	odkAddr := l.Addr().(*net.TCPAddr)
	l.Close()
	writeFile(t, filepath.Join(dir, "opendkim.conf"), fmt.Sprintf(`Mode s
Domain example.com
Selector odk
KeyFile %s/odk.private
Canonicalization relaxed/relaxed
Socket inet:%d@127.0.0.1
PidFile %s/opendkim.pid
InternalHosts 127.0.0.1
Syslog no
RequireSafeKeys false
Background no
`, dir, odkAddr.Port, dir))
	odk := exec.Command("/usr/sbin/opendkim", "-f", "-x", filepath.Join(dir, "opendkim.conf"))
	odk.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var odkOut strings.Builder
	odk.Stdout, odk.Stderr = &odkOut, &odkOut
	if err := odk.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = odk.Process.Kill()
		_ = odk.Wait()
		if t.Failed() {
			t.Logf("opendkim:\n%s", odkOut.String())
		}
	})
	for i := 0; ; i++ {
		if c, err := net.DialTimeout("tcp", odkAddr.String(), time.Second); err == nil {
			c.Close()
			break
		}
		if i == 100 {
			t.Fatal("opendkim does not listen after 10s")
		}
		time.Sleep(100 * time.Millisecond)
	}

	_, uri, records := e2eToken(t, standardKeys...)
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	records["odk._domainkey.example.com"] = "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(pub)
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, "")
	cfg.extra = "milter:\n  listen: \"inet:127.0.0.1:0\"\n"
	gw := startGatewayAs(t, bin, cfg, "milter")
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Relayhost: sink.Addr(), Settings: map[string]string{
		"smtpd_milters": "inet:" + odkAddr.String() + ", inet:" + gw.addr, "milter_default_action": "tempfail",
	}})
	msg := testMessage("News <news@example.com>", "x@example.net", "both@milter.test", "both milters", "Signed twice.\r\n")
	if err := pf.Submit(t.Context(), "news@example.com", []string{"x@example.net"}, []byte(msg)); err != nil {
		t.Fatalf("Postfix refused: %v", err)
	}
	sink.WaitMessages(t, 1, 60*time.Second)
	got := exactlyOne(t, sink, "both@milter.test")
	want := append(slices.Clone(standardSigs), wantSig{"example.com", "odk", "rsa-sha256"})
	verifyIndependently(t, records, want, got.Data)
}

// TestMilterMaxConnections: past milter.max_connections a connection
// waits to be accepted, and is served once another one closes.
func TestMilterMaxConnections(t *testing.T) {
	cfg, err := policy.Parse(filepath.Join(t.TempDir(), "dkimgw.yaml"), []byte(`hsm: {uri: "pkcs11:token=x"}
clients: [{name: mta, networks: ["127.0.0.1/32"], domains: [example.com]}]
domains: {example.com: {selectors: [s1]}}
milter: {listen: "inet:127.0.0.1:0", max_connections: 1}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := startMilter(cfg, &keyring{}, nil, nil, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 1)
	ms.serve(errs)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := ms.shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	session := func(timeout time.Duration) (*gomilter.ClientSession, error) {
		return gomilter.NewClient("tcp", ms.addr(), gomilter.WithReadTimeout(timeout)).Session(nil)
	}
	first, err := session(10 * time.Second)
	if err != nil {
		t.Fatalf("first connection: %v", err)
	}
	if s, err := session(time.Second); err == nil {
		s.Close()
		t.Fatal("a second connection was served while max_connections (1) was in use")
	}
	first.Close()
	third, err := session(10 * time.Second)
	if err != nil {
		t.Fatalf("a connection after the first closed: %v", err)
	}
	third.Close()
}

// TestListenMilterUnixSocket: a stale socket left by a crash is
// replaced; a socket another process serves, or a path that is not a
// socket, is refused and left alone.
func TestListenMilterUnixSocket(t *testing.T) {
	dir := t.TempDir()
	m := func(path string) policy.Milter {
		cfg, err := policy.Parse(filepath.Join(dir, "dkimgw.yaml"), []byte(`hsm: {uri: "pkcs11:token=x"}
clients: [{name: mta, networks: ["127.0.0.1/32"], domains: [example.com]}]
domains: {example.com: {selectors: [s1]}}
milter: {listen: "unix:`+path+`", socket_mode: "0600"}
`), nil)
		if err != nil {
			t.Fatal(err)
		}
		return cfg.Milter
	}

	// Stale: a socket file nobody listens on.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	nl, err := listenMilter(m(stale))
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	if fi, err := os.Stat(stale); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("new socket: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}

	// Live: the socket just made is served.
	if _, err := listenMilter(m(stale)); err == nil || !strings.Contains(err.Error(), "another process serves") {
		t.Errorf("over a live socket: %v", err)
	}
	nl.Close()
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Errorf("closing the listener left the socket: %v", err)
	}

	// Not a socket: refused, untouched.
	file := filepath.Join(dir, "file")
	writeFile(t, file, "keep me")
	if _, err := listenMilter(m(file)); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("over a regular file: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Errorf("the regular file was touched: %q, %v", b, err)
	}
}
