package dnspub_test

import (
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/testenv"
	"github.com/miekg/dns"
)

func TestCheckerStates(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		t.Run(s.Impl, func(t *testing.T) {
			ctx := t.Context()
			p := newPublisher(t, s, s.Keys[0])
			c := newChecker(t, s)

			servers, err := c.Servers(ctx, s.Zone)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(servers, []string{s.Addr}) {
				t.Fatalf("servers from NS: %v, want [%s]", servers, s.Addr)
			}
			neg, err := c.NegativeTTL(ctx, s.Zone)
			if err != nil {
				t.Fatal(err)
			}
			if want := time.Duration(min(s.SOATTL, s.SOAMinimum)) * time.Second; neg != want {
				t.Errorf("negative TTL %v, want %v", neg, want)
			}

			want := dnspub.Record{Name: "chk._domainkey", TTL: 90 * time.Second, Value: keyRecord(t, rsa4096SPKI)}
			other := dnspub.Record{Name: "chk._domainkey", TTL: 90 * time.Second, Value: "v=DKIM1; p="}
			check := func(state dnspub.State, served []string) {
				t.Helper()
				rep, err := c.Check(ctx, s.Zone, want)
				if err != nil {
					t.Fatal(err)
				}
				if len(rep.Observations) != 2 {
					t.Fatalf("%d observations, want UDP and TCP:\n%s", len(rep.Observations), rep)
				}
				nets := map[string]bool{}
				for _, o := range rep.Observations {
					nets[o.Net] = true
					if o.Server != s.Addr || o.State != state || !slices.Equal(o.Served, served) {
						t.Errorf("%s/%s: %s %q, want %s %q (%v)", o.Server, o.Net, o.State, o.Served, state, served, o.Err)
					}
				}
				if !nets["udp"] || !nets["tcp"] {
					t.Errorf("transports %v, want udp and tcp", nets)
				}
				if rep.Visible() != (state == dnspub.Present) || rep.Gone() != (state == dnspub.Absent) {
					t.Errorf("Visible %v, Gone %v for %s", rep.Visible(), rep.Gone(), state)
				}
			}

			check(dnspub.Absent, nil) // NXDOMAIN
			if _, err := p.AppendRecords(ctx, s.Zone, []dnspub.Record{want}); err != nil {
				t.Fatal(err)
			}
			check(dnspub.Present, []string{want.Value})
			if _, err := p.SetRecords(ctx, s.Zone, []dnspub.Record{other}); err != nil {
				t.Fatal(err)
			}
			check(dnspub.Different, []string{other.Value})
			if _, err := p.DeleteRecords(ctx, s.Zone, []dnspub.Record{other}); err != nil {
				t.Fatal(err)
			}
			check(dnspub.Absent, nil)
		})
	}
}

// TestCheckerFailures: a server that does not answer, or is not
// authoritative for the zone, never counts as serving the record.
func TestCheckerFailures(t *testing.T) {
	s := testenv.StartBIND(t, testenv.DNSOptions{})
	dead, err := net.ListenPacket("udp", "127.0.0.1:0") // reads nothing, answers nothing
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	rec := dnspub.Record{Name: "x._domainkey", Value: "v=DKIM1; p="}
	p := newPublisher(t, s, s.Keys[0])
	if _, err := p.AppendRecords(t.Context(), s.Zone, []dnspub.Record{rec}); err != nil {
		t.Fatal(err)
	}

	c, err := dnspub.NewChecker(dnspub.CheckerOptions{Servers: []string{s.Addr, dead.LocalAddr().String()}, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := c.Check(t.Context(), s.Zone, rec)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Visible() || len(rep.Observations) != 4 {
		t.Fatalf("visible with a dead server:\n%s", rep)
	}
	for _, o := range rep.Observations {
		if o.Server == dead.LocalAddr().String() && (o.State != dnspub.Failed || o.Err == nil) {
			t.Errorf("dead server: %s %v", o.State, o.Err)
		}
	}
	if !strings.Contains(rep.String(), "failed") {
		t.Errorf("report does not say failed:\n%s", rep)
	}

	// The test server is not authoritative for another zone.
	c, err = dnspub.NewChecker(dnspub.CheckerOptions{Servers: []string{s.Addr}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	rep, err = c.Check(t.Context(), "example.org.", dnspub.Record{Name: "x._domainkey", Value: "v=DKIM1; p="})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range rep.Observations {
		if o.State != dnspub.Failed || !strings.Contains(o.Err.Error(), "not authoritative") {
			t.Errorf("%s/%s: %s %v, want failed: not authoritative", o.Server, o.Net, o.State, o.Err)
		}
	}
	if rep.Gone() {
		t.Errorf("a non-authoritative REFUSED counts as absent:\n%s", rep)
	}

	if _, err := dnspub.NewChecker(dnspub.CheckerOptions{}); err == nil {
		t.Error("a checker with no servers and no resolver was accepted")
	}
}

// fakeAuthority serves zone fake.test. from memory on 127.0.0.1 over UDP
// and TCP: two NS hosts without glue, their addresses only when asked.
func fakeAuthority(t *testing.T) string {
	t.Helper()
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		r.Authoritative = true
		name, qt := strings.ToLower(q.Question[0].Name), q.Question[0].Qtype
		add := func(s string) {
			rr, err := dns.NewRR(s)
			if err != nil {
				panic(err)
			}
			r.Answer = append(r.Answer, rr)
		}
		switch {
		case name == "fake.test." && qt == dns.TypeNS:
			add("fake.test. 300 IN NS ns1.fake.test.")
			add("fake.test. 300 IN NS ns2.fake.test.")
		case (name == "ns1.fake.test." || name == "ns2.fake.test.") && qt == dns.TypeA:
			add(name + " 300 IN A 127.0.0.1")
		case name == "s1._domainkey.fake.test." && qt == dns.TypeTXT:
			add(`s1._domainkey.fake.test. 120 IN TXT "v=DKIM1; p="`)
		case strings.HasPrefix(name, "ns") && qt == dns.TypeAAAA:
		default:
			r.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(r)
	})
	pc, l := udpAndTCP(t)
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: l, Handler: handler}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
		t.Cleanup(func() { srv.Shutdown() })
	}
	return pc.LocalAddr().String()
}

// udpAndTCP listens on one free loopback port over UDP and TCP. The UDP
// port the kernel picks may be taken for TCP, so it tries a few.
func udpAndTCP(t *testing.T) (net.PacketConn, net.Listener) {
	t.Helper()
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, l
		}
		pc.Close()
	}
	t.Fatal("no loopback port free for both UDP and TCP")
	return nil, nil
}

// TestCheckerNSWithoutGlue: NS hosts whose addresses come without glue
// are resolved by asking the resolver server for them.
func TestCheckerNSWithoutGlue(t *testing.T) {
	addr := fakeAuthority(t)
	_, port, _ := net.SplitHostPort(addr)
	c, err := dnspub.NewChecker(dnspub.CheckerOptions{Resolver: addr, NSPort: port, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	servers, err := c.Servers(t.Context(), "fake.test")
	if err != nil || !slices.Equal(servers, []string{addr}) {
		t.Fatalf("servers %v, %v; want [%s]", servers, err, addr)
	}
	rep, err := c.Check(t.Context(), "fake.test", dnspub.Record{Name: "s1._domainkey", Value: "v=DKIM1; p="})
	if err != nil || !rep.Visible() || rep.MaxTTL() != 120*time.Second {
		t.Fatalf("check: %v\n%s", err, rep)
	}
}
