package testenv

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TSIGKey is a TSIG key a test DNS server knows (RFC 8945).
type TSIGKey struct {
	Name      string // fully qualified, e.g. "dkimgw-sha256."
	Algorithm string // BIND/Knot spelling: "hmac-sha256" or "hmac-sha512"
	Secret    string // base64
}

// DNSServer is a real authoritative server (BIND9 or Knot) of one test,
// serving one zone on a free 127.0.0.1 port (UDP and TCP) and accepting
// dynamic updates signed with its TSIG keys, limited to TXT records
// strictly below _domainkey.<zone>.
type DNSServer struct {
	Impl string // "bind" or "knot"
	Zone string // fully qualified, lower case, e.g. "dkimgw.test."
	Addr string // 127.0.0.1:port
	// Keys has two keys allowed to update, one per algorithm
	// (hmac-sha256 first, then hmac-sha512).
	Keys []TSIGKey
	// NSHost is the zone's only NS, with an A record of 127.0.0.1.
	NSHost string
	// SOATTL and SOAMinimum are the zone's SOA TTL and MINIMUM field;
	// the negative-caching TTL is the smaller one (RFC 2308 §5).
	SOATTL, SOAMinimum uint32

	Dir    string // the server's configuration and data
	cmd    *exec.Cmd
	exited chan struct{}
	log    *LogBuffer
	nonce  string
}

// DNSOptions configure a test DNS server. The zero value serves
// "dkimgw.test.".
type DNSOptions struct {
	// Zone is the zone's name; "" means "dkimgw.test.".
	Zone string
	// SOAMinimum is the SOA's MINIMUM field, and with it the zone's
	// negative-caching TTL (RFC 2308 §5); 0 means 120 seconds. Rotation
	// tests make it a second or two, since a new key waits it out.
	SOAMinimum uint32
}

const (
	testSOATTL     = 600
	testSOAMinimum = 120
	// dnsStartTimeout bounds a server's start: both start in well under
	// a second; the margin is for a loaded machine.
	dnsStartTimeout = 20 * time.Second
)

// StartBIND starts a BIND9 named (named -g) for the test and kills it
// when the test ends.
func StartBIND(t testing.TB, opts DNSOptions) *DNSServer {
	t.Helper()
	Require(t, "named")
	return startDNS(t, "bind", opts)
}

// StartKnot starts a Knot DNS knotd for the test and kills it when the
// test ends.
func StartKnot(t testing.TB, opts DNSOptions) *DNSServer {
	t.Helper()
	Require(t, "knotd")
	return startDNS(t, "knot", opts)
}

// DNSServers starts one server of each implementation, for tests that
// must hold against both.
func DNSServers(t testing.TB, opts DNSOptions) []*DNSServer {
	t.Helper()
	return []*DNSServer{StartBIND(t, opts), StartKnot(t, opts)}
}

func startDNS(t testing.TB, impl string, opts DNSOptions) *DNSServer {
	t.Helper()
	zone := dns.Fqdn(strings.ToLower(opts.Zone))
	if opts.Zone == "" {
		zone = "dkimgw.test."
	}
	// A port is free when chosen and may be taken before the server binds
	// it; a server that cannot bind exits, and a new port is tried.
	var last error
	for range 3 {
		s, err := tryStartDNS(t, impl, zone, opts)
		if err == nil {
			return s
		}
		last = err
	}
	t.Fatalf("testenv: %s: %v", impl, last)
	return nil
}

func tryStartDNS(t testing.TB, impl, zone string, opts DNSOptions) (*DNSServer, error) {
	t.Helper()
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &DNSServer{
		Impl:       impl,
		Zone:       zone,
		Addr:       net.JoinHostPort("127.0.0.1", port),
		NSHost:     "ns1." + zone,
		SOATTL:     testSOATTL,
		SOAMinimum: cmp.Or(opts.SOAMinimum, testSOAMinimum),
		Dir:        t.TempDir(),
		exited:     make(chan struct{}),
		log:        &LogBuffer{},
		nonce:      randomHex(8),
		Keys: []TSIGKey{
			{Name: "dkimgw-sha256." + zone, Algorithm: "hmac-sha256", Secret: randomSecret(32)},
			{Name: "dkimgw-sha512." + zone, Algorithm: "hmac-sha512", Secret: randomSecret(64)},
		},
	}
	zonefile := filepath.Join(s.Dir, "zone.db")
	if err := os.WriteFile(zonefile, []byte(s.zoneFile()), 0o644); err != nil {
		return nil, err
	}
	var args []string
	switch impl {
	case "bind":
		conf := filepath.Join(s.Dir, "named.conf")
		if err := os.WriteFile(conf, []byte(s.namedConf(port, zonefile)), 0o644); err != nil {
			return nil, err
		}
		// -g: foreground, log to stderr. -n 1: one worker thread is plenty
		// and the machine is shared.
		args = []string{"named", "-g", "-n", "1", "-c", conf}
	case "knot":
		conf := filepath.Join(s.Dir, "knot.conf")
		if err := os.WriteFile(conf, []byte(s.knotConf(port, zonefile)), 0o644); err != nil {
			return nil, err
		}
		args = []string{"knotd", "-c", conf}
	}
	s.cmd = exec.Command(args[0], args[1:]...)
	s.cmd.Dir = s.Dir
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	// Its own process group, so that cleanup kills whatever it forks, and
	// SIGKILL when the test binary dies, so that a killed run leaves no
	// server behind to answer the next run's queries.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", args[0], err)
	}
	go func() {
		_ = s.cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitReady(dnsStartTimeout); err != nil {
		s.stop()
		return nil, err
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testenv: %s log (%s):\n%s", impl, s.Dir, s.log.String())
		}
		s.stop()
	})
	return s, nil
}

// Log returns what the server has logged so far.
func (s *DNSServer) Log() string { return s.log.String() }

// TXT asks the server, over TCP, for name's TXT values, each record's
// strings joined: what a verifier sees.
func (s *DNSServer) TXT(name string) ([]string, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeTXT)
	c := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	resp, _, err := c.Exchange(m, s.Addr)
	if err != nil {
		return nil, err
	}
	var vals []string
	for _, rr := range resp.Answer {
		if txt, ok := rr.(*dns.TXT); ok {
			vals = append(vals, strings.Join(txt.Txt, ""))
		}
	}
	return vals, nil
}

// KeyFile writes key's secret to a file of its own (base64, one line) and
// returns its path, the form dkimgw reads a TSIG secret from.
func (s *DNSServer) KeyFile(t testing.TB, key TSIGKey) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "tsig.key")
	if err := os.WriteFile(p, []byte(key.Secret+"\n"), 0o600); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return p
}

// Port is the server's port, the same for UDP and TCP.
func (s *DNSServer) Port() string {
	_, p, _ := net.SplitHostPort(s.Addr)
	return p
}

// zoneFile is the starting zone: SOA, NS, the NS's address, and a TXT
// record with a random nonce by which waitReady knows the server that
// answers is this one, not a stale server of a killed run.
func (s *DNSServer) zoneFile() string {
	return fmt.Sprintf(`$ORIGIN %[1]s
$TTL 3600
@ %[2]d IN SOA ns1 hostmaster 1 3600 600 86400 %[3]d
@ IN NS ns1
ns1 IN A 127.0.0.1
testenv-nonce IN TXT "%[4]s"
`, s.Zone, s.SOATTL, s.SOAMinimum, s.nonce)
}

// namedConf limits each key to TXT records strictly below _domainkey:
// update-policy's "wildcard" rule matches the names that the wildcard
// *._domainkey.ZONE expands to, which are all names below _domainkey
// (any depth) but not _domainkey itself. "subdomain _domainkey.ZONE"
// would also allow _domainkey.ZONE, and "zonesub" the whole zone.
func (s *DNSServer) namedConf(port, zonefile string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `options {
	directory "%[1]s";
	pid-file "%[1]s/named.pid";
	session-keyfile "%[1]s/session.key";
	managed-keys-directory "%[1]s";
	listen-on port %[2]s { 127.0.0.1; };
	listen-on-v6 { none; };
	recursion no;
	notify no;
	dnssec-validation no;
	allow-transfer { none; };
};
controls { };
`, s.Dir, port)
	for _, k := range s.Keys {
		fmt.Fprintf(&b, "key %q {\n\talgorithm %s;\n\tsecret %q;\n};\n", k.Name, k.Algorithm, k.Secret)
	}
	// The keys may also transfer the zone (AXFR), which a publisher's
	// GetRecords needs to list what is published.
	fmt.Fprintf(&b, "zone %q {\n\ttype primary;\n\tfile %q;\n\tallow-transfer {", s.Zone, zonefile)
	for _, k := range s.Keys {
		fmt.Fprintf(&b, " key %s;", k.Name)
	}
	b.WriteString(" };\n\tupdate-policy {\n")
	for _, k := range s.Keys {
		fmt.Fprintf(&b, "\t\tgrant %s wildcard *._domainkey.%s TXT;\n", k.Name, s.Zone)
	}
	b.WriteString("\t};\n};\n")
	return b.String()
}

// knotConf limits each key the same way: update-type TXT, and owners
// strictly below _domainkey (update-owner-match: sub).
func (s *DNSServer) knotConf(port, zonefile string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `server:
    rundir: "%[1]s"
    pidfile: "%[1]s/knot.pid"
    listen: 127.0.0.1@%[2]s
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

log:
  - target: stderr
    any: info

database:
    storage: "%[1]s"

key:
`, s.Dir, port)
	for _, k := range s.Keys {
		fmt.Fprintf(&b, "  - id: %s\n    algorithm: %s\n    secret: %s\n", k.Name, k.Algorithm, k.Secret)
	}
	var names []string
	for _, k := range s.Keys {
		names = append(names, k.Name)
	}
	fmt.Fprintf(&b, `
acl:
  - id: dkimgw-transfer
    key: [%[1]s]
    action: transfer
  - id: dkimgw-update
    key: [%[1]s]
`, strings.Join(names, ", "))
	fmt.Fprintf(&b, `    action: update
    update-type: [TXT]
    update-owner: name
    update-owner-match: sub
    update-owner-name: [_domainkey]

zone:
  - domain: %s
    storage: "%s"
    file: %q
    acl: [dkimgw-transfer, dkimgw-update]
    zonefile-sync: -1
    zonefile-load: difference-no-serial
    journal-content: all
`, s.Zone, s.Dir, filepath.Base(zonefile))
	return b.String()
}

// waitReady asks the server for the nonce record until it answers with
// it, failing early when the server exits.
func (s *DNSServer) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c := &dns.Client{Net: "udp", Timeout: 500 * time.Millisecond}
	q := new(dns.Msg)
	q.SetQuestion("testenv-nonce."+s.Zone, dns.TypeTXT)
	var last error = errors.New("no answer yet")
	for time.Now().Before(deadline) {
		select {
		case <-s.exited:
			return fmt.Errorf("%s exited before it answered on %s:\n%s%s", s.Impl, s.Addr, s.log.String(), s.apparmorHint())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, _, err := c.ExchangeContext(ctx, q, s.Addr)
		cancel()
		switch {
		case err != nil:
			last = err
		case r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1:
			last = fmt.Errorf("answer %s", dns.RcodeToString[r.Rcode])
		default:
			if txt, ok := r.Answer[0].(*dns.TXT); ok && strings.Join(txt.Txt, "") == s.nonce {
				return nil
			}
			return fmt.Errorf("another server answers on %s (a stale one of a killed run?): %v", s.Addr, r.Answer[0])
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready on %s after %v: %v\n%s", s.Impl, s.Addr, timeout, last, s.log.String())
}

func (s *DNSServer) apparmorHint() string {
	if s.Impl == "bind" && strings.Contains(s.log.String(), "ermission denied") {
		return "\n(on an AppArmor host, Debian's profile for named denies paths outside /etc/bind and /var/cache/bind: run the tests with TMPDIR=/var/cache/bind/tmp or put the profile in complain mode)"
	}
	return ""
}

// stop kills the server's process group and waits for it.
func (s *DNSServer) stop() {
	if s.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.exited
	}
}

func randomSecret(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return base64.StdEncoding.EncodeToString(b)
}
