package smtpproxy

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/testenv"
)

// Security checks as tests: what dkimgw must never do for a client,
// whatever the client sends.

// TestNotAnOpenRelay: a host that is no client, neither by address nor
// by AUTH, gets 530 at MAIL from any source address, and nothing reaches
// the upstream.
func TestNotAnOpenRelay(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, `["127.0.0.0/8"]`, `["192.0.2.0/24"]`, 1))
	for _, src := range []string{"127.0.0.1", "127.0.0.2", "127.0.0.77", "127.1.2.3", "127.255.255.254"} {
		conn := dialFrom(t, src, h.addr)
		if l := readLine(t, conn); !strings.HasPrefix(l, "220 ") {
			t.Fatalf("from %s: greeting %q", src, l)
		}
		fmt.Fprintf(conn, "EHLO stranger\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n%s.\r\n", testMsg)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		all, _ := readAll(conn)
		if !strings.Contains(all, "\r\n530 5.7.0 ") || strings.Contains(all, "\r\n250 2.0.0 ") || strings.Contains(all, "\r\n354") {
			t.Errorf("from %s: replies %q, want 530 5.7.0 and no 250/354 after EHLO", src, all)
		}
	}
	if n := len(h.sink.Messages()); n != 0 {
		t.Errorf("the upstream got %d messages from strangers", n)
	}
	if got := strings.Count(h.logs.String(), "relay refused: unknown client"); got != 5 {
		t.Errorf("%d refusals logged, want 5", got)
	}
}

// lookalikeConfig: client "alpha" (every loopback address) may sign for
// a.example only; b.example belongs to another client.
const lookalikeConfig = `
hsm: {uri: "pkcs11:token=test"}
smtp: {hostname: dkimgw.test}
upstream: {address: "%s", timeout: 5s}
clients:
  - name: alpha
    networks: ["127.0.0.0/8"]
    domains: [a.example]
  - name: beta
    networks: ["192.0.2.0/24"]
    domains: [b.example]
domains:
  a.example: {selectors: [ed1]}
  b.example: {selectors: [ed1]}
`

// TestNoSignatureForAnotherDomain: a client allowed a.example cannot get
// b.example signed, nor a look-alike of either, nor through Sender or a
// second From. Whatever reaches the upstream is signed by a.example only,
// and its From domain, as a receiver parses it, is a.example.
func TestNoSignatureForAnotherDomain(t *testing.T) {
	h := newHarness(t, lookalikeConfig)
	keys := map[string]crypto.Signer{}
	for _, d := range []string{"a.example", "b.example"} {
		_, k, _ := ed25519.GenerateKey(rand.Reader)
		keys["ed1._domainkey."+d] = k
	}
	h.keys.mu.Lock()
	h.keys.keys = keys
	h.keys.mu.Unlock()

	cases := []struct {
		name   string
		header string // the From (and other) fields
		signed bool   // want it signed by a.example; else a 5xx
	}{
		{"own domain", "From: x@a.example\r\n", true},
		{"own domain, trailing dot (net/mail refuses it)", "From: x@a.example.\r\n", false},
		{"own domain, upper case", "From: x@A.EXAMPLE\r\n", true},
		{"other domain", "From: x@b.example\r\n", false},
		{"other domain, trailing dot", "From: x@b.example.\r\n", false},
		{"other domain, upper case", "From: x@B.Example\r\n", false},
		{"other domain, fullwidth b (IDNA maps it to b)", "From: x@\uff42.example\r\n", false},
		{"suffix look-alike", "From: x@a.example.evil\r\n", false},
		{"prefix look-alike", "From: x@xa.example\r\n", false},
		{"hyphen look-alike", "From: x@a-example\r\n", false},
		{"Cyrillic a", "From: x@\u0430.example\r\n", false},
		{"Greek alpha", "From: x@\u03b1.example\r\n", false},
		{"zero-width space", "From: x@a\u200b.example\r\n", false},
		{"Sender of another domain", "From: x@a.example\r\nSender: y@b.example\r\n", true},
		{"Sender only", "Sender: y@a.example\r\nReply-To: z@b.example\r\n", false},
		{"second From", "From: x@a.example\r\nFrom: y@b.example\r\n", false},
		{"second From, other case", "From: x@a.example\r\nfROM: y@b.example\r\n", false},
		{"two addresses", "From: x@a.example, y@b.example\r\n", false},
		{"group", "From: g: x@a.example, y@b.example;\r\n", false},
		{"display name that looks like an address", "From: \"y@b.example\" <x@a.example>\r\n", true},
		{"comment after the other domain", "From: y@b.example (x@a.example)\r\n", false},
		{"address in angle brackets inside the domain", "From: <x@a.example>@b.example\r\n", false},
		{"folded", "From: y@b.example\r\n x@a.example\r\n", false},
		{"encoded word", "From: =?utf-8?q?x=40a.example?= <y@b.example>\r\n", false},
		{"route", "From: <@a.example:y@b.example>\r\n", false},
	}
	c := h.dial()
	for i, tc := range cases {
		id := fmt.Sprintf("<case%d@test>", i)
		msg := tc.header + "To: r@example.net\r\nSubject: t\r\nMessage-ID: " + id + "\r\n\r\nbody\r\n"
		_, err := send(c, "bounce@a.example", []string{"r@example.net"}, msg)
		if tc.signed && err != nil {
			t.Errorf("%s: %v, want it signed", tc.name, err)
		}
		if !tc.signed {
			if se, ok := err.(*smtp.SMTPError); !ok || se.Code/100 != 5 {
				t.Errorf("%s: %v, want a 5xx refusal", tc.name, err)
			}
		}
		if err != nil {
			c.Reset()
		}
	}
	want := 0
	for _, tc := range cases {
		if tc.signed {
			want++
		}
	}
	h.sink.WaitMessages(t, want, 10*time.Second)
	time.Sleep(100 * time.Millisecond) // and no more arrive
	msgs := h.sink.Messages()
	if len(msgs) != want {
		t.Errorf("the upstream got %d messages, want %d", len(msgs), want)
	}
	for _, m := range msgs {
		checkOnlyAExample(t, m)
	}
}

// checkOnlyAExample fails unless every signature of m is by a.example
// and m's From domain, parsed as receivers do, is a.example.
func checkOnlyAExample(t *testing.T, m testenv.SinkMessage) {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
	if err != nil {
		t.Errorf("message at the upstream does not parse: %v", err)
		return
	}
	sigs := msg.Header["Dkim-Signature"]
	if len(sigs) == 0 {
		t.Errorf("message %s reached the upstream unsigned", msg.Header.Get("Message-ID"))
	}
	for _, s := range sigs {
		if d := dkimTag(s, "d"); d != "a.example" {
			t.Errorf("message %s signed with d=%q", msg.Header.Get("Message-ID"), d)
		}
	}
	froms := msg.Header["From"]
	if len(froms) != 1 {
		t.Errorf("message %s has %d From fields", msg.Header.Get("Message-ID"), len(froms))
		return
	}
	addrs, err := mail.ParseAddressList(froms[0])
	if err != nil || len(addrs) != 1 {
		t.Errorf("From %q: %v", froms[0], err)
		return
	}
	a := addrs[0].Address
	if d := strings.TrimSuffix(strings.ToLower(a[strings.LastIndexByte(a, '@')+1:]), "."); d != "a.example" {
		t.Errorf("message signed by a.example has From domain %q", d)
	}
}

// dkimTag returns the value of tag in a DKIM-Signature field value.
func dkimTag(v, tag string) string {
	for _, kv := range strings.Split(v, ";") {
		k, val, ok := strings.Cut(kv, "=")
		if ok && strings.TrimSpace(k) == tag {
			return strings.Join(strings.Fields(val), "")
		}
	}
	return ""
}

// TestAuthBruteForceSlowedPerSourceAndLogged: guesses from one address
// wait longer each time and are each logged with the source's failure
// count; another address is not slowed by them; the guessed passwords
// never reach the log.
func TestAuthBruteForceSlowedPerSourceAndLogged(t *testing.T) {
	h := authHarness(t, "")
	// 250ms: on a loaded machine the AUTH exchange itself once took 1s,
	// which a 100ms base (800ms after four failures) left no room for.
	base := 250 * time.Millisecond
	h.srv.auth.setDelays(base, 10*time.Second)
	guess := func(src string, i int) time.Duration {
		c := startTLSFrom(t, src, h.addr)
		defer c.Close()
		start := time.Now()
		wantCode(t, c.Auth(sasl.NewPlainClient("", "tenant", fmt.Sprintf("Guess-%s-%d", src, i))), 535, smtp.EnhancedCode{5, 7, 8})
		return time.Since(start)
	}
	var last time.Duration
	for i := range 4 {
		last = guess("127.0.0.1", i)
	}
	if want := base << 3; last < want {
		t.Errorf("4th guess from 127.0.0.1 answered after %v, want at least %v", last, want)
	}
	// A different address starts from the base delay: it waits about
	// 250ms, far less than the 2s 127.0.0.1 has reached.
	if other := guess("127.0.0.2", 0); other >= base<<3 {
		t.Errorf("first guess from 127.0.0.2 answered after %v: slowed by another address's failures", other)
	}
	logs := h.logs.String()
	for i := 1; i <= 4; i++ {
		if !strings.Contains(logs, fmt.Sprintf("remote=127.0.0.1 user=tenant reason=\"bad user name or password\" failures=1 source_failures=%d", i)) {
			t.Errorf("no log line for failure %d from 127.0.0.1", i)
		}
	}
	if !strings.Contains(logs, "remote=127.0.0.2 user=tenant reason=\"bad user name or password\" failures=1 source_failures=1") {
		t.Errorf("no log line for the failure from 127.0.0.2")
	}
	if strings.Contains(logs, "Guess-") {
		t.Errorf("a guessed password is in the log")
	}
}

// spoolFDs returns the descriptors of this process open on files in dir
// (deleted or not), with their permission bits.
func spoolFDs(t *testing.T, dir string) map[string]os.FileMode {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]os.FileMode{}
	for _, e := range ents {
		p := filepath.Join("/proc/self/fd", e.Name())
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, dir+"/") {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil {
			continue
		}
		got[target] = fi.Mode().Perm()
	}
	return got
}

// TestSpoolFilesPrivateAndGone: a message over spool.memory_limit goes to
// a file of mode 0600 in spool.dir that is gone (no name, no open
// descriptor) after every outcome: accepted, refused, upstream failure,
// client gone in the middle of DATA.
func TestSpoolFilesPrivateAndGone(t *testing.T) {
	spool := t.TempDir()
	conf := strings.Replace(baseConfig, "domains:\n  example.com:", fmt.Sprintf("spool:\n  dir: %s\n  memory_limit: 1024\ndomains:\n  example.com:", spool), 1)
	conf = strings.Replace(conf, "max_message_bytes: 65536", "max_message_bytes: 1048576", 1)
	h := newHarness(t, conf)
	// go-smtp's DATA reader fills the spool's 32 KiB reads before it
	// returns them: send more than one.
	big := strings.Repeat("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n", 1000)
	cases := []struct {
		name  string
		from  string
		setup func()
		end   func(c *rawClient) // finishes the transaction after the spool file exists
	}{
		{"accepted", "news@mail.example.com", nil, func(c *rawClient) { c.send(".\r\n", "250") }},
		{"refused", "news@other.test", nil, func(c *rawClient) { c.send(".\r\n", "550") }},
		{"upstream failure", "news@mail.example.com",
			func() {
				h.sink.FailData(&smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "no"})
			},
			func(c *rawClient) { c.send(".\r\n", "451") }},
		{"client gone mid-DATA", "news@mail.example.com", nil, func(c *rawClient) { c.conn.Close() }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
				defer h.sink.FailData(nil)
			}
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<x@example.com>", "250")
			c.cmd("RCPT TO:<y@example.net>", "250")
			c.cmd("DATA", "354")
			if err := c.write("From: " + tc.from + "\r\nSubject: big\r\n\r\n" + big); err != nil {
				t.Fatal(err)
			}
			var files map[string]os.FileMode
			waitFor(t, func() bool { files = spoolFDs(t, spool); return len(files) > 0 })
			for name, mode := range files {
				if mode != 0o600 {
					t.Errorf("spool file %s has mode %v, want 0600", name, mode)
				}
			}
			tc.end(c)
			waitFor(t, func() bool { return len(spoolFDs(t, spool)) == 0 })
			if ents, _ := os.ReadDir(spool); len(ents) != 0 {
				t.Errorf("spool dir holds %d entries after the transaction", len(ents))
			}
		})
	}
}

// TestSpoolLeftoversCleanedAtStart: files of the spool's own name
// pattern left in spool.dir by a crash are removed when the server
// starts; nothing else there is touched.
func TestSpoolLeftoversCleanedAtStart(t *testing.T) {
	spool := t.TempDir()
	outside := filepath.Join(t.TempDir(), "precious")
	os.WriteFile(outside, []byte("x"), 0o600)
	for _, f := range []string{"dkimgw-spool-123456", "dkimgw-spool-9", "notes.txt", "dkimgw-spool-", "dkimgw-spool-12x"} {
		os.WriteFile(filepath.Join(spool, f), []byte("leftover"), 0o600)
	}
	os.Mkdir(filepath.Join(spool, "dkimgw-spool-777"), 0o700)
	os.Symlink(outside, filepath.Join(spool, "dkimgw-spool-888"))
	conf := strings.Replace(baseConfig, "domains:\n  example.com:", fmt.Sprintf("spool:\n  dir: %s\ndomains:\n  example.com:", spool), 1)
	h := newHarness(t, conf)
	waitFor(t, func() bool { return h.srv.Addr() != nil })
	waitFor(t, func() bool { return strings.Contains(h.logs.String(), "spool leftovers removed") })
	var left []string
	ents, _ := os.ReadDir(spool)
	for _, e := range ents {
		left = append(left, e.Name())
	}
	want := "dkimgw-spool- dkimgw-spool-12x dkimgw-spool-777 dkimgw-spool-888 notes.txt"
	if strings.Join(left, " ") != want {
		t.Errorf("spool dir holds %v, want %s", left, want)
	}
	if _, err := os.Stat(outside); err != nil {
		t.Errorf("the symlink's target is gone: %v", err)
	}
	if !strings.Contains(h.logs.String(), "removed=2") {
		t.Errorf("log does not say 2 files were removed:\n%s", h.logs.String())
	}
}
