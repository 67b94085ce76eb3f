package main

// Helpers of the end-to-end tests (serve_test.go): the real dkimgw binary
// as a child process, a SoftHSM token with keys, configuration files, a
// plain SMTP client and DKIM verification by every verifier at hand.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

// buildBinary builds dkimgw (with the race detector, so that a race in
// the real server fails the test that provoked it) into dir.
func buildBinary(t *testing.T, dir string) string {
	t.Helper()
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build dkimgw: %v", err)
	}
	bin := filepath.Join(dir, "dkimgw")
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goCmd, "build", "-race", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// tokenKey is a key to generate in a test token.
type tokenKey struct {
	domain, selector string
	alg              hsm.Algorithm
}

// e2eToken creates a SoftHSM token holding keys, and returns the token,
// its URI with the PIN in a file (as in production) and the DNS records
// of the keys (owner name → TXT value). The test's own session on the
// token is closed again, so that only the gateway uses it.
func e2eToken(t *testing.T, keys ...tokenKey) (*testenv.SoftHSMToken, string, map[string]string) {
	t.Helper()
	st := testenv.SoftHSM(t)
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	records := map[string]string{}
	for _, k := range keys {
		key, err := tok.GenerateKey(t.Context(), k.domain, k.selector, k.alg)
		if err != nil {
			t.Fatalf("generate %s/%s: %v", k.domain, k.selector, err)
		}
		rec, err := hsm.TXTRecord(key.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[hsm.RecordName(k.domain, k.selector)] = rec
	}
	return st, st.URIWithPINFile(t), records
}

// standardKeys are the keys of most tests: example.com dual-signed with
// RSA-2048 (rsa1) and Ed25519 (ed1).
var standardKeys = []tokenKey{
	{"example.com", "rsa1", hsm.RSA2048},
	{"example.com", "ed1", hsm.Ed25519},
}

// gwConfig is what a test's gateway configuration says.
type gwConfig struct {
	uri, upstream string
	// clientDomains are the From domains the one client (127.0.0.1) may
	// use; domains are the signing domains and their selectors.
	clientDomains []string
	domains       map[string][]string
	// networks are the client's networks; nil: 127.0.0.1/32.
	networks []string
	// grace is shutdown_grace; empty means 20s.
	grace string
	// rotating are domains with a rotation policy (a YAML flow mapping);
	// extra is appended to the configuration (dns:, rotation:, ...).
	rotating map[string]string
	extra    string
	// admin is the admin: section; empty means a listener on a port the
	// kernel picks, without TLS or token.
	admin string
	// env is added to the gateway's environment (NAME=VALUE; a later
	// value of a name wins).
	env []string
}

func standardConfig(uri, upstream string) gwConfig {
	return gwConfig{
		uri: uri, upstream: upstream,
		clientDomains: []string{"example.com"},
		domains:       map[string][]string{"example.com": {"rsa1", "ed1"}},
	}
}

// yaml renders the configuration. The listen port is 0: the kernel picks
// a free one, which the gateway logs.
func (c gwConfig) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "hsm:\n  uri: %q\n", c.uri)
	b.WriteString("smtp:\n  listen: \"127.0.0.1:0\"\n  hostname: dkimgw.test\n")
	fmt.Fprintf(&b, "upstream:\n  address: %q\n  timeout: 30s\n  connect_timeout: 5s\n", c.upstream)
	networks := c.networks
	if networks == nil {
		networks = []string{"127.0.0.1/32"}
	}
	fmt.Fprintf(&b, "clients:\n  - name: mta\n    networks: [\"%s\"]\n    domains: [%s]\n", strings.Join(networks, `", "`), strings.Join(c.clientDomains, ", "))
	b.WriteString("domains:\n")
	for _, d := range slices.Sorted(maps.Keys(c.domains)) {
		fmt.Fprintf(&b, "  %s:\n    selectors: [%s]\n", d, strings.Join(c.domains[d], ", "))
	}
	for _, d := range slices.Sorted(maps.Keys(c.rotating)) {
		fmt.Fprintf(&b, "  %s:\n    rotation: %s\n", d, c.rotating[d])
	}
	b.WriteString("log:\n  format: json\n  level: info\n")
	grace := c.grace
	if grace == "" {
		grace = "20s"
	}
	fmt.Fprintf(&b, "shutdown_grace: %s\n", grace)
	if c.admin == "" {
		b.WriteString("admin:\n  listen: \"127.0.0.1:0\"\n")
	} else {
		b.WriteString(c.admin)
	}
	b.WriteString(c.extra)
	return b.String()
}

// logLine is one line of the gateway's log: its JSON fields, or nil for a
// line that is not JSON (a panic, a race report).
type logLine struct {
	raw    string
	fields map[string]any
}

func (l logLine) str(key string) string {
	s, _ := l.fields[key].(string)
	return s
}

// gateway is a `dkimgw serve` child process.
type gateway struct {
	t      *testing.T
	cmd    *exec.Cmd
	config string // its configuration file
	addr   string // where it listens
	admin  string // where its admin listener listens ("" if none)

	mu      sync.Mutex
	lines   []logLine
	changed chan struct{} // closed and replaced when lines grows

	done     chan struct{} // closed when the process has exited
	exitCode int
}

// startGateway writes cfg to a file and runs `dkimgw serve --config`
// on it, returning once it listens. The process is killed when the test
// ends; its log is printed if the test failed.
func startGateway(t *testing.T, bin string, cfg gwConfig) *gateway {
	t.Helper()
	return startGatewayAs(t, bin, cfg, "serve")
}

// startGatewayAs runs `dkimgw CMD --config` (serve or milter) on cfg and
// returns once it listens: gw.addr is the relay's address, or the
// milter's for milter.
func startGatewayAs(t *testing.T, bin string, cfg gwConfig, cmd string) *gateway {
	t.Helper()
	gw := &gateway{
		t:       t,
		config:  filepath.Join(t.TempDir(), "dkimgw.yaml"),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
	}
	gw.writeConfig(cfg)
	gw.cmd = exec.Command(bin, cmd, "--config", gw.config)
	// SOFTHSM2_CONF comes from testenv.Main through the environment.
	gw.cmd.Env = append(os.Environ(), cfg.env...)
	// Never outlive the test binary, even when it is killed.
	gw.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// One pipe for stdout and stderr, whose write end only the child
	// holds: the reader sees EOF when the child is gone.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	gw.cmd.Stdout, gw.cmd.Stderr = pw, pw
	err = gw.cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		t.Fatalf("start dkimgw serve: %v", err)
	}
	go func() {
		gw.readLog(pr)
		pr.Close()
		err := gw.cmd.Wait()
		gw.mu.Lock()
		gw.exitCode = gw.cmd.ProcessState.ExitCode()
		if err != nil && gw.exitCode == 0 {
			gw.exitCode = -1
		}
		gw.mu.Unlock()
		close(gw.done)
	}()
	t.Cleanup(func() {
		if !gw.exited() {
			_ = gw.cmd.Process.Kill()
			select {
			case <-gw.done:
			case <-time.After(10 * time.Second):
				t.Errorf("dkimgw serve (pid %d) did not exit after SIGKILL", gw.cmd.Process.Pid)
			}
		}
		for _, l := range gw.logLines(0) {
			if strings.Contains(l.raw, "DATA RACE") {
				t.Errorf("the race detector reported a data race in dkimgw serve")
				break
			}
		}
		if t.Failed() {
			t.Logf("dkimgw serve log:\n%s", gw.logText())
		}
	})

	ready, addrKey := "dkimgw serving", "listen"
	if cmd == "milter" {
		ready, addrKey = "dkimgw milter serving", "milter_listen"
	}
	l := gw.waitLog(0, 60*time.Second, ready, func(l logLine) bool {
		return l.str("msg") == ready
	})
	gw.addr = l.str(addrKey)
	if _, _, err := net.SplitHostPort(gw.addr); err != nil && !strings.HasPrefix(gw.addr, "/") {
		t.Fatalf("dkimgw logged listen=%q: %v", gw.addr, err)
	}
	for _, l := range gw.logLines(0) {
		if a := l.str("admin_listen"); a != "" {
			gw.admin = a
		}
	}
	return gw
}

func (gw *gateway) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		l := logLine{raw: sc.Text()}
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			l.fields = m
		}
		gw.mu.Lock()
		gw.lines = append(gw.lines, l)
		close(gw.changed)
		gw.changed = make(chan struct{})
		gw.mu.Unlock()
	}
	// A line too long to scan must not block the child on a full pipe.
	_, _ = io.Copy(io.Discard, r)
}

// mark is the number of log lines so far: waitLog(mark, ...) looks only
// at lines logged after it.
func (gw *gateway) mark() int {
	gw.mu.Lock()
	defer gw.mu.Unlock()
	return len(gw.lines)
}

func (gw *gateway) logLines(from int) []logLine {
	gw.mu.Lock()
	defer gw.mu.Unlock()
	return slices.Clone(gw.lines[from:])
}

func (gw *gateway) logText() string {
	var b strings.Builder
	for _, l := range gw.logLines(0) {
		b.WriteString(l.raw)
		b.WriteByte('\n')
	}
	return b.String()
}

// waitLog waits until a line after mark satisfies match and returns it,
// failing the test after timeout or when the process exits first.
func (gw *gateway) waitLog(mark int, timeout time.Duration, what string, match func(logLine) bool) logLine {
	gw.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		gw.mu.Lock()
		lines, changed := gw.lines[mark:], gw.changed
		for _, l := range lines {
			if l.fields != nil && match(l) {
				gw.mu.Unlock()
				return l
			}
		}
		gw.mu.Unlock()
		select {
		case <-changed:
		case <-gw.done:
			// One more look: the line may have come with the exit.
			for _, l := range gw.logLines(mark) {
				if l.fields != nil && match(l) {
					return l
				}
			}
			gw.t.Fatalf("dkimgw serve exited (status %d) before logging %s", gw.status(), what)
		case <-deadline.C:
			gw.t.Fatalf("dkimgw serve did not log %s within %v", what, timeout)
		}
	}
}

func (gw *gateway) status() int {
	gw.mu.Lock()
	defer gw.mu.Unlock()
	return gw.exitCode
}

// writeConfig replaces the configuration file (for a reload) atomically.
func (gw *gateway) writeConfig(cfg gwConfig) { gw.writeConfigText(cfg.yaml()) }

func (gw *gateway) writeConfigText(text string) {
	gw.t.Helper()
	// The audit log defaults to data_dir (/var/lib/dkimgw): keep a test's
	// beside its configuration.
	if !strings.Contains(text, "data_dir:") && !strings.Contains(text, "\naudit:") {
		text += fmt.Sprintf("audit: {path: %q}\n", filepath.Join(filepath.Dir(gw.config), "audit.log"))
	}
	tmp := gw.config + ".new"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		gw.t.Fatal(err)
	}
	if err := os.Rename(tmp, gw.config); err != nil {
		gw.t.Fatal(err)
	}
}

func (gw *gateway) signal(sig os.Signal) {
	gw.t.Helper()
	if err := gw.cmd.Process.Signal(sig); err != nil {
		gw.t.Fatalf("signal %v: %v", sig, err)
	}
}

// waitExit waits for the process to exit and returns its status.
func (gw *gateway) waitExit(timeout time.Duration) int {
	gw.t.Helper()
	select {
	case <-gw.done:
		return gw.status()
	case <-time.After(timeout):
		gw.t.Fatalf("dkimgw serve still running %v after it was told to stop", timeout)
		return 0
	}
}

// exited reports whether the process has exited.
func (gw *gateway) exited() bool {
	select {
	case <-gw.done:
		return true
	default:
		return false
	}
}

// transactions returns the transaction log lines after mark.
func (gw *gateway) transactions(mark int) []logLine {
	var tx []logLine
	for _, l := range gw.logLines(mark) {
		if l.str("msg") == "transaction" {
			tx = append(tx, l)
		}
	}
	return tx
}

// smtpResult is what a client saw in one transaction.
type smtpResult struct {
	mail     error
	rcpt     []error // one per recipient
	data     error   // reply to the end of DATA (nil: 250)
	dataText string  // the 250's text
}

// sendDirect runs one transaction against addr as a plain SMTP client,
// recording each reply; it fails the test only when the connection
// itself fails.
func sendDirect(t *testing.T, addr, from string, to []string, msg string) smtpResult {
	t.Helper()
	c := dialSMTP(t, addr)
	defer c.Close()
	r := sendOn(t, c, from, to, msg)
	_ = c.Quit()
	return r
}

func dialSMTP(t *testing.T, addr string) *smtp.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c := smtp.NewClient(conn)
	c.CommandTimeout = 30 * time.Second
	c.SubmissionTimeout = 30 * time.Second
	if err := c.Hello("client.test"); err != nil {
		c.Close()
		t.Fatalf("EHLO to %s: %v", addr, err)
	}
	return c
}

func sendOn(t *testing.T, c *smtp.Client, from string, to []string, msg string) smtpResult {
	t.Helper()
	var r smtpResult
	if r.mail = c.Mail(from, nil); r.mail != nil {
		return r
	}
	ok := 0
	for _, rcpt := range to {
		err := c.Rcpt(rcpt, nil)
		r.rcpt = append(r.rcpt, err)
		if err == nil {
			ok++
		}
	}
	if ok == 0 {
		return r
	}
	w, err := c.Data()
	if err != nil {
		r.data = err
		return r
	}
	if _, err := io.WriteString(w, msg); err != nil {
		t.Fatalf("write DATA: %v", err)
	}
	resp, err := w.CloseWithResponse()
	r.data = err
	if resp != nil {
		r.dataText = resp.StatusText
	}
	return r
}

// smtpCode returns the reply code of an error from the SMTP client (0
// when err is nil or not an SMTP reply).
func smtpCode(err error) (int, smtp.EnhancedCode, string) {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code, se.EnhancedCode, se.Message
	}
	return 0, smtp.EnhancedCode{}, ""
}

// wantSig is a signature a relayed message must carry.
type wantSig struct{ domain, selector, alg string }

var standardSigs = []wantSig{
	{"example.com", "rsa1", "rsa-sha256"},
	{"example.com", "ed1", "ed25519-sha256"},
}

// checkSigned checks that msg begins with exactly the DKIM-Signature
// fields of want (in any order, each once) and that every one of them
// verifies with go-msgauth against records. The independent verifiers
// are run by verifyIndependently, over many messages at once.
func checkSigned(t *testing.T, records map[string]string, msg []byte, want []wantSig) {
	t.Helper()
	// The signatures are prepended: they are the first fields.
	tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(msg)))
	hdr, err := tp.ReadMIMEHeader()
	if err != nil {
		t.Fatalf("relayed message has a broken header: %v\n%s", err, msg)
	}
	sigs := hdr.Values("Dkim-Signature")
	var got []wantSig
	for _, s := range sigs {
		tags := dkimTags(s)
		got = append(got, wantSig{tags["d"], tags["s"], tags["a"]})
	}
	if !sameSigs(got, want) {
		t.Fatalf("relayed message carries signatures %v, want %v\n%s", got, want, msg)
	}
	lines := strings.Split(string(msg), "\r\n")
	for i := range want {
		if i >= len(lines) || !strings.HasPrefix(strings.ToLower(lines[0]), "dkim-signature:") {
			t.Fatalf("the DKIM-Signature fields are not prepended to the message:\n%s", msg)
		}
		// Skip to the next field.
		j := 1
		for j < len(lines) && (strings.HasPrefix(lines[j], " ") || strings.HasPrefix(lines[j], "\t")) {
			j++
		}
		lines = lines[j:]
	}

	var looked []string
	var lmu sync.Mutex
	verifs, err := dkim.VerifyWithOptions(bytes.NewReader(msg), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			name = strings.TrimSuffix(strings.ToLower(name), ".")
			lmu.Lock()
			looked = append(looked, name)
			lmu.Unlock()
			if rec, ok := records[name]; ok {
				return []string{rec}, nil
			}
			return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
		},
	})
	if err != nil {
		t.Fatalf("go-msgauth: %v", err)
	}
	if len(verifs) != len(want) {
		t.Fatalf("go-msgauth found %d signatures, want %d", len(verifs), len(want))
	}
	for i, v := range verifs {
		if v.Err != nil {
			t.Errorf("go-msgauth: signature %d (d=%s) does not verify: %v", i, v.Domain, v.Err)
		}
	}
	var wantNames []string
	for _, w := range want {
		wantNames = append(wantNames, hsm.RecordName(w.domain, w.selector))
	}
	slices.Sort(looked)
	slices.Sort(wantNames)
	if !slices.Equal(looked, wantNames) {
		t.Errorf("go-msgauth looked up %v, want %v", looked, wantNames)
	}
}

// verifyIndependently runs every independent verifier (dkimpy, OpenDKIM,
// Mail::DKIM) over msgs, each of which must carry exactly want: every
// signature must pass, but Ed25519 ones with a verifier that lacks
// Ed25519 (Debian 12's Mail::DKIM), which must then pass on RSA alone.
func verifyIndependently(t *testing.T, records map[string]string, want []wantSig, msgs ...[]byte) {
	t.Helper()
	for _, v := range testenv.DKIMVerifiers() {
		res := v.Verify(t, records, msgs...)
		for i, sigs := range res {
			var got []wantSig
			rsaPass := false
			for _, r := range sigs {
				got = append(got, wantSig{r.Domain, r.Selector, r.Algorithm})
				ed := strings.HasPrefix(r.Algorithm, "ed25519")
				if ed && !v.Ed25519 {
					continue
				}
				if !r.Pass {
					t.Errorf("%s: message %d: %v", v.Name, i, r)
				}
				if !ed && r.Pass {
					rsaPass = true
				}
			}
			if len(sigs) != len(want) {
				t.Errorf("%s: message %d: %d results %v, want %d signatures %v", v.Name, i, len(sigs), sigs, len(want), want)
			}
			// OpenDKIM does not always report a=; compare what it gives.
			for _, g := range got {
				if !slices.ContainsFunc(want, func(w wantSig) bool {
					return w.domain == g.domain && w.selector == g.selector && (g.alg == "" || g.alg == w.alg)
				}) {
					t.Errorf("%s: message %d: unexpected signature %v, want %v", v.Name, i, g, want)
				}
			}
			if !v.Ed25519 && !rsaPass {
				t.Errorf("%s: message %d: no RSA signature passed: %v", v.Name, i, sigs)
			}
		}
	}
}

func sameSigs(got, want []wantSig) bool {
	cmp := func(a, b wantSig) int { return strings.Compare(a.selector+"/"+a.domain, b.selector+"/"+b.domain) }
	g, w := slices.Clone(got), slices.Clone(want)
	slices.SortFunc(g, cmp)
	slices.SortFunc(w, cmp)
	return slices.Equal(g, w)
}

// dkimTags parses a DKIM-Signature value's tag=value list.
func dkimTags(v string) map[string]string {
	tags := map[string]string{}
	for _, part := range strings.Split(v, ";") {
		k, val, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		tags[strings.TrimSpace(k)] = strings.Join(strings.Fields(val), "")
	}
	return tags
}

// withID returns the messages whose Message-ID is id.
func withID(msgs []testenv.SinkMessage, id string) []testenv.SinkMessage {
	var out []testenv.SinkMessage
	for _, m := range msgs {
		if bytes.Contains(m.Data, []byte("\r\nMessage-ID: <"+id+">\r\n")) {
			out = append(out, m)
		}
	}
	return out
}

// testMessage is a CRLF message From from with a unique Message-ID.
func testMessage(from, to, id, subject, body string) string {
	return "From: " + from + "\r\n" +
		"To: " + to + "\r\n" +
		"Subject: " + subject + "\r\n" +
		"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n" +
		"Message-ID: <" + id + ">\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"\r\n" + body
}

// body returns the part of a message after its header.
func body(msg []byte) []byte {
	_, b, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	return b
}

// dialRefused reports whether addr no longer serves SMTP: the connection
// is refused, or closed without a 220 greeting (e.g. with a 421).
func dialRefused(addr string) (bool, string) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return true, err.Error()
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if strings.HasPrefix(line, "220") {
		return false, line
	}
	return true, fmt.Sprintf("greeting %q, %v", line, err)
}

// sendBDAT runs one transaction against addr with CHUNKING (RFC 3030), as
// Exim does when the server offers it: msg goes in chunks cut at cuts,
// the last one with LAST, or an empty "BDAT 0 LAST" after them when
// emptyLast. It returns the reply to the LAST chunk, failing the test on
// any other failure.
func sendBDAT(t *testing.T, addr, from string, to []string, msg string, cuts []int, emptyLast bool) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	r := textproto.NewReader(bufio.NewReader(conn))
	reply := func(what string, want int) string {
		t.Helper()
		code, text, err := r.ReadResponse(want)
		if err != nil {
			t.Fatalf("%s: %d %s (%v)", what, code, text, err)
		}
		return fmt.Sprintf("%d %s", code, text)
	}
	send := func(s string) {
		t.Helper()
		if _, err := io.WriteString(conn, s); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	reply("greeting", 220)
	send("EHLO client.test\r\n")
	if ehlo := reply("EHLO", 250); !strings.Contains(ehlo, "CHUNKING") {
		t.Fatalf("EHLO reply lacks CHUNKING: %q", ehlo)
	}
	send("MAIL FROM:<" + from + ">\r\n")
	reply("MAIL", 250)
	for _, rcpt := range to {
		send("RCPT TO:<" + rcpt + ">\r\n")
		reply("RCPT "+rcpt, 250)
	}
	var chunks []string
	prev := 0
	for _, c := range cuts {
		chunks = append(chunks, msg[prev:c])
		prev = c
	}
	chunks = append(chunks, msg[prev:])
	if emptyLast {
		chunks = append(chunks, "")
	}
	for i, c := range chunks {
		if i < len(chunks)-1 {
			send(fmt.Sprintf("BDAT %d\r\n%s", len(c), c))
			reply(fmt.Sprintf("BDAT chunk %d", i), 250)
			continue
		}
		send(fmt.Sprintf("BDAT %d LAST\r\n%s", len(c), c))
	}
	// 0 accepts any code: the caller judges the reply to LAST.
	code, text, err := r.ReadResponse(0)
	if err != nil {
		t.Fatalf("BDAT LAST: %v", err)
	}
	send("QUIT\r\n")
	return fmt.Sprintf("%d %s", code, text)
}
