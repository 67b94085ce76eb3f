package dnspub

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// ednsSize is the UDP payload size the checker advertises: the DNS Flag
// Day 2020 value, which fits an RSA-4096 key record without fragments.
const ednsSize = 1232

// CheckerOptions configure a Checker. Set Servers, or Resolver to find the
// zone's servers from its NS records.
type CheckerOptions struct {
	// Servers are the authoritative servers to ask, host:port (a missing
	// port means 53). Empty: the zone's NS records, found by asking
	// Resolver.
	Servers []string
	// Resolver is a server asked for the zone's NS records and for the
	// addresses of the NS hosts (typically the primary), host:port. An NS
	// host it does not answer for is resolved with the system resolver.
	Resolver string
	// NSPort is the port of the servers found from NS records; "" means
	// 53. Tests run their servers on other ports.
	NSPort string
	// Timeout bounds each query; zero means DefaultTimeout.
	Timeout time.Duration
}

// Checker asks a zone's authoritative servers directly whether they serve
// a record: no recursive resolver, no cache, recursion not desired, and
// an answer counts only when it is authoritative.
type Checker struct {
	servers  []string
	resolver string
	nsPort   string
	timeout  time.Duration
}

// NewChecker checks opts. It does not contact any server.
func NewChecker(opts CheckerOptions) (*Checker, error) {
	c := &Checker{resolver: withPort(opts.Resolver, "53"), nsPort: opts.NSPort, timeout: opts.Timeout}
	for _, s := range opts.Servers {
		c.servers = append(c.servers, withPort(s, "53"))
	}
	if len(c.servers) == 0 && c.resolver == "" {
		return nil, errors.New("dnspub: checker: no servers and no resolver: list the authoritative servers, or name one (the primary) to ask for the zone's NS records")
	}
	if c.nsPort == "" {
		c.nsPort = "53"
	}
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	return c, nil
}

func withPort(s, port string) string {
	if s == "" {
		return ""
	}
	if _, _, err := net.SplitHostPort(s); err == nil {
		return s
	}
	return net.JoinHostPort(strings.Trim(s, "[]"), port)
}

// State is what one server serves at a name, compared with what is
// expected.
type State int

const (
	// Failed: no usable answer (timeout, refusal, not authoritative).
	Failed State = iota
	// Present: exactly one TXT record, with the expected value.
	Present
	// Absent: no TXT record at the name (NXDOMAIN or no data).
	Absent
	// Different: TXT records, but not exactly the expected one.
	Different
)

func (s State) String() string {
	switch s {
	case Present:
		return "present"
	case Absent:
		return "absent"
	case Different:
		return "different"
	}
	return "failed"
}

// Observation is one server's answer over one transport.
type Observation struct {
	Server string // host:port
	Net    string // "udp" or "tcp"
	State  State
	// Served are the values served (one per TXT record, its strings
	// joined), for Present and Different.
	Served []string
	// TTL is the served record's TTL.
	TTL time.Duration
	// Err says why the state is Failed.
	Err error
}

// Report is what every server serves at one name.
type Report struct {
	Name string // fully qualified
	// Want is the expected value; "" when only absence was checked.
	Want         string
	Observations []Observation
}

// Visible reports whether every server serves exactly the expected
// record over UDP and over TCP.
func (r *Report) Visible() bool { return r.all(Present) }

// Gone reports whether no server serves any TXT record at the name, over
// UDP or TCP.
func (r *Report) Gone() bool { return r.all(Absent) }

func (r *Report) all(s State) bool {
	if len(r.Observations) == 0 {
		return false
	}
	for _, o := range r.Observations {
		if o.State != s {
			return false
		}
	}
	return true
}

// MaxTTL is the longest TTL any server serves the record with: how long
// a resolver may keep the answer.
func (r *Report) MaxTTL() time.Duration {
	var m time.Duration
	for _, o := range r.Observations {
		m = max(m, o.TTL)
	}
	return m
}

// String renders one line per observation, e.g.
// "127.0.0.1:53/udp: different: served [\"v=DKIM1; p=\"]".
func (r *Report) String() string {
	var b strings.Builder
	for _, o := range r.Observations {
		fmt.Fprintf(&b, "%s/%s: %s", o.Server, o.Net, o.State)
		switch {
		case o.Err != nil:
			fmt.Fprintf(&b, ": %v", o.Err)
		case o.State == Different:
			fmt.Fprintf(&b, ": served %q", o.Served)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// Servers returns the servers to ask for zone: the configured list, or
// the addresses of the zone's NS hosts.
func (c *Checker) Servers(ctx context.Context, zone string) ([]string, error) {
	if len(c.servers) > 0 {
		return slices.Clone(c.servers), nil
	}
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	resp, err := c.query(ctx, c.resolver, "tcp", zone, dns.TypeNS)
	if err != nil {
		return nil, err
	}
	if resp.Rcode != dns.RcodeSuccess || !resp.Authoritative {
		return nil, fmt.Errorf("dnspub: checker: %s gave no authoritative NS records for %s (%s): name a server authoritative for the zone, or list the servers", c.resolver, zone, rcodeString(resp.Rcode))
	}
	glue := map[string][]string{}
	for _, rr := range resp.Extra {
		switch a := rr.(type) {
		case *dns.A:
			glue[strings.ToLower(a.Hdr.Name)] = append(glue[strings.ToLower(a.Hdr.Name)], a.A.String())
		case *dns.AAAA:
			glue[strings.ToLower(a.Hdr.Name)] = append(glue[strings.ToLower(a.Hdr.Name)], a.AAAA.String())
		}
	}
	var servers []string
	for _, rr := range resp.Answer {
		ns, ok := rr.(*dns.NS)
		if !ok {
			continue
		}
		host := strings.ToLower(ns.Ns)
		addrs := glue[host]
		if len(addrs) == 0 {
			if addrs, err = c.addresses(ctx, host); err != nil {
				return nil, err
			}
		}
		for _, a := range addrs {
			servers = append(servers, net.JoinHostPort(a, c.nsPort))
		}
	}
	slices.Sort(servers)
	servers = slices.Compact(servers)
	if len(servers) == 0 {
		return nil, fmt.Errorf("dnspub: checker: no addresses for the NS records of %s", zone)
	}
	return servers, nil
}

// addresses resolves an NS host name: first by asking the resolver
// server (authoritative answers only), then the system resolver, since
// an NS host outside the zone is not the resolver's to answer for.
func (c *Checker) addresses(ctx context.Context, host string) ([]string, error) {
	var addrs []string
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		resp, err := c.query(ctx, c.resolver, "tcp", host, t)
		if err != nil || !resp.Authoritative {
			continue
		}
		for _, rr := range resp.Answer {
			switch a := rr.(type) {
			case *dns.A:
				addrs = append(addrs, a.A.String())
			case *dns.AAAA:
				addrs = append(addrs, a.AAAA.String())
			}
		}
	}
	if len(addrs) > 0 {
		return addrs, nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	ips, err := net.DefaultResolver.LookupHost(ctx, strings.TrimSuffix(host, "."))
	if err != nil {
		return nil, fmt.Errorf("dnspub: checker: resolve NS host %s: %w", host, err)
	}
	return ips, nil
}

// query asks server one question, recursion not desired.
func (c *Checker) query(ctx context.Context, server, network, name string, qtype uint16) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.RecursionDesired = false
	m.SetEdns0(ednsSize, false)
	cl := &dns.Client{Net: network, Timeout: c.timeout, UDPSize: ednsSize}
	resp, _, err := cl.ExchangeContext(ctx, m, server)
	if err != nil {
		var ne net.Error
		if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("dnspub: checker: %s over %s: no answer within %v: %w", server, network, c.timeout, ErrTimeout)
		}
		return nil, fmt.Errorf("dnspub: checker: %s over %s: %w", server, network, err)
	}
	return resp, nil
}

// Check asks every server, over UDP and TCP, for the TXT records at
// rec's name in zone and compares them with rec.Value. It returns an
// error only when it cannot tell which servers to ask; a server that
// fails is an Observation with State Failed.
func (c *Checker) Check(ctx context.Context, zone string, rec Record) (*Report, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	fqdn, err := rec.fqdn(zone)
	if err != nil {
		return nil, err
	}
	servers, err := c.Servers(ctx, zone)
	if err != nil {
		return nil, err
	}
	r := &Report{Name: fqdn, Want: rec.Value}
	r.Observations = make([]Observation, 2*len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		for j, network := range []string{"udp", "tcp"} {
			wg.Go(func() {
				r.Observations[2*i+j] = c.observe(ctx, s, network, fqdn, rec.Value)
			})
		}
	}
	wg.Wait()
	return r, nil
}

func (c *Checker) observe(ctx context.Context, server, network, fqdn, want string) Observation {
	o := Observation{Server: server, Net: network}
	resp, err := c.query(ctx, server, network, fqdn, dns.TypeTXT)
	switch {
	case err != nil:
		o.Err = err
		return o
	case resp.Truncated:
		// A resolver would retry over TCP; the TCP observation says
		// what it gets.
		o.Err = fmt.Errorf("dnspub: checker: %s truncated the answer over UDP", server)
		return o
	case !resp.Authoritative:
		o.Err = fmt.Errorf("dnspub: checker: %s is not authoritative for %s (%s)", server, fqdn, rcodeString(resp.Rcode))
		return o
	case resp.Rcode == dns.RcodeNameError:
		o.State = Absent
		return o
	case resp.Rcode != dns.RcodeSuccess:
		o.Err = fmt.Errorf("dnspub: checker: %s answered %s", server, rcodeString(resp.Rcode))
		return o
	}
	for _, rr := range resp.Answer {
		if v, ok := value(rr); ok && strings.EqualFold(rr.Header().Name, fqdn) {
			o.Served = append(o.Served, v)
			o.TTL = max(o.TTL, time.Duration(rr.Header().Ttl)*time.Second)
		}
	}
	switch {
	case len(o.Served) == 0:
		o.State = Absent
	case want != "" && len(o.Served) == 1 && o.Served[0] == want:
		o.State = Present
	default:
		o.State = Different
	}
	return o
}

// NegativeTTL is how long a resolver may cache the absence of a name in
// zone (RFC 2308 §5: the smaller of the SOA record's TTL and its MINIMUM
// field), the longest any of the zone's servers says. A reconciler waits
// it out after publishing a record that resolvers may have asked for
// before it existed.
func (c *Checker) NegativeTTL(ctx context.Context, zone string) (time.Duration, error) {
	zone, err := normZone(zone)
	if err != nil {
		return 0, err
	}
	servers, err := c.Servers(ctx, zone)
	if err != nil {
		return 0, err
	}
	var longest time.Duration
	for _, s := range servers {
		resp, err := c.query(ctx, s, "tcp", zone, dns.TypeSOA)
		if err != nil {
			return 0, err
		}
		var soa *dns.SOA
		for _, rr := range resp.Answer {
			if x, ok := rr.(*dns.SOA); ok {
				soa = x
			}
		}
		if soa == nil || !resp.Authoritative {
			return 0, fmt.Errorf("dnspub: checker: %s gave no authoritative SOA for %s (%s)", s, zone, rcodeString(resp.Rcode))
		}
		longest = max(longest, time.Duration(min(soa.Hdr.Ttl, soa.Minttl))*time.Second)
	}
	return longest, nil
}
