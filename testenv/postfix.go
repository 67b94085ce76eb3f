package testenv

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// Postfix is a throwaway Postfix instance of one test: its own
// configuration, queue and data directories, an smtpd on a free
// 127.0.0.1 port, a relayhost the test names, and a maillog file that is
// printed when the test fails.
type Postfix struct {
	t       testing.TB
	dir     string // config_directory
	queue   string // queue_directory
	maillog string
	addr    string
}

// PostfixOptions configure an instance. The zero value relays to nothing
// and is of little use: set Relayhost.
type PostfixOptions struct {
	// Relayhost is the host:port every message is relayed to (written as
	// relayhost = [host]:port, so no MX lookup is done).
	Relayhost string
	// Settings are extra main.cf lines (name = value), applied last.
	Settings map[string]string
	// ChrootSMTPD runs the smtpd in a chroot at the queue directory, as
	// Debian's master.cf does: a milter socket it connects to must then
	// be inside the queue directory (see QueueDir), named relative to it.
	ChrootSMTPD bool
}

// StartPostfix starts an instance and stops it when the test ends. It
// needs root (Postfix's master drops privileges to the postfix user) and
// Debian's postfix package; without them the test is skipped, or fails
// when CI=true.
func StartPostfix(t testing.TB, opts PostfixOptions) *Postfix {
	t.Helper()
	Require(t, "/usr/sbin/postfix", "/usr/sbin/postqueue", "/usr/sbin/postsuper", "/usr/lib/postfix/sbin/master")
	if os.Geteuid() != 0 {
		missing(t, "root (Postfix's master must start as root)", fmt.Errorf("euid %d", os.Geteuid()))
	}

	// Not t.TempDir: Postfix daemons run as the postfix user and must be
	// able to traverse every directory on the path, and TempDir's are 0700.
	dir, err := os.MkdirTemp("", "dkimgw-postfix-")
	if err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	p := &Postfix{
		t:       t,
		dir:     filepath.Join(dir, "etc"),
		queue:   filepath.Join(dir, "queue"),
		maillog: filepath.Join(dir, "maillog"),
	}
	// DKIMGW_KEEP_POSTFIX=1 keeps the directory for a post-mortem.
	t.Cleanup(func() {
		if os.Getenv("DKIMGW_KEEP_POSTFIX") == "" {
			os.RemoveAll(dir)
		}
	})
	for _, d := range []string{dir, p.dir, p.queue, filepath.Join(dir, "data")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatalf("testenv: postfix: %v", err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatalf("testenv: postfix: %v", err)
		}
	}
	if err := chownPostfix(filepath.Join(dir, "data")); err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}

	port, err := freePort()
	if err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	p.addr = net.JoinHostPort("127.0.0.1", port)

	settings := map[string]string{
		"compatibility_level": "3.6",
		"queue_directory":     p.queue,
		"data_directory":      filepath.Join(dir, "data"),
		"maillog_file":        p.maillog,
		// Without this Postfix refuses a maillog_file outside /var, and has
		// nowhere to say so (no /dev/log): it just exits 1.
		"maillog_file_prefixes":    dir,
		"myhostname":               "postfix.test",
		"mydomain":                 "postfix.test",
		"myorigin":                 "postfix.test",
		"mydestination":            "",
		"local_recipient_maps":     "",
		"local_transport":          "error:local delivery is disabled",
		"alias_maps":               "",
		"alias_database":           "",
		"inet_interfaces":          "loopback-only",
		"inet_protocols":           "ipv4",
		"mynetworks":               "127.0.0.0/8",
		"smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
		"relayhost":                "",
		"smtp_dns_support_level":   "disabled",
		"smtputf8_enable":          "yes",
		"biff":                     "no",
		"append_dot_mydomain":      "no",
		"delay_warning_time":       "0",
		"smtpd_tls_security_level": "none",
		"smtp_tls_security_level":  "none",
		// Retry deferred mail within the test's patience, not in minutes.
		"queue_run_delay":      "1s",
		"minimal_backoff_time": "1s",
		"maximal_backoff_time": "2s",
		"smtp_connect_timeout": "5s",
	}
	// The lines that relay through dkimgw are the ones the documentation
	// and docker-compose.yml give people, read from the same file.
	relay, err := PostfixRelaySettings()
	if err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	delete(relay, "relayhost") // the test's own, below
	maps.Copy(settings, relay)
	if opts.Relayhost != "" {
		host, port, err := net.SplitHostPort(opts.Relayhost)
		if err != nil {
			t.Fatalf("testenv: postfix: relayhost %q: %v", opts.Relayhost, err)
		}
		settings["relayhost"] = fmt.Sprintf("[%s]:%s", host, port)
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	var main bytes.Buffer
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&main, "%s = %s\n", k, settings[k])
	}
	if err := os.WriteFile(filepath.Join(p.dir, "main.cf"), main.Bytes(), 0o644); err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	// smtpd unchrooted unless asked, like the services after it.
	chroot := "n"
	if opts.ChrootSMTPD {
		chroot = "y"
	}
	master := fmt.Sprintf("%s inet n - %s - - smtpd\n", p.addr, chroot) + postfixServices
	if err := os.WriteFile(filepath.Join(p.dir, "master.cf"), []byte(master), 0o644); err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}

	t.Cleanup(p.stop)
	if out, err := p.run(t.Context(), "/usr/sbin/postfix", "-c", p.dir, "start"); err != nil {
		t.Fatalf("testenv: postfix start: %v\n%s", err, out)
	}
	if err := p.waitReady(10 * time.Second); err != nil {
		t.Fatalf("testenv: postfix: %v", err)
	}
	return p
}

// postfixServices are the master.cf lines after the smtpd line.
//
//go:embed postfix-master.cf
var postfixServices string

// postfixRelayFile is the Postfix configuration of docker-compose.yml,
// whose block between "# BEGIN relay through dkimgw" and "# END relay
// through dkimgw" holds the main.cf lines that relay through dkimgw.
const postfixRelayFile = "deploy/postfix/main.cf"

// PostfixRelaySettings returns the main.cf settings that relay through
// dkimgw, as deploy/postfix/main.cf gives them (relayhost names the
// compose file's gateway; StartPostfix puts the test's in its place).
func PostfixRelaySettings() (map[string]string, error) {
	_, self, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(self), "..", filepath.FromSlash(postfixRelayFile))
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("the relay lines: %w", err)
	}
	_, block, ok := strings.Cut(string(data), "# BEGIN relay through dkimgw\n")
	if ok {
		block, _, ok = strings.Cut(block, "# END relay through dkimgw")
	}
	if !ok {
		return nil, fmt.Errorf("%s has no BEGIN/END relay through dkimgw block", postfixRelayFile)
	}
	settings := map[string]string{}
	for _, line := range strings.Split(block, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s: %q is not a main.cf setting", postfixRelayFile, line)
		}
		settings[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	if settings["relayhost"] == "" {
		return nil, fmt.Errorf("%s: the relay block sets no relayhost", postfixRelayFile)
	}
	return settings, nil
}

// QueueDir is the instance's queue_directory (a chrooted smtpd's root).
func (p *Postfix) QueueDir() string { return p.queue }

// Addr is the host:port of the instance's smtpd.
func (p *Postfix) Addr() string { return p.addr }

// ConfigDir is the instance's config_directory, for postconf -c and the like.
func (p *Postfix) ConfigDir() string { return p.dir }

// Maillog returns the instance's log so far.
func (p *Postfix) Maillog() string {
	b, _ := os.ReadFile(p.maillog)
	return string(b)
}

// Submit sends one message to the instance's smtpd, as a client MTA on
// 127.0.0.1 would, and returns the error of whichever command failed.
func (p *Postfix) Submit(ctx context.Context, from string, to []string, msg []byte) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return fmt.Errorf("testenv: postfix: submit: %w", err)
	}
	c := smtp.NewClient(conn)
	defer c.Close()
	c.CommandTimeout = 30 * time.Second
	c.SubmissionTimeout = 30 * time.Second
	if err := c.Hello("client.test"); err != nil {
		return err
	}
	opts := &smtp.MailOptions{}
	for _, b := range msg {
		if b >= 0x80 {
			opts.UTF8 = true // harmless for 8-bit bodies, required for UTF-8 headers
			break
		}
	}
	if err := c.Mail(from, opts); err != nil {
		return err
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return err
		}
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(msg); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// Flush asks Postfix to retry all deferred mail now (postqueue -f).
func (p *Postfix) Flush() {
	p.t.Helper()
	if out, err := p.run(context.Background(), "/usr/sbin/postqueue", "-c", p.dir, "-f"); err != nil {
		p.t.Fatalf("testenv: postqueue -f: %v\n%s", err, out)
	}
}

// QueueEntry is one message in the Postfix queue (postqueue -j).
type QueueEntry struct {
	QueueName  string `json:"queue_name"` // incoming, active, deferred, hold, maildrop
	QueueID    string `json:"queue_id"`
	Sender     string `json:"sender"`
	Recipients []struct {
		Address     string `json:"address"`
		DelayReason string `json:"delay_reason"`
	} `json:"recipients"`
}

// deferred reports whether a delivery of the message was tried and
// deferred. Postfix moves such a message to the deferred queue, but a
// loaded queue manager can take tens of seconds to do so, while the
// recipient's delay reason is there at once.
func (e QueueEntry) deferred() bool {
	if e.QueueName == "deferred" {
		return true
	}
	for _, r := range e.Recipients {
		if r.DelayReason != "" {
			return true
		}
	}
	return false
}

// Queue lists the messages still in the queue.
func (p *Postfix) Queue() []QueueEntry {
	p.t.Helper()
	out, err := p.run(context.Background(), "/usr/sbin/postqueue", "-c", p.dir, "-j")
	if err != nil {
		p.t.Fatalf("testenv: postqueue -j: %v\n%s", err, out)
	}
	var q []QueueEntry
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var e QueueEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			p.t.Fatalf("testenv: postqueue -j: %v in %q", err, sc.Text())
		}
		q = append(q, e)
	}
	return q
}

// WaitQueue polls the queue until cond holds, failing the test after
// timeout with the queue and maillog in the message.
func (p *Postfix) WaitQueue(timeout time.Duration, what string, cond func([]QueueEntry) bool) []QueueEntry {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		q := p.Queue()
		if cond(q) {
			return q
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("testenv: postfix: no %s after %v; queue: %+v", what, timeout, q)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// WaitDeferred waits until n messages were tried and deferred (in the
// deferred queue, or with a recipient's delay reason) and returns them.
func (p *Postfix) WaitDeferred(n int, timeout time.Duration) []QueueEntry {
	p.t.Helper()
	return p.WaitQueue(timeout, fmt.Sprintf("%d deferred message(s)", n), func(q []QueueEntry) bool {
		c := 0
		for _, e := range q {
			if e.deferred() {
				c++
			}
		}
		return c == n
	})
}

// WaitEmpty waits until the queue is empty.
func (p *Postfix) WaitEmpty(timeout time.Duration) {
	p.t.Helper()
	p.WaitQueue(timeout, "empty queue", func(q []QueueEntry) bool { return len(q) == 0 })
}

func (p *Postfix) stop() {
	if p.t.Failed() {
		p.t.Logf("testenv: postfix maillog (%s):\n%s", p.maillog, p.Maillog())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if out, err := p.run(ctx, "/usr/sbin/postfix", "-c", p.dir, "stop"); err != nil {
		// Already stopped (start failed) is fine; anything else is worth seeing.
		if !strings.Contains(string(out), "not running") {
			p.t.Logf("testenv: postfix stop: %v\n%s", err, out)
		}
	}
}

func (p *Postfix) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "MAIL_CONFIG="+p.dir)
	return cmd.CombinedOutput()
}

// waitReady waits for the smtpd's 220 greeting.
func (p *Postfix) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		conn, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err == nil {
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(conn).ReadString('\n')
			conn.Close()
			if err == nil && strings.HasPrefix(line, "220") {
				return nil
			}
			last = fmt.Errorf("greeting %q: %v", line, err)
		} else {
			last = err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("smtpd on %s not ready after %v: %v\nmaillog:\n%s", p.addr, timeout, last, p.Maillog())
}

// freePort returns a port that was free a moment ago on 127.0.0.1.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	_, port, err := net.SplitHostPort(l.Addr().String())
	return port, err
}

func chownPostfix(path string) error {
	out, err := exec.Command("chown", "postfix:postfix", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("chown postfix %s: %v: %s", path, err, out)
	}
	return nil
}
