package dnspub

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// DefaultTimeout bounds one exchange with a DNS server when the options
// set none: a primary answers an update in milliseconds; ten seconds
// leave room for a slow link and a busy server without hanging a
// reconciler run.
const DefaultTimeout = 10 * time.Second

// tsigFudge is the clock skew a TSIG signature tolerates, the value
// RFC 8945 §10 recommends.
const tsigFudge = 300

// TSIG names the key that signs updates (RFC 8945).
type TSIG struct {
	// Name is the key's name as the server knows it, e.g. "dkimgw." (a
	// trailing dot is added when missing).
	Name string
	// Algorithm is "hmac-sha256" or "hmac-sha512"; "" means hmac-sha256.
	Algorithm string
	// SecretFile is a file holding the base64 secret, alone or as the
	// secret "..." line of a BIND key statement (tsig-keygen's output).
	SecretFile string
}

// RFC2136Options configure an RFC2136 publisher.
type RFC2136Options struct {
	// Server is the zone's primary, host:port; a missing port means 53.
	Server string
	// TSIG is the key that signs every update and zone transfer.
	// Required: dkimgw does not send unsigned updates.
	TSIG TSIG
	// Timeout bounds each exchange; zero means DefaultTimeout. A context
	// deadline that comes earlier wins.
	Timeout time.Duration
	// Logger receives a line per change; nil discards them.
	Logger *slog.Logger
}

// RFC2136 publishes records by dynamic update (RFC 2136) signed with
// TSIG, sent to the zone's primary server over TCP: an update is not
// idempotent in general, and over UDP a lost answer leaves no way to tell
// whether it was applied; TCP also carries any record size.
//
// Every change carries prerequisites (RFC 2136 §2.4) so that the server
// applies it only if the record is still what dkimgw last saw:
//
//   - AppendRecords requires the name to hold no TXT record ("RRset does
//     not exist"). A selector holds exactly one key record (RFC 6376
//     §3.6.2.2 leaves several TXT records undefined), so AppendRecords
//     never adds a second value next to another one: it reports the
//     other value as ErrConflict. Appending a record that is already
//     there is a no-op.
//   - SetRecords, Replace and DeleteRecords first read the RRset from the
//     primary, then send the change with "RRset exists (value dependent)"
//     holding exactly what they read (or "RRset does not exist" when they
//     read nothing). If another writer changes the record between the
//     read and the update, the server answers NXRRSET and nothing is
//     changed: the caller gets ErrConflict and decides again on fresh
//     data. Replace also checks the caller's expectation (the old value),
//     so a record altered behind dkimgw's back is never overwritten.
//
// The methods take a zone, as libdns providers do, so that one publisher
// serves every zone the primary has and the key may update.
type RFC2136 struct {
	server  string
	key     string // fully qualified, lower case
	alg     string // miekg/dns algorithm name
	secret  string // base64
	timeout time.Duration
	log     *slog.Logger
	now     func() time.Time // the TSIG clock; tests skew it
	// afterLookup runs between reading an RRset and sending the update
	// that depends on it: tests change the record there, as a concurrent
	// writer would.
	afterLookup func()
}

var tsigAlgorithms = map[string]string{
	"":            dns.HmacSHA256,
	"hmac-sha256": dns.HmacSHA256,
	"hmac-sha512": dns.HmacSHA512,
}

// NewRFC2136 checks opts and reads the TSIG secret. It does not contact
// the server.
func NewRFC2136(opts RFC2136Options) (*RFC2136, error) {
	if opts.Server == "" {
		return nil, errors.New("dnspub: rfc2136: no server given: set the zone's primary, host:port")
	}
	server := opts.Server
	if _, _, err := net.SplitHostPort(server); err != nil {
		server = net.JoinHostPort(strings.Trim(server, "[]"), "53")
	}
	if opts.TSIG.Name == "" {
		return nil, errors.New("dnspub: rfc2136: no TSIG key name given: dkimgw signs every update")
	}
	alg, ok := tsigAlgorithms[strings.ToLower(opts.TSIG.Algorithm)]
	if !ok {
		return nil, fmt.Errorf("dnspub: rfc2136: TSIG algorithm %q is not supported: use hmac-sha256 or hmac-sha512", opts.TSIG.Algorithm)
	}
	secret, err := ReadTSIGSecret(opts.TSIG.SecretFile)
	if err != nil {
		return nil, err
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &RFC2136{
		server:  server,
		key:     dns.CanonicalName(opts.TSIG.Name),
		alg:     alg,
		secret:  secret,
		timeout: timeout,
		log:     log.With("component", "dnspub", "server", server),
		now:     time.Now,
	}, nil
}

var bindSecret = regexp.MustCompile(`secret\s+"([^"]*)"`)

// ReadTSIGSecret reads a base64 TSIG secret from path: the secret alone,
// or a BIND key statement as tsig-keygen writes it. Errors never quote
// the file's content.
func ReadTSIGSecret(path string) (string, error) {
	if path == "" {
		return "", errors.New("dnspub: no TSIG secret file given")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("dnspub: read TSIG secret: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if m := bindSecret.FindStringSubmatch(s); m != nil {
		s = m[1]
	}
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(raw) == 0 {
		return "", fmt.Errorf("dnspub: TSIG secret file %s does not hold a base64 secret (or a BIND key statement with one)", path)
	}
	return s, nil
}

// Server is the host:port updates go to.
func (p *RFC2136) Server() string { return p.server }

// exchange sends m to the primary over TCP within the timeout, signed
// when sign is set, and classifies the outcome.
func (p *RFC2136) exchange(ctx context.Context, op, zone, name string, m *dns.Msg, sign bool) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	c := &dns.Client{Net: "tcp", Timeout: p.timeout}
	e := &Error{Op: op, Zone: zone, Server: p.server, Name: name}
	if sign {
		c.TsigSecret = map[string]string{p.key: p.secret}
		m.SetTsig(p.key, p.alg, tsigFudge, p.now().Unix())
		e.Key = p.key
	}
	resp, _, err := c.ExchangeContext(ctx, m, p.server)
	if err := classify(e, resp, err); err != nil {
		return resp, err
	}
	return resp, nil
}

// lookup reads the TXT RRset at fqdn from the primary, for an update
// that depends on it.
func (p *RFC2136) lookup(ctx context.Context, zone, fqdn string) ([]dns.RR, error) {
	rrs, err := p.lookupRRs(ctx, zone, fqdn)
	if err == nil && p.afterLookup != nil {
		p.afterLookup()
	}
	return rrs, err
}

// lookupRRs reads the TXT RRset at fqdn from the primary itself, so that
// what it returns is what a prerequisite will be checked against. The
// query is signed, so that the answer is authenticated and a primary may
// limit queries to the key.
func (p *RFC2136) lookupRRs(ctx context.Context, zone, fqdn string) ([]dns.RR, error) {
	m := new(dns.Msg)
	m.SetQuestion(fqdn, dns.TypeTXT)
	m.RecursionDesired = false
	resp, err := p.exchange(ctx, "query", zone, fqdn, m, true)
	if err != nil {
		var de *Error
		if errors.As(err, &de) && de.Rcode == dns.RcodeNameError {
			return nil, nil // NXDOMAIN: no record
		}
		return nil, err
	}
	if !resp.Authoritative {
		return nil, &Error{Op: "query", Zone: zone, Server: p.server, Name: fqdn, Rcode: resp.Rcode, Kind: ErrRefused,
			Hint: fmt.Sprintf("the server's answer is not authoritative: check that it is the primary of %s", zone)}
	}
	var rrs []dns.RR
	for _, rr := range resp.Answer {
		if rr.Header().Rrtype == dns.TypeTXT && strings.EqualFold(rr.Header().Name, fqdn) {
			rrs = append(rrs, rr)
		}
	}
	return rrs, nil
}

// copies deep-copies rrs: miekg/dns's update builders (Used, Remove)
// change the class and TTL of the records they are given.
func copies(rrs []dns.RR) []dns.RR {
	out := make([]dns.RR, len(rrs))
	for i, rr := range rrs {
		out[i] = dns.Copy(rr)
	}
	return out
}

func values(rrs []dns.RR) []string {
	var vs []string
	for _, rr := range rrs {
		if v, ok := value(rr); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

// sameRRset reports whether rrs is exactly one TXT record with r's value
// and TTL.
func sameRRset(rrs []dns.RR, r Record) bool {
	return len(rrs) == 1 && values(rrs)[0] == r.Value && rrs[0].Header().Ttl == r.ttlSeconds()
}

func (p *RFC2136) conflict(zone, fqdn string, served []string, hint string) error {
	return &Error{Op: "update", Zone: zone, Server: p.server, Name: fqdn, Key: p.key, Rcode: -1, Kind: ErrConflict, Served: served, Hint: hint}
}

// update sends one update to the zone's primary.
func (p *RFC2136) update(ctx context.Context, zone, fqdn string, build func(m *dns.Msg)) error {
	m := new(dns.Msg)
	m.SetUpdate(zone)
	build(m)
	_, err := p.exchange(ctx, "update", zone, fqdn, m, true)
	var de *Error
	if errors.As(err, &de) && de.TSIGError == dns.RcodeBadKey && p.keyKnown(ctx, zone) {
		// Knot answers an update its ACL denies with NOTAUTH and BADKEY,
		// as it does an unknown key. A query signed with the same key
		// tells them apart: it verifies when the server knows the key.
		de.Kind = ErrRefused
		de.Hint = fmt.Sprintf("the server knows key %s but does not let it make this update: check that its acl (Knot) or update-policy (BIND) grants the key updates of TXT records below _domainkey.%s", p.key, zone)
	}
	return err
}

// keyKnown reports whether the server answers a query signed with the
// key with a verified answer.
func (p *RFC2136) keyKnown(ctx context.Context, zone string) bool {
	m := new(dns.Msg)
	m.SetQuestion(zone, dns.TypeSOA)
	m.RecursionDesired = false
	_, err := p.exchange(ctx, "query", zone, zone, m, true)
	return err == nil
}

// GetRecords lists the TXT records at and below _domainkey.<zone>, by a
// TSIG-signed zone transfer (AXFR) from the primary: the key must be
// allowed to transfer the zone.
func (p *RFC2136) GetRecords(ctx context.Context, zone string) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	e := &Error{Op: "transfer", Zone: zone, Server: p.server, Key: p.key, Rcode: -1}
	d := net.Dialer{Timeout: p.timeout}
	conn, err := d.DialContext(ctx, "tcp", p.server)
	if err != nil {
		return nil, classify(e, nil, err)
	}
	defer conn.Close()
	// Transfer has no context: the deadline bounds it, and closing the
	// connection ends it when ctx is cancelled early.
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	t := &dns.Transfer{Conn: &dns.Conn{Conn: conn}, TsigSecret: map[string]string{p.key: p.secret}}
	m := new(dns.Msg)
	m.SetAxfr(zone)
	m.SetTsig(p.key, p.alg, tsigFudge, p.now().Unix())
	envs, err := t.In(m, p.server)
	if err != nil {
		return nil, classify(e, nil, err)
	}
	under := "_domainkey." + zone
	var recs []Record
	for env := range envs {
		if env.Error != nil {
			return nil, transferError(e, env.Error)
		}
		for _, rr := range env.RR {
			name := strings.ToLower(rr.Header().Name)
			if v, ok := value(rr); ok && dns.IsSubDomain(under, name) {
				recs = append(recs, Record{Name: relName(name, zone), TTL: ttl(rr), Value: v})
			}
		}
	}
	return recs, nil
}

// transferError classifies an AXFR failure: miekg/dns reports a refused
// or unauthenticated transfer as an error string, not a message.
func transferError(e *Error, err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "REFUSED") || strings.Contains(msg, "NOTAUTH"):
		e.Kind = ErrRefused
		e.Hint = fmt.Sprintf("allow key %s to transfer zone %s (BIND: allow-transfer { key %s; }; Knot: an acl with action: transfer), or do not list records", e.Key, e.Zone, e.Key)
		e.Err = err
		return e
	case errors.Is(err, dns.ErrSig) || errors.Is(err, dns.ErrAuth) || errors.Is(err, dns.ErrTime):
		e.Kind, e.Err = ErrTSIG, err
		e.Hint = fmt.Sprintf("check key %s's secret and algorithm", e.Key)
		return e
	}
	return classify(e, nil, err)
}

// AppendRecords publishes each record at a name that holds no TXT record
// yet. A name that already holds the record's value (whatever its TTL;
// SetRecords changes a TTL) is left alone; a name that holds anything else is an ErrConflict and is not
// changed. It returns the records that are published when it returns:
// on error, those before the failing one.
func (p *RFC2136) AppendRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	var done []Record
	for _, r := range recs {
		fqdn, err := r.fqdn(zone)
		if err != nil {
			return done, err
		}
		rr := txtRR(fqdn, r)
		err = p.update(ctx, zone, fqdn, func(m *dns.Msg) {
			m.RRsetNotUsed([]dns.RR{rr})
			m.Insert([]dns.RR{rr})
		})
		if errors.Is(err, ErrConflict) {
			// The name holds TXT records: ours (a repeat) or someone else's.
			cur, lerr := p.lookupRRs(ctx, zone, fqdn)
			if lerr != nil {
				return done, lerr
			}
			if vs := values(cur); len(vs) != 1 || vs[0] != r.Value {
				return done, p.conflict(zone, fqdn, values(cur), "the name already holds another TXT record; dkimgw publishes a selector only where nothing is: remove it or pick another selector")
			}
			err = nil
		} else if err == nil {
			p.log.Info("record published", "name", fqdn, "ttl", r.ttlSeconds())
		}
		if err != nil {
			return done, err
		}
		done = append(done, r)
	}
	return done, nil
}

// SetRecords makes each record the only TXT record at its name, whatever
// was there, unless the name changes while it does so (ErrConflict, and
// nothing changed). Setting a record that is already there changes
// nothing. It returns the records set: on error, those before the
// failing one.
func (p *RFC2136) SetRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	var done []Record
	for _, r := range recs {
		fqdn, err := r.fqdn(zone)
		if err != nil {
			return done, err
		}
		cur, err := p.lookup(ctx, zone, fqdn)
		if err != nil {
			return done, err
		}
		if err := p.replace(ctx, zone, fqdn, cur, r); err != nil {
			return done, err
		}
		done = append(done, r)
	}
	return done, nil
}

// Replace sets new at old's name only if the name holds exactly old's
// value now: the compare-and-set a reconciler uses to revoke or replace a
// key record it published, without overwriting a record someone changed
// behind its back (ErrConflict, with what the server holds). A name that
// already holds new is left alone.
func (p *RFC2136) Replace(ctx context.Context, zone string, old, new Record) error {
	zone, err := normZone(zone)
	if err != nil {
		return err
	}
	fqdn, err := old.fqdn(zone)
	if err != nil {
		return err
	}
	if n, err := new.fqdn(zone); err != nil {
		return err
	} else if n != fqdn {
		return fmt.Errorf("dnspub: replace %s with a record of another name (%s)", fqdn, n)
	}
	cur, err := p.lookup(ctx, zone, fqdn)
	if err != nil {
		return err
	}
	vs := values(cur)
	if sameRRset(cur, new) {
		return nil
	}
	if len(vs) != 1 || vs[0] != old.Value {
		return p.conflict(zone, fqdn, vs, "the name does not hold the record dkimgw published: someone changed it; dkimgw left it as it is")
	}
	return p.replace(ctx, zone, fqdn, cur, new)
}

// replace swaps the RRset cur (as read from the primary) for r, with a
// prerequisite that the RRset is still cur.
func (p *RFC2136) replace(ctx context.Context, zone, fqdn string, cur []dns.RR, r Record) error {
	if sameRRset(cur, r) {
		return nil
	}
	rr := txtRR(fqdn, r)
	err := p.update(ctx, zone, fqdn, func(m *dns.Msg) {
		if len(cur) == 0 {
			m.RRsetNotUsed([]dns.RR{rr})
		} else {
			m.Used(copies(cur))
			m.RemoveRRset([]dns.RR{rr})
		}
		m.Insert([]dns.RR{rr})
	})
	if err == nil {
		p.log.Info("record set", "name", fqdn, "ttl", r.ttlSeconds(), "replaced", len(cur))
	}
	return err
}

// DeleteRecords removes each record: the TXT records at its name whose
// value is the record's, or every TXT record at the name when Value is
// "". Other values at the name stay. Deleting a record that is not there
// is not an error. It returns the records that were there and are
// deleted.
func (p *RFC2136) DeleteRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	var done []Record
	for _, r := range recs {
		fqdn, err := r.fqdn(zone)
		if err != nil {
			return done, err
		}
		cur, err := p.lookup(ctx, zone, fqdn)
		if err != nil {
			return done, err
		}
		var gone []dns.RR
		for _, rr := range cur {
			if v, _ := value(rr); r.Value == "" || v == r.Value {
				gone = append(gone, rr)
			}
		}
		if len(gone) == 0 {
			continue
		}
		err = p.update(ctx, zone, fqdn, func(m *dns.Msg) {
			m.Used(copies(cur))
			m.Remove(copies(gone))
		})
		if err != nil {
			return done, err
		}
		p.log.Info("record deleted", "name", fqdn, "records", len(gone))
		for _, rr := range gone {
			v, _ := value(rr)
			done = append(done, Record{Name: relName(fqdn, zone), TTL: ttl(rr), Value: v})
		}
	}
	return done, nil
}

// Lookup returns the TXT records at name as the primary serves them.
func (p *RFC2136) Lookup(ctx context.Context, zone, name string) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	fqdn, err := absName(name, zone)
	if err != nil {
		return nil, err
	}
	cur, err := p.lookupRRs(ctx, zone, fqdn)
	if err != nil {
		return nil, err
	}
	recs := make([]Record, 0, len(cur))
	for _, rr := range cur {
		v, _ := value(rr)
		recs = append(recs, Record{Name: relName(fqdn, zone), TTL: ttl(rr), Value: v})
	}
	slices.SortFunc(recs, func(a, b Record) int { return strings.Compare(a.Value, b.Value) })
	return recs, nil
}
