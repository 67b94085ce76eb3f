package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

// This file wires the token and DNS into the rotation reconciler: the
// adapters between hsm, dnspub and rotation's own small interfaces live
// here and nowhere else (arch_test.go).

// rotationSetup is a reconciler built from a configuration, with what the
// rotate and dns commands need besides it.
type rotationSetup struct {
	rec      *rotation.Reconciler
	store    *stateStore
	policies map[string]rotation.Policy // by domain
	manuals  map[string]*dnspub.Manual  // by publisher name
	checkers *zoneCheckers
	pubs     map[string]*publisher
	// borrowed: the store belongs to another setup (a reload that kept
	// the etcd store), which closes it.
	borrowed bool
}

// newRotation builds the reconciler of cfg's rotating domains. tok may be
// nil for commands that only read the state (rotate status): the key
// store is then never called. It does no I/O but creating data_dir and
// reading the TSIG secrets.
func newRotation(cfg *policy.Config, tok *hsm.Token, logger *slog.Logger, after func(rotation.Report, error), lockWait time.Duration) (*rotationSetup, error) {
	return newAuditedRotation(cfg, tok, logger, after, lockWait, nil)
}

// Close closes the state store (a no-op for bbolt; etcd's connections
// and leases otherwise). The reconciler must not be used afterwards.
func (s *rotationSetup) Close() error {
	if s == nil || s.borrowed {
		return nil
	}
	return s.store.Close()
}

// newAuditedRotation is newRotation with every rotation event recorded
// in alog too (nil: logged only).
func newAuditedRotation(cfg *policy.Config, tok *hsm.Token, logger *slog.Logger, after func(rotation.Report, error), lockWait time.Duration, alog *audit.Log) (*rotationSetup, error) {
	store, err := openState(cfg, cfg.SMTP.Hostname, logger)
	if err != nil {
		return nil, err
	}
	s, err := rotationOn(store, cfg, tok, logger, after, lockWait, alog)
	if err != nil {
		store.Close()
		return nil, err
	}
	return s, nil
}

// rotationOn is newAuditedRotation on a store already open, which it
// leaves open when it fails.
func rotationOn(store *stateStore, cfg *policy.Config, tok *hsm.Token, logger *slog.Logger, after func(rotation.Report, error), lockWait time.Duration, alog *audit.Log) (*rotationSetup, error) {
	s := &rotationSetup{
		store:    store,
		policies: map[string]rotation.Policy{},
		manuals:  map[string]*dnspub.Manual{},
		checkers: &zoneCheckers{byZone: map[string]*dnspub.Checker{}, timeout: cfg.DNS.Timeout.D()},
		pubs:     map[string]*publisher{},
	}
	domains := map[string]bool{}
	var pols []rotation.Policy
	for _, d := range cfg.Rotating() {
		r := cfg.Domains[d].Rotation
		p := rotation.Policy{
			Domain: d, Zone: r.Zone, Interval: r.Interval.D(), Grace: r.Grace.D(), RevokeFor: r.RevokeFor.D(),
			TTL: r.TTL.D(), Publisher: r.Publisher, SelectorTemplate: r.SelectorTemplate,
		}
		for _, a := range r.Algorithms {
			p.Algorithms = append(p.Algorithms, rotation.Algorithm(a))
		}
		pols = append(pols, p)
		s.policies[d] = p
		domains[d] = true
		if err := s.addPublisher(cfg, r.Publisher, logger); err != nil {
			return nil, err
		}
		if err := s.checkers.add(cfg, r.Zone, r.Publisher); err != nil {
			return nil, fmt.Errorf("domains.%s.rotation: %w", d, err)
		}
	}
	rpubs := make(map[string]rotation.Publisher, len(s.pubs))
	for name, p := range s.pubs {
		p.checker = s.checkers
		rpubs[name] = p
	}
	var err error
	s.rec, err = rotation.New(rotation.Options{
		Store:      &waitingStore{Store: store, wait: lockWait},
		Keys:       &tokenKeys{tok: tok, domains: domains},
		Publishers: rpubs,
		Checker:    s.checkers,
		Events:     &auditEvents{logEvents: logEvents{log: logger.With("component", "rotation-events")}, audit: alog},
		Logger:     logger,
		Policies:   pols,
		AfterPass:  after,
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (s *rotationSetup) addPublisher(cfg *policy.Config, name string, logger *slog.Logger) error {
	if s.pubs[name] != nil {
		return nil
	}
	pc := cfg.DNS.Publishers[name]
	switch pc.Type {
	case policy.PublisherRFC2136:
		p, err := dnspub.NewRFC2136(dnspub.RFC2136Options{
			Server:  pc.Server,
			TSIG:    dnspub.TSIG{Name: pc.TSIG.Name, Algorithm: pc.TSIG.Algorithm, SecretFile: pc.TSIG.SecretFile},
			Timeout: cfg.DNS.Timeout.D(),
			Logger:  logger,
		})
		if err != nil {
			return fmt.Errorf("dns.publishers.%s: %w", name, err)
		}
		s.pubs[name] = &publisher{name: name, p: p}
	case policy.PublisherManual:
		m, err := dnspub.NewManual(pc.Dir, logger)
		if err != nil {
			return fmt.Errorf("dns.publishers.%s: %w", name, err)
		}
		s.manuals[name] = m
		s.pubs[name] = &publisher{name: name, p: m, manual: m}
	default:
		return fmt.Errorf("dns.publishers.%s: unknown type %q", name, pc.Type)
	}
	return nil
}

// waitingStore bounds the wait for the state lock apart from the pass
// itself: a pass may take minutes (an RSA-4096 key in a slow token), the
// wait for another reconciler's pass should not; when it ends, the error
// names the holder.
type waitingStore struct {
	rotation.Store
	wait time.Duration
}

func (s *waitingStore) Lock(ctx context.Context) (func() error, error) {
	if s.wait <= 0 {
		return s.Store.Lock(ctx)
	}
	ctx, cancel := context.WithTimeout(ctx, s.wait)
	defer cancel()
	return s.Store.Lock(ctx)
}

// tokenKeys is the token as rotation's key store. It lists and hands out
// only the keys of the rotating domains, and destroys only what rotation
// asks for by (domain, selector) of such a domain: rotation destroys only
// keys it created, and this adapter adds no way around that (no
// destruction by pattern, none outside the rotating domains).
type tokenKeys struct {
	tok     *hsm.Token
	domains map[string]bool
}

var _ rotation.KeyStore = (*tokenKeys)(nil)

func (k *tokenKeys) managed(domain string) error {
	if k.tok == nil {
		return errors.New("dkimgw: the token is not open for this command")
	}
	if !k.domains[strings.TrimSuffix(strings.ToLower(domain), ".")] {
		return fmt.Errorf("dkimgw: domain %q has no rotation policy: its keys are not rotation's", domain)
	}
	return nil
}

func (k *tokenKeys) GenerateKey(ctx context.Context, domain, selector string, alg rotation.Algorithm) (crypto.Signer, error) {
	if err := k.managed(domain); err != nil {
		return nil, err
	}
	a, err := hsm.ParseAlgorithm(string(alg))
	if err != nil {
		return nil, err
	}
	return k.tok.GenerateKey(ctx, domain, selector, a)
}

func (k *tokenKeys) Keys(ctx context.Context) ([]rotation.KeyInfo, error) {
	if k.tok == nil {
		return nil, errors.New("dkimgw: the token is not open for this command")
	}
	infos, err := k.tok.Keys(ctx)
	if err != nil {
		return nil, err
	}
	var out []rotation.KeyInfo
	for _, i := range infos {
		if k.domains[i.Domain] {
			out = append(out, rotation.KeyInfo{Domain: i.Domain, Selector: i.Selector, Algorithm: rotation.Algorithm(i.Algorithm)})
		}
	}
	return out, nil
}

func (k *tokenKeys) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	if err := k.managed(domain); err != nil {
		return nil, err
	}
	return k.tok.Key(ctx, domain, selector)
}

func (k *tokenKeys) DestroyKey(ctx context.Context, domain, selector string) error {
	if err := k.managed(domain); err != nil {
		return err
	}
	return k.tok.DestroyKey(ctx, domain, selector)
}

// dnsPublisher is what dnspub's publishers have in common.
type dnsPublisher interface {
	GetRecords(ctx context.Context, zone string) ([]dnspub.Record, error)
	AppendRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
	SetRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
	DeleteRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
}

// publisher is a dnspub publisher as rotation's Publisher. A manual one
// first settles what the DNS admin has done (moves the changes DNS now
// shows out of the pending lists), so that `dns pending` stays short.
type publisher struct {
	name    string
	p       dnsPublisher
	manual  *dnspub.Manual
	checker *zoneCheckers
}

var _ rotation.Publisher = (*publisher)(nil)

func (p *publisher) GetRecords(ctx context.Context, zone string) ([]rotation.Record, error) {
	if p.manual != nil {
		if c, err := p.checker.forZone(zone); err == nil {
			// Settling is bookkeeping for the DNS admin's list; the
			// reconciler itself asks DNS. A failure here must not hold
			// back a pass.
			_, _ = p.manual.Settle(ctx, zone, c)
		}
	}
	recs, err := p.p.GetRecords(ctx, zone)
	if err != nil {
		return nil, err
	}
	out := make([]rotation.Record, len(recs))
	for i, r := range recs {
		out[i] = rotation.Record{Name: r.Name, TTL: r.TTL, Value: r.Value}
	}
	return out, nil
}

// SetRecords publishes a new key's record only where the name holds no
// TXT record (dnspub's AppendRecords: a record someone else put there is
// reported, never overwritten), and replaces whatever a name holds by
// the revoked form: a withdrawn key must be revoked even if its record
// was changed behind dkimgw's back.
func (p *publisher) SetRecords(ctx context.Context, zone string, recs []rotation.Record) error {
	var add, set []rotation.Record
	for _, r := range recs {
		if r.Value == rotation.RevokedRecord {
			set = append(set, r)
		} else {
			add = append(add, r)
		}
	}
	if len(add) > 0 {
		if _, err := p.p.AppendRecords(ctx, zone, toDNS(add, false)); err != nil {
			return err
		}
	}
	if len(set) > 0 {
		if _, err := p.p.SetRecords(ctx, zone, toDNS(set, false)); err != nil {
			return err
		}
	}
	return nil
}

// DeleteRecords deletes by name, as rotation means it: dnspub deletes
// every TXT record at a name when the value is "".
func (p *publisher) DeleteRecords(ctx context.Context, zone string, recs []rotation.Record) error {
	_, err := p.p.DeleteRecords(ctx, zone, toDNS(recs, true))
	return err
}

func toDNS(recs []rotation.Record, byName bool) []dnspub.Record {
	out := make([]dnspub.Record, len(recs))
	for i, r := range recs {
		out[i] = dnspub.Record{Name: r.Name, TTL: r.TTL, Value: r.Value}
		if byName {
			out[i].Value = ""
		}
	}
	return out
}

// zoneCheckers is dnspub's checker as rotation's Checker, one per zone:
// a zone's servers are dns.check_servers, or the NS records the zone's
// primary (dns.resolver, or the rfc2136 publisher's server) gives.
type zoneCheckers struct {
	byZone  map[string]*dnspub.Checker
	timeout time.Duration
}

var _ rotation.Checker = (*zoneCheckers)(nil)

func zoneKey(zone string) string { return strings.TrimSuffix(strings.ToLower(zone), ".") }

func (z *zoneCheckers) add(cfg *policy.Config, zone, pubName string) error {
	if z.byZone[zoneKey(zone)] != nil {
		return nil
	}
	opts := dnspub.CheckerOptions{Servers: cfg.DNS.CheckServers, Resolver: cfg.DNS.Resolver, Timeout: z.timeout}
	if len(opts.Servers) == 0 && opts.Resolver == "" {
		if pc := cfg.DNS.Publishers[pubName]; pc.Type == policy.PublisherRFC2136 {
			opts.Resolver = pc.Server
		}
	}
	c, err := dnspub.NewChecker(opts)
	if err != nil {
		return err
	}
	z.byZone[zoneKey(zone)] = c
	return nil
}

func (z *zoneCheckers) forZone(zone string) (*dnspub.Checker, error) {
	c := z.byZone[zoneKey(zone)]
	if c == nil {
		return nil, fmt.Errorf("dkimgw: no checker for zone %s", zone)
	}
	return c, nil
}

// Check reports each server and transport as its own server,
// "host:port/udp" and "host:port/tcp": a record must be served over both
// before resolvers can rely on it.
func (z *zoneCheckers) Check(ctx context.Context, zone, name string) (rotation.Observation, error) {
	c, err := z.forZone(zone)
	if err != nil {
		return rotation.Observation{}, err
	}
	rep, err := c.Check(ctx, zone, dnspub.Record{Name: name + "."})
	if err != nil {
		return rotation.Observation{}, err
	}
	var obs rotation.Observation
	for _, o := range rep.Observations {
		s := rotation.Served{Server: o.Server + "/" + o.Net, TTL: o.TTL}
		if o.State == dnspub.Failed {
			s.Err = o.Err
			if s.Err == nil {
				s.Err = errors.New("no usable answer")
			}
		} else {
			s.Values = slices.Clone(o.Served)
		}
		obs.Servers = append(obs.Servers, s)
	}
	if obs.NegativeTTL, err = c.NegativeTTL(ctx, zone); err != nil {
		return rotation.Observation{}, err
	}
	return obs, nil
}

// logEvents logs every rotation transition, emergencies at ERROR
// (auditEvents records them in the audit log too).
type logEvents struct{ log *slog.Logger }

var _ rotation.EventSink = (*logEvents)(nil)

func (l *logEvents) Event(ctx context.Context, e rotation.Event) {
	lvl := slog.LevelInfo
	if e.Emergency {
		lvl = slog.LevelError
	} else if e.From == e.To {
		lvl = slog.LevelWarn
	}
	l.log.Log(ctx, lvl, "rotation event", "domain", e.Domain, "selector", e.Selector, "algorithm", string(e.Algorithm),
		"from", string(e.From), "to", string(e.To), "emergency", e.Emergency, "what", e.Message)
}
