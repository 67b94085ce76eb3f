package testenv

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

var tsigAlgs = map[string]string{"hmac-sha256": dns.HmacSHA256, "hmac-sha512": dns.HmacSHA512}

// update sends a one-RR dynamic update signed with key (nil: unsigned)
// over TCP and returns the response code.
func update(t *testing.T, s *DNSServer, key *TSIGKey, rr string) int {
	t.Helper()
	r, err := dns.NewRR(rr)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	m.SetUpdate(s.Zone)
	m.Insert([]dns.RR{r})
	c := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	if key != nil {
		c.TsigSecret = map[string]string{key.Name: key.Secret}
		m.SetTsig(key.Name, tsigAlgs[key.Algorithm], 300, time.Now().Unix())
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	resp, _, err := c.ExchangeContext(ctx, m, s.Addr)
	if resp == nil {
		t.Fatalf("update %s: %v", rr, err)
	}
	return resp.Rcode
}

func lookupTXT(t *testing.T, s *DNSServer, name string) []dns.RR {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeTXT)
	c := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	r, _, err := c.ExchangeContext(t.Context(), m, s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	return r.Answer
}

// TestDNSServerPolicy proves the update policy both servers are started
// with: each TSIG key may add TXT records below _domainkey and nothing
// else; unsigned updates are refused.
func TestDNSServerPolicy(t *testing.T) {
	for _, s := range DNSServers(t, DNSOptions{Zone: "Example.TEST"}) {
		t.Run(s.Impl, func(t *testing.T) {
			if s.Zone != "example.test." {
				t.Fatalf("zone %q", s.Zone)
			}
			for _, key := range s.Keys {
				t.Run(key.Algorithm, func(t *testing.T) {
					allowed := []string{
						"s1._domainkey.example.test. 300 IN TXT \"v=DKIM1; p=\"",
						"a.b._domainkey.example.test. 300 IN TXT \"v=DKIM1; p=\"",
					}
					for _, rr := range allowed {
						if rc := update(t, s, &key, rr); rc != dns.RcodeSuccess {
							t.Errorf("%s: %s, want NOERROR", rr, dns.RcodeToString[rc])
						}
					}
					denied := []string{
						"_domainkey.example.test. 300 IN TXT \"o=~\"",
						"example.test. 300 IN TXT \"v=spf1 -all\"",
						"www.example.test. 300 IN TXT \"x\"",
						"s2._domainkey.example.test. 300 IN A 192.0.2.1",
						"example.test. 300 IN A 192.0.2.1",
					}
					for _, rr := range denied {
						if rc := update(t, s, &key, rr); rc == dns.RcodeSuccess {
							t.Errorf("%s: NOERROR, want it refused", rr)
						}
					}
					if got := lookupTXT(t, s, "_domainkey.example.test."); len(got) != 0 {
						t.Errorf("_domainkey TXT was added: %v", got)
					}
				})
			}
			rr := "s3._domainkey.example.test. 300 IN TXT \"v=DKIM1; p=\""
			if rc := update(t, s, nil, rr); rc == dns.RcodeSuccess {
				t.Errorf("unsigned update accepted")
			}
			if got := lookupTXT(t, s, "s3._domainkey.example.test."); len(got) != 0 {
				t.Errorf("unsigned update changed the zone: %v", got)
			}
		})
	}
}

// TestDNSServerStopped checks that cleanup leaves no server behind: the
// process group is gone once the subtest's cleanup has run.
func TestDNSServerStopped(t *testing.T) {
	for _, start := range []func(testing.TB, DNSOptions) *DNSServer{StartBIND, StartKnot} {
		var pid int
		t.Run("", func(t *testing.T) {
			s := start(t, DNSOptions{})
			pid = s.cmd.Process.Pid
		})
		if pid == 0 {
			t.Fatal("no server started")
		}
		if err := syscall.Kill(-pid, 0); err != syscall.ESRCH {
			t.Errorf("process group %d still there after cleanup (kill 0: %v)", pid, err)
		}
	}
}

// TestDocumentedDNSConfig keeps the BIND and Knot configuration that
// docs/dns-admins.md gives DNS admins, and the BIND configuration of
// docker-compose.yml, the one the test servers run with: every policy line
// the servers get, rendered for example.com and a key dkimgw., is in
// them (BIND's only in deploy/bind/named.conf).
func TestDocumentedDNSConfig(t *testing.T) {
	doc, err := os.ReadFile("../docs/dns-admins.md")
	if err != nil {
		t.Fatal(err)
	}
	compose, err := os.ReadFile("../deploy/bind/named.conf")
	if err != nil {
		t.Fatal(err)
	}
	s := &DNSServer{Zone: "example.com.", Keys: []TSIGKey{{Name: "dkimgw.", Algorithm: "hmac-sha256", Secret: "c2VjcmV0"}}}
	var bind, knot []string
	for _, l := range strings.Split(s.namedConf("53", "/zone.db"), "\n") {
		if strings.Contains(l, "grant ") || strings.Contains(l, "allow-transfer { key") {
			bind = append(bind, strings.TrimSpace(l))
		}
	}
	for _, l := range strings.Split(s.knotConf("53", "/zone.db"), "\n") {
		if strings.Contains(l, "update-") || strings.Contains(l, "action:") || strings.Contains(l, "key: [") {
			knot = append(knot, strings.TrimSpace(l))
		}
	}
	if len(bind) < 2 || len(knot) < 6 {
		t.Fatalf("found only %d BIND and %d Knot policy lines in the generated configs: %q %q", len(bind), len(knot), bind, knot)
	}
	for _, l := range append(bind, knot...) {
		if !strings.Contains(string(doc), l) {
			t.Errorf("docs/dns-admins.md lacks the test servers' line %q", l)
		}
	}
	for _, l := range bind {
		if !strings.Contains(string(compose), l) {
			t.Errorf("deploy/bind/named.conf lacks the test servers' line %q", l)
		}
	}
}

// TestComposeZone: the zone docker-compose.yml's BIND starts with loads.
func TestComposeZone(t *testing.T) {
	checkzone := Require(t, "named-checkzone")[0]
	out, err := exec.CommandContext(t.Context(), checkzone, "example.com", "../deploy/bind/example.com.zone").CombinedOutput()
	if err != nil {
		t.Fatalf("named-checkzone deploy/bind/example.com.zone: %v\n%s", err, out)
	}
}
