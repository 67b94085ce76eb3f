package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestConfigCheck runs `dkimgw config check` against a real token: a good
// file passes, and each kind of problem gives its own exit status and
// says where it is.
func TestConfigCheck(t *testing.T) {
	st, uri, _ := e2eToken(t, standardKeys...)
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := standardConfig(uri, "127.0.0.1:10026")

	t.Run("valid", func(t *testing.T) {
		path := write("good.yaml", good.yaml())
		r := runCLI(t, nil, "", "config", "check", "--config", path)
		if r.code != exitOK || !strings.Contains(r.stdout, path+": OK") {
			t.Fatalf("exit %d, stdout %q, stderr %q; want 0 and %q", r.code, r.stdout, r.stderr, path+": OK")
		}
		for _, sel := range []string{"rsa1", "ed1"} {
			if !strings.Contains(r.stdout, "key "+sel+"._domainkey.example.com: ok") {
				t.Errorf("the report does not name key %s: %q", sel, r.stdout)
			}
		}
	})

	t.Run("warnings", func(t *testing.T) {
		cfg := good
		cfg.networks = []string{"127.0.0.1/32", "10.0.0.0/8"}
		path := write("wide.yaml", cfg.yaml())
		r := runCLI(t, nil, "", "config", "check", "--config", path)
		if r.code != exitOK || !strings.Contains(r.stdout, path+": OK") || !strings.Contains(r.stdout, "1 warnings") {
			t.Fatalf("exit %d, stdout %q, stderr %q; want 0, OK and 1 warning", r.code, r.stdout, r.stderr)
		}
		if want := "dkimgw: warning: " + path + ":"; !strings.Contains(r.stderr, want) || !strings.Contains(r.stderr, "10.0.0.0/8 is wider than /16") {
			t.Errorf("stderr %q: want %q and the wide network named", r.stderr, want)
		}
	})

	t.Run("unknown key", func(t *testing.T) {
		text := good.yaml()
		// Line 3 is "smtp:"; the typo goes on line 4.
		lines := strings.SplitAfter(text, "\n")
		if strings.TrimSpace(lines[2]) != "smtp:" {
			t.Fatalf("line 3 of the test config is %q, not smtp:", lines[2])
		}
		lines = slices.Insert(lines, 3, "  listn: \"127.0.0.1:25\"\n")
		path := write("typo.yaml", strings.Join(lines, ""))
		r := runCLI(t, nil, "", "config", "check", "--config", path)
		if r.code != exitConfig {
			t.Errorf("exit %d, want %d (EX_CONFIG); stderr %q", r.code, exitConfig, r.stderr)
		}
		if want := path + ":4:"; !strings.Contains(r.stderr, want) || !strings.Contains(r.stderr, "listn") {
			t.Errorf("stderr %q does not name %s and the key listn", r.stderr, want)
		}
	})

	t.Run("missing selector", func(t *testing.T) {
		cfg := good
		cfg.domains = map[string][]string{"example.com": {"rsa1", "nope"}}
		path := write("missing.yaml", cfg.yaml())
		r := runCLI(t, nil, "", "config", "check", "--config", path)
		if r.code != exitUnavailable {
			t.Errorf("exit %d, want %d (EX_UNAVAILABLE); stderr %q", r.code, exitUnavailable, r.stderr)
		}
		if !strings.Contains(r.stderr, "nope") || strings.Contains(r.stdout, "OK") {
			t.Errorf("stdout %q, stderr %q: want the missing selector named and no OK", r.stdout, r.stderr)
		}
	})

	t.Run("wrong PIN", func(t *testing.T) {
		pinFile := write("wrong.pin", "0000"+st.PIN+"\n")
		cfg := good
		cfg.uri = fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", st.Label, st.Module, pinFile)
		path := write("pin.yaml", cfg.yaml())
		r := runCLI(t, nil, "", "config", "check", "--config", path)
		if r.code != 77 {
			t.Errorf("exit %d, want 77 (EX_NOPERM); stderr %q", r.code, r.stderr)
		}
		if !strings.Contains(r.stderr, "PIN incorrect") {
			t.Errorf("stderr %q does not say the PIN is incorrect", r.stderr)
		}
		if strings.Contains(r.stderr+r.stdout, st.PIN) {
			t.Errorf("the output contains the PIN: %q", r.stderr)
		}
	})
}

// TestServe runs the real `dkimgw serve` binary, built once here, against
// a real SoftHSM token, a real Postfix, an SMTP sink and the independent
// DKIM verifiers.
func TestServe(t *testing.T) {
	if testing.Short() {
		t.Skip("end to end: builds and runs the binary with Postfix (not in -short)")
	}
	bin := buildBinary(t, t.TempDir())
	t.Run("PostfixRelaysSigned", func(t *testing.T) { testPostfixRelaysSigned(t, bin) })
	t.Run("NoLossUpstreamDown", func(t *testing.T) { testNoLossUpstreamDown(t, bin) })
	t.Run("NoLossTokenUnavailable", func(t *testing.T) { testNoLossTokenUnavailable(t, bin) })
	t.Run("PerRecipientReplies", func(t *testing.T) { testPerRecipientReplies(t, bin) })
	t.Run("BDAT", func(t *testing.T) { testBDAT(t, bin) })
	t.Run("SIGHUP", func(t *testing.T) { testSIGHUP(t, bin) })
	t.Run("SIGTERM", func(t *testing.T) { testSIGTERM(t, bin) })
	t.Run("DestroyedSelector", func(t *testing.T) { testDestroyedSelector(t, bin) })
	t.Run("PINChangeSIGHUP", func(t *testing.T) { testPINChangeSIGHUP(t, bin) })
	t.Run("SIGTERMHungToken", func(t *testing.T) { testSIGTERMHungToken(t, bin) })
}

// relay is the chain Postfix → dkimgw serve → sink of one test.
type relay struct {
	sink    *testenv.SMTPSink
	gw      *gateway
	pf      *testenv.Postfix
	st      *testenv.SoftHSMToken
	records map[string]string
}

func startRelay(t *testing.T, bin string) *relay {
	t.Helper()
	st, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))
	pf := testenv.StartPostfix(t, testenv.PostfixOptions{Relayhost: gw.addr})
	return &relay{sink: sink, gw: gw, pf: pf, st: st, records: records}
}

// waitTransaction waits for a transaction's log line after mark. The
// line is written before the reply that lets the test go on, but reaches
// the test through a pipe: without the wait, a line of the transaction
// before a mark can arrive after it.
func (r *relay) waitTransaction(mark int) {
	r.gw.waitLog(mark, 30*time.Second, "a transaction's log line", func(l logLine) bool {
		return l.str("msg") == "transaction"
	})
}

// tokenAway moves st's SoftHSM directory out of the token directory, as
// a token that vanishes (SoftHSM then fails every call), and returns the
// function that puts it back; the test's cleanup puts it back too.
func tokenAway(t *testing.T, st *testenv.SoftHSMToken) (back func()) {
	t.Helper()
	dir := st.Dir()
	if dir == "" {
		t.Fatal("the token's directory is not found")
	}
	away := filepath.Join(filepath.Dir(filepath.Dir(dir)), "away-"+filepath.Base(dir))
	if err := os.Rename(dir, away); err != nil {
		t.Fatal(err)
	}
	back = func() {
		if _, err := os.Stat(away); err == nil {
			if err := os.Rename(away, dir); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(back)
	return back
}

// submit hands one message to Postfix.
func (r *relay) submit(t *testing.T, from string, to []string, msg string) {
	t.Helper()
	if err := r.pf.Submit(t.Context(), from, to, []byte(msg)); err != nil {
		t.Fatalf("submit to Postfix: %v", err)
	}
}

// exactlyOne returns the one message with Message-ID id at the sink,
// failing the test when there is none or more than one.
func exactlyOne(t *testing.T, sink *testenv.SMTPSink, id string) testenv.SinkMessage {
	t.Helper()
	got := withID(sink.Messages(), id)
	if len(got) != 1 {
		t.Fatalf("the sink has %d copies of <%s>, want exactly 1", len(got), id)
	}
	return got[0]
}

// testPostfixRelaysSigned: messages submitted to Postfix, relayed
// through dkimgw, arrive at the sink with an RSA-2048 and an Ed25519
// signature from the token, and every verifier passes every signature.
func testPostfixRelaysSigned(t *testing.T, bin string) {
	r := startRelay(t, bin)
	msgs := []struct {
		from, to, id, text string
	}{
		{"news@mail.example.com", "alice@example.net", "plain@e2e.test", testMessage(
			"News <news@mail.example.com>", "alice@example.net", "plain@e2e.test",
			"Weekly news,\r\n folded onto a second line",
			"Hello Alice.\r\n.A line that starts with a dot.\r\n\r\nTrailing   spaces   \r\n")},
		{"zoe@example.com", "bob@example.net", "eightbit@e2e.test", testMessage(
			"Zoe <zoe@example.com>", "bob@example.net", "eightbit@e2e.test",
			"8bit body",
			"Grüße aus Köln — ça va? 日本語\r\n")},
		// SMTPUTF8: a UTF-8 sender and From field. The recipient stays
		// ASCII: Postfix sends a UTF-8 one as ORCPT=rfc822;<xtext of
		// UTF-8>, which go-smtp's server refuses with 501 5.5.4.
		{"zoë@example.com", "bjorn@example.net", "utf8@e2e.test", testMessage(
			"Zoë Ünïcode <zoë@example.com>", "bjorn@example.net", "utf8@e2e.test",
			"Grüße 日本語",
			"UTF-8 header fields.\r\n")},
	}
	for _, m := range msgs {
		r.submit(t, m.from, []string{m.to}, m.text)
	}
	r.sink.WaitMessages(t, len(msgs), 60*time.Second)
	r.pf.WaitEmpty(30 * time.Second)

	var relayed [][]byte
	for _, m := range msgs {
		got := exactlyOne(t, r.sink, m.id)
		if got.From != m.from || !slices.Equal(got.To, []string{m.to}) {
			t.Errorf("<%s>: envelope %s → %v, want %s → [%s]", m.id, got.From, got.To, m.from, m.to)
		}
		// Submit asks for SMTPUTF8 when the message has a non-ASCII byte;
		// Postfix and then dkimgw must pass that on.
		if utf8 := strings.ContainsFunc(m.text, func(r rune) bool { return r >= 0x80 }); got.MailOpts.UTF8 != utf8 {
			t.Errorf("<%s>: the sink saw SMTPUTF8=%v, want %v", m.id, got.MailOpts.UTF8, utf8)
		}
		// It went through Postfix (which adds its Received field) and its
		// body is unchanged.
		if !strings.Contains(string(got.Data), "by postfix.test") {
			t.Errorf("<%s> has no Received field from Postfix:\n%s", m.id, got.Data)
		}
		if want := body([]byte(m.text)); string(body(got.Data)) != string(want) {
			t.Errorf("<%s>: body changed:\n got %q\nwant %q", m.id, body(got.Data), want)
		}
		checkSigned(t, r.records, got.Data, standardSigs)
		relayed = append(relayed, got.Data)
	}
	verifyIndependently(t, r.records, standardSigs, relayed...)

	// One log line per transaction: signed, by whom, the upstream's reply.
	txs := r.gw.transactions(0)
	if len(txs) != len(msgs) {
		t.Fatalf("%d transaction log lines, want %d", len(txs), len(msgs))
	}
	for _, tx := range txs {
		sels, _ := tx.fields["selectors"].([]any)
		if tx.fields["signed"] != true || tx.str("d") != "example.com" || len(sels) != 2 ||
			tx.str("client") != "mta" || !strings.HasPrefix(tx.str("reply"), "250 ") ||
			!strings.Contains(tx.str("upstream"), "queued as SINK") {
			t.Errorf("transaction log line lacks what happened: %s", tx.raw)
		}
	}
	if strings.Contains(r.gw.logText(), r.st.PIN) {
		t.Error("the log contains the token PIN")
	}
}

// testNoLossUpstreamDown: with the sink down, dkimgw answers Postfix 4xx
// and Postfix keeps the message; once the sink is back and Postfix
// flushes, it arrives exactly once, signed.
func testNoLossUpstreamDown(t *testing.T, bin string) {
	r := startRelay(t, bin)
	// First a message through the whole chain, which also leaves an idle
	// pooled upstream connection behind for the sink to break.
	r.submit(t, "a@example.com", []string{"x@example.net"}, testMessage("a@example.com", "x@example.net", "before@e2e.test", "before", "Before.\r\n"))
	r.sink.WaitMessages(t, 1, 60*time.Second)
	r.pf.WaitEmpty(30 * time.Second)
	r.waitTransaction(0)

	r.sink.Stop()
	mark := r.gw.mark()
	r.submit(t, "a@example.com", []string{"x@example.net"}, testMessage("a@example.com", "x@example.net", "down@e2e.test", "down", "While the upstream was down.\r\n"))
	q := r.pf.WaitDeferred(1, 30*time.Second)
	// The deferral is dkimgw's 451 (upstream unavailable), not a failure
	// to reach dkimgw.
	if len(q[0].Recipients) != 1 || !strings.Contains(q[0].Recipients[0].DelayReason, "said: 451 4.4.") {
		t.Errorf("deferred with %+v, want dkimgw's 451 4.4.x", q[0].Recipients)
	}
	r.waitTransaction(mark)
	txs := r.gw.transactions(mark)
	for _, tx := range txs {
		if !strings.HasPrefix(tx.str("reply"), "451 ") {
			t.Errorf("transaction while the upstream was down: %s", tx.raw)
		}
	}
	if n := len(r.sink.Messages()); n != 1 {
		t.Fatalf("the sink has %d messages while it was down, want 1", n)
	}

	r.sink.Start()
	r.pf.Flush()
	r.sink.WaitMessages(t, 2, 60*time.Second)
	r.pf.WaitEmpty(30 * time.Second)
	if n := len(r.sink.Messages()); n != 2 {
		t.Fatalf("the sink has %d messages, want 2", n)
	}
	got := exactlyOne(t, r.sink, "down@e2e.test")
	checkSigned(t, r.records, got.Data, standardSigs)
	verifyIndependently(t, r.records, standardSigs, got.Data)
}

// testNoLossTokenUnavailable: with the token gone (its SoftHSM directory
// moved away), dkimgw answers 451 4.7.0 and relays nothing; Postfix keeps
// the message. Once the token is back, dkimgw's token layer recovers by
// itself and, after a flush, the message arrives exactly once, signed.
func testNoLossTokenUnavailable(t *testing.T, bin string) {
	r := startRelay(t, bin)
	r.submit(t, "a@example.com", []string{"x@example.net"}, testMessage("a@example.com", "x@example.net", "before@e2e.test", "before", "Before.\r\n"))
	r.sink.WaitMessages(t, 1, 60*time.Second)
	r.pf.WaitEmpty(30 * time.Second)
	r.waitTransaction(0)

	back := tokenAway(t, r.st)

	mark := r.gw.mark()
	r.submit(t, "a@example.com", []string{"x@example.net"}, testMessage("a@example.com", "x@example.net", "notoken@e2e.test", "no token", "While the token was away.\r\n"))
	q := r.pf.WaitDeferred(1, 30*time.Second)
	if len(q[0].Recipients) != 1 || !strings.Contains(q[0].Recipients[0].DelayReason, "said: 451 4.7.0") {
		t.Errorf("deferred with %+v, want dkimgw's 451 4.7.0", q[0].Recipients)
	}
	r.waitTransaction(mark)
	txs := r.gw.transactions(mark)
	for _, tx := range txs {
		if tx.fields["signed"] != false || !strings.HasPrefix(tx.str("reply"), "451 4.7.0") || tx.fields["temporary"] != true {
			t.Errorf("transaction while the token was away: %s", tx.raw)
		}
	}
	// Nothing went out unsigned.
	if n := len(r.sink.Messages()); n != 1 {
		t.Fatalf("the sink has %d messages while the token was away, want 1", n)
	}

	mark = r.gw.mark()
	back()
	r.pf.Flush()
	r.sink.WaitMessages(t, 2, 60*time.Second)
	r.pf.WaitEmpty(30 * time.Second)
	if n := len(r.sink.Messages()); n != 2 {
		t.Fatalf("the sink has %d messages, want 2", n)
	}
	got := exactlyOne(t, r.sink, "notoken@e2e.test")
	checkSigned(t, r.records, got.Data, standardSigs)
	verifyIndependently(t, r.records, standardSigs, got.Data)
	r.gw.waitLog(mark, time.Second, "the token's recovery", func(l logLine) bool {
		return l.str("msg") == "token recovered"
	})
}

// testBDAT: messages sent with CHUNKING (BDAT, as Exim sends when offered
// it), in several chunks and with an empty BDAT 0 LAST, arrive signed,
// unchanged, and every verifier passes every signature.
func testBDAT(t *testing.T, bin string) {
	_, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))

	long := strings.Repeat("A body line long enough to need a few chunks, with a trailing space \r\n", 200)
	tests := []struct {
		id        string
		body      string
		cuts      []int // where the chunks end, into the whole message
		emptyLast bool
	}{
		{"one-chunk@e2e.test", "One chunk, with LAST.\r\n", nil, false},
		{"three-chunks@e2e.test", long, []int{10, 4000}, false},
		{"empty-last@e2e.test", long + ".A line with a leading dot (not stuffed in BDAT).\r\n", []int{300, 9000}, true},
	}
	var relayed [][]byte
	for i, tt := range tests {
		msg := testMessage("News <news@mail.example.com>", "rcpt@example.net", tt.id, "BDAT "+tt.id, tt.body)
		if reply := sendBDAT(t, gw.addr, "news@mail.example.com", []string{"rcpt@example.net"}, msg, tt.cuts, tt.emptyLast); !strings.HasPrefix(reply, "250 ") || !strings.Contains(reply, fmt.Sprintf("queued as SINK%d", i+1)) {
			t.Fatalf("<%s>: reply to BDAT LAST %q, want the upstream's 250", tt.id, reply)
		}
		got := exactlyOne(t, sink, tt.id)
		if !strings.HasSuffix(string(got.Data), msg) {
			t.Errorf("<%s>: the relayed message does not end with the one sent:\n%s", tt.id, got.Data)
		}
		checkSigned(t, records, got.Data, standardSigs)
		relayed = append(relayed, got.Data)
	}
	verifyIndependently(t, records, standardSigs, relayed...)
	for _, tx := range gw.transactions(0) {
		if tx.fields["signed"] != true || !strings.HasPrefix(tx.str("reply"), "250 ") {
			t.Errorf("transaction log line: %s", tx.raw)
		}
	}
}

// testPerRecipientReplies: through the binary, each RCPT gets the
// upstream's own reply, and the upstream gets the message once for the
// recipients it accepted.
func testPerRecipientReplies(t *testing.T, bin string) {
	_, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	sink.RejectRecipient("nobody@example.net", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "sink: nobody here"})
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))

	to := []string{"one@example.net", "nobody@example.net", "two@example.net"}
	res := sendDirect(t, gw.addr, "news@example.com", to,
		testMessage("news@example.com", "one@example.net, two@example.net", "rcpt@e2e.test", "three recipients", "Hi.\r\n"))
	if res.mail != nil {
		t.Fatalf("MAIL: %v", res.mail)
	}
	for i, err := range res.rcpt {
		code, ec, text := smtpCode(err)
		if to[i] == "nobody@example.net" {
			if code != 550 || ec != (smtp.EnhancedCode{5, 1, 1}) || !strings.Contains(text, "sink: nobody here") {
				t.Errorf("RCPT %s: %v, want the sink's 550 5.1.1", to[i], err)
			}
		} else if err != nil {
			t.Errorf("RCPT %s: %v, want 250", to[i], err)
		}
	}
	if res.data != nil || !strings.Contains(res.dataText, "queued as SINK1") {
		t.Fatalf("DATA: %v %q, want the sink's 250", res.data, res.dataText)
	}
	msgs := sink.WaitMessages(t, 1, 10*time.Second)
	if len(msgs) != 1 || !slices.Equal(msgs[0].To, []string{"one@example.net", "two@example.net"}) {
		t.Fatalf("the sink got %d message(s), the first for %v; want 1 for [one two]", len(msgs), msgs[0].To)
	}
	checkSigned(t, records, msgs[0].Data, standardSigs)
}

// testSIGHUP: a broken configuration is refused and the old one keeps
// serving; a valid changed one takes effect.
func testSIGHUP(t *testing.T, bin string) {
	_, uri, records := e2eToken(t, append(slices.Clone(standardKeys), tokenKey{"example.org", "rsa2", hsm.RSA2048})...)
	sink := testenv.NewSMTPSink(t)
	cfg := standardConfig(uri, sink.Addr())
	// A network wider than /48 validates, with a warning at start.
	cfg.networks = []string{"127.0.0.1/32", "2001:db8::/32"}
	gw := startGateway(t, bin, cfg)
	if l := gw.waitLog(0, 30*time.Second, "the start-up warning", func(l logLine) bool {
		return l.str("msg") == "configuration warning" || l.str("msg") == "dkimgw serving"
	}); l.str("level") != "WARN" || !strings.Contains(l.str("warning"), "2001:db8::/32 is wider than /48") {
		t.Errorf("at start: logged %s, want a WARN naming 2001:db8::/32", l.raw)
	}
	orgMsg := func(id string) string {
		return testMessage("info@example.org", "x@example.net", id, "org", "From example.org.\r\n")
	}
	// example.org is not allowed, and stays so until a good reload: a
	// configuration refused but partly applied would change this.
	orgRefused := func(when string) {
		t.Helper()
		res := sendDirect(t, gw.addr, "info@example.org", []string{"x@example.net"}, orgMsg("org-"+when+"@e2e.test"))
		if code, ec, text := smtpCode(res.data); code != 550 || ec != (smtp.EnhancedCode{5, 7, 1}) || !strings.Contains(text, "example.org") {
			t.Errorf("%s: From example.org: DATA %v, want 550 5.7.1 naming the domain", when, res.data)
		}
	}
	// example.com mail is signed as the first configuration says.
	comSigned := func(id string) {
		t.Helper()
		n := len(sink.Messages())
		res := sendDirect(t, gw.addr, "news@example.com", []string{"x@example.net"},
			testMessage("news@example.com", "x@example.net", id, "com", "From example.com.\r\n"))
		if res.data != nil {
			t.Fatalf("<%s>: DATA %v, want 250", id, res.data)
		}
		sink.WaitMessages(t, n+1, 10*time.Second)
		checkSigned(t, records, exactlyOne(t, sink, id).Data, standardSigs)
	}
	orgRefused("at start")

	broken := []struct {
		name, text, says string
	}{
		{"unknown key", strings.Replace(cfg.yaml(), "smtp:\n", "smtp:\n  listn: \"127.0.0.1:25\"\n", 1), "dkimgw.yaml:4: unknown key \"listn\""},
		{"selector not in the token", gwConfig{
			uri: uri, upstream: sink.Addr(),
			clientDomains: []string{"example.com", "example.org"},
			domains:       map[string][]string{"example.com": {"rsa1", "ed1"}, "example.org": {"nope"}},
		}.yaml(), "nope"},
	}
	for _, b := range broken {
		mark := gw.mark()
		gw.writeConfigText(b.text)
		gw.signal(syscall.SIGHUP)
		l := gw.waitLog(mark, 30*time.Second, "the refused reload", func(l logLine) bool {
			return strings.HasPrefix(l.str("msg"), "reload refused") || l.str("msg") == "configuration reloaded"
		})
		if !strings.HasPrefix(l.str("msg"), "reload refused") || l.str("level") != "ERROR" || !strings.Contains(l.str("error"), b.says) {
			t.Errorf("%s: SIGHUP logged %s, want an ERROR refusing it that says %q", b.name, l.raw, b.says)
		}
		if gw.exited() {
			t.Fatalf("%s: dkimgw exited after SIGHUP", b.name)
		}
		orgRefused("after " + b.name)
		comSigned("com-" + strings.ReplaceAll(b.name, " ", "-") + "@e2e.test")
	}

	// A valid change: example.org becomes allowed, signed with rsa2.
	good := cfg
	good.clientDomains = []string{"example.com", "example.org"}
	good.domains = map[string][]string{"example.com": {"rsa1", "ed1"}, "example.org": {"rsa2"}}
	good.networks = []string{"127.0.0.1/32", "10.0.0.0/8"}
	mark := gw.mark()
	gw.writeConfig(good)
	gw.signal(syscall.SIGHUP)
	l := gw.waitLog(mark, 30*time.Second, "the reload", func(l logLine) bool {
		return strings.HasPrefix(l.str("msg"), "reload refused") || l.str("msg") == "configuration reloaded"
	})
	if l.str("msg") != "configuration reloaded" {
		t.Fatalf("a valid configuration was not reloaded: %s", l.raw)
	}
	// Its warning is logged too.
	if l := gw.waitLog(mark, 30*time.Second, "the reload's warning", func(l logLine) bool {
		return l.str("msg") == "configuration warning" && strings.Contains(l.str("warning"), "10.0.0.0/8")
	}); l.str("level") != "WARN" {
		t.Errorf("after the reload: logged %s, want a WARN naming 10.0.0.0/8", l.raw)
	}
	n := len(sink.Messages())
	res := sendDirect(t, gw.addr, "info@example.org", []string{"x@example.net"}, orgMsg("org-after-reload@e2e.test"))
	if res.data != nil {
		t.Fatalf("From example.org after the reload: DATA %v, want 250", res.data)
	}
	sink.WaitMessages(t, n+1, 10*time.Second)
	got := exactlyOne(t, sink, "org-after-reload@e2e.test")
	orgSigs := []wantSig{{"example.org", "rsa2", "rsa-sha256"}}
	checkSigned(t, records, got.Data, orgSigs)
	verifyIndependently(t, records, orgSigs, got.Data)
	comSigned("com-after-reload@e2e.test")
}

// testSIGTERM: SIGTERM while a transaction waits for a slow upstream
// stops new connections at once, lets the transaction finish with the
// upstream's 250, and exits 0.
func testSIGTERM(t *testing.T, bin string) {
	_, uri, records := e2eToken(t, standardKeys...)
	sink := testenv.NewSMTPSink(t)
	gw := startGateway(t, bin, standardConfig(uri, sink.Addr()))
	const delay = 2 * time.Second
	sink.DelayData(delay)

	c := dialSMTP(t, gw.addr)
	defer c.Close()
	if err := c.Mail("news@example.com", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	if err := c.Rcpt("x@example.net", nil); err != nil {
		t.Fatalf("RCPT: %v", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	msg := testMessage("news@example.com", "x@example.net", "inflight@e2e.test", "in flight", "Sent while dkimgw stops.\r\n")
	if _, err := w.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	type reply struct {
		text string
		err  error
		at   time.Time
	}
	replied := make(chan reply, 1)
	go func() {
		resp, err := w.CloseWithResponse()
		r := reply{err: err, at: time.Now()}
		if resp != nil {
			r.text = resp.StatusText
		}
		replied <- r
	}()

	mark := gw.mark()
	gw.signal(syscall.SIGTERM)
	gw.waitLog(mark, 10*time.Second, "shutting down", func(l logLine) bool { return l.str("msg") == "shutting down" })
	// New connections are refused while the transaction is still in flight.
	deadline := time.Now().Add(delay)
	for {
		refused, how := dialRefused(gw.addr)
		if refused {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dkimgw still greets new connections after SIGTERM: %s", how)
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case r := <-replied:
		t.Fatalf("the transaction ended (%v %q) before new connections were refused: it was not in flight", r.err, r.text)
	default:
	}

	var r reply
	select {
	case r = <-replied:
	case <-time.After(30 * time.Second):
		t.Fatal("no reply to the transaction in flight")
	}
	if r.err != nil || !strings.Contains(r.text, "queued as SINK1") {
		t.Fatalf("the transaction in flight got %v %q, want the sink's 250", r.err, r.text)
	}
	checkSigned(t, records, exactlyOne(t, sink, "inflight@e2e.test").Data, standardSigs)
	if code := gw.waitExit(30 * time.Second); code != 0 {
		t.Errorf("dkimgw exited with status %d after SIGTERM, want 0", code)
	}
	gw.waitLog(mark, time.Second, "stopped", func(l logLine) bool { return l.str("msg") == "stopped" })
	for _, l := range gw.logLines(mark) {
		if l.str("msg") == "shutdown: transactions cut short" {
			t.Errorf("the shutdown cut the transaction short: %s", l.raw)
		}
	}
	if refused, how := dialRefused(gw.addr); !refused {
		t.Errorf("a connection after exit was served: %s", how)
	}
}
