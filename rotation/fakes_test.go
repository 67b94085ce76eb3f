package rotation

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// clock is a fake clock the tests advance by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// errFault is what an injected fault returns.
var errFault = errors.New("injected fault")

// faults counts the fault points the fakes pass (before and after each
// side effect, before each store write) and fails the one numbered at.
type faults struct {
	mu    sync.Mutex
	n     int
	at    int // 0: never
	fired string
}

func (f *faults) point(name string) error {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	if f.n == f.at {
		f.fired = name
		return fmt.Errorf("%s: %w", name, errFault)
	}
	return nil
}

// rsaPool hands out pre-generated RSA keys: generating 2048-bit keys for
// every fault-injection run would make the suite slow, and a fake key
// store needs real keys, not unique ones.
var rsaPool = sync.OnceValue(func() []*rsa.PrivateKey {
	var ks []*rsa.PrivateKey
	for range 6 {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		ks = append(ks, k)
	}
	return ks
})

type fakeKey struct {
	alg    Algorithm
	signer crypto.Signer
}

// fakeKeyStore is an in-memory key store with real crypto.Signers.
type fakeKeyStore struct {
	mu        sync.Mutex
	keys      map[string]fakeKey // "domain/selector"
	next      int
	faults    *faults
	generated map[string]int // successful generations per label
	destroyed map[string]int
	panicKeys bool
	// hangKeys makes the next Keys wait for its context to end, as a
	// hung token would (the adapter's calls honour ctx).
	hangKeys bool
	// requireLock, when set, fails Keys unless it reports true: the
	// reconciler must read the key store under the state store's lock.
	requireLock func() bool
}

func newFakeKeyStore(f *faults) *fakeKeyStore {
	return &fakeKeyStore{keys: map[string]fakeKey{}, faults: f, generated: map[string]int{}, destroyed: map[string]int{}}
}

func (s *fakeKeyStore) newSigner(alg Algorithm) crypto.Signer {
	if alg == Ed25519 {
		_, k, _ := ed25519.GenerateKey(rand.Reader)
		return k
	}
	pool := rsaPool()
	s.next++
	return pool[s.next%len(pool)]
}

func (s *fakeKeyStore) GenerateKey(ctx context.Context, domain, selector string, alg Algorithm) (crypto.Signer, error) {
	if err := s.faults.point("generate " + selector + " before"); err != nil {
		return nil, err
	}
	s.mu.Lock()
	id := domain + "/" + selector
	if _, ok := s.keys[id]; ok {
		s.mu.Unlock()
		return nil, fmt.Errorf("the key store already holds %s", id)
	}
	k := fakeKey{alg: alg, signer: s.newSigner(alg)}
	s.keys[id] = k
	s.generated[id]++
	s.mu.Unlock()
	if err := s.faults.point("generate " + selector + " after"); err != nil {
		return nil, err
	}
	return k.signer, nil
}

// add puts a key in the store as an operator would, by hand.
func (s *fakeKeyStore) add(domain, selector string, alg Algorithm) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys[domain+"/"+selector] = fakeKey{alg: alg, signer: s.newSigner(alg)}
}

// replace swaps the key under a label for another one.
func (s *fakeKeyStore) replace(domain, selector string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[domain+"/"+selector]
	k.signer = s.newSigner(k.alg)
	if k.alg != Ed25519 {
		k.signer = s.newSigner(k.alg) // the pool cycles: skip the neighbour
	}
	s.keys[domain+"/"+selector] = k
}

func (s *fakeKeyStore) Keys(ctx context.Context) ([]KeyInfo, error) {
	s.mu.Lock()
	if s.hangKeys {
		s.hangKeys = false
		s.mu.Unlock()
		<-ctx.Done()
		return nil, ctx.Err()
	}
	defer s.mu.Unlock()
	if s.panicKeys {
		s.panicKeys = false
		panic("fake key store panics once")
	}
	if s.requireLock != nil && !s.requireLock() {
		return nil, errors.New("key store read without the state store lock")
	}
	var out []KeyInfo
	for id, k := range s.keys {
		d, sel, _ := strings.Cut(id, "/")
		out = append(out, KeyInfo{Domain: d, Selector: sel, Algorithm: k.alg})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Selector < out[j].Selector })
	return out, nil
}

func (s *fakeKeyStore) Key(ctx context.Context, domain, selector string) (crypto.Signer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.keys[domain+"/"+selector]
	if !ok {
		return nil, fmt.Errorf("no key %s/%s", domain, selector)
	}
	return k.signer, nil
}

func (s *fakeKeyStore) DestroyKey(ctx context.Context, domain, selector string) error {
	if err := s.faults.point("destroy " + selector + " before"); err != nil {
		return err
	}
	s.mu.Lock()
	id := domain + "/" + selector
	if _, ok := s.keys[id]; !ok {
		s.mu.Unlock()
		return fmt.Errorf("no key %s", id)
	}
	delete(s.keys, id)
	s.destroyed[id]++
	s.mu.Unlock()
	return s.faults.point("destroy " + selector + " after")
}

func (s *fakeKeyStore) labels() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for id := range s.keys {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// fakeDNS is a zone's primary (what the publisher changes) and its
// authoritative servers, each of which copies the primary lag after a
// change, and may be made to serve something else.
type fakeDNS struct {
	mu       sync.Mutex
	clock    *clock
	zone     string
	primary  map[string]Record // relative name -> record
	changed  time.Time
	servers  []*fakeServer
	negTTL   time.Duration
	faults   *faults
	sets     map[string]int // "name=value" -> successful sets
	deletes  map[string]int
	checkErr error
	// afterSet runs after each successful SetRecords, with the lock
	// released: a test ends a pass there, as a shutdown would.
	afterSet func()
}

type fakeServer struct {
	name     string
	lag      time.Duration
	data     map[string]Record
	override map[string][]string // relative name -> values served instead
}

func newFakeDNS(c *clock, zone string, f *faults, lags ...time.Duration) *fakeDNS {
	d := &fakeDNS{clock: c, zone: zone, primary: map[string]Record{}, negTTL: 5 * time.Minute, faults: f,
		sets: map[string]int{}, deletes: map[string]int{}}
	if len(lags) == 0 {
		lags = []time.Duration{0, 0}
	}
	for i, l := range lags {
		d.servers = append(d.servers, &fakeServer{name: fmt.Sprintf("ns%d", i+1), lag: l, data: map[string]Record{}, override: map[string][]string{}})
	}
	return d
}

func (d *fakeDNS) checkZone(zone string) error {
	if zone != d.zone+"." {
		return fmt.Errorf("fake DNS serves zone %s., not %s", d.zone, zone)
	}
	return nil
}

func (d *fakeDNS) GetRecords(ctx context.Context, zone string) ([]Record, error) {
	if err := d.checkZone(zone); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Record
	for _, r := range d.primary {
		out = append(out, r)
	}
	return out, nil
}

func (d *fakeDNS) SetRecords(ctx context.Context, zone string, recs []Record) error {
	if err := d.checkZone(zone); err != nil {
		return err
	}
	if err := d.faults.point("set " + recs[0].Name + " before"); err != nil {
		return err
	}
	d.mu.Lock()
	for _, r := range recs {
		d.primary[r.Name] = r
		d.sets[r.Name+"="+r.Value]++
	}
	d.changed = d.clock.Now()
	after := d.afterSet
	d.mu.Unlock()
	if after != nil {
		after()
	}
	return d.faults.point("set " + recs[0].Name + " after")
}

func (d *fakeDNS) DeleteRecords(ctx context.Context, zone string, recs []Record) error {
	if err := d.checkZone(zone); err != nil {
		return err
	}
	if err := d.faults.point("delete " + recs[0].Name + " before"); err != nil {
		return err
	}
	d.mu.Lock()
	for _, r := range recs {
		delete(d.primary, r.Name)
		d.deletes[r.Name]++
	}
	d.changed = d.clock.Now()
	d.mu.Unlock()
	return d.faults.point("delete " + recs[0].Name + " after")
}

// sync lets each server catch up with the primary once its lag has passed.
func (d *fakeDNS) syncLocked() {
	now := d.clock.Now()
	for _, s := range d.servers {
		if !now.Before(d.changed.Add(s.lag)) {
			s.data = map[string]Record{}
			for n, r := range d.primary {
				s.data[n] = r
			}
		}
	}
}

func (d *fakeDNS) rel(name string) string {
	return strings.TrimSuffix(strings.TrimSuffix(name, d.zone), ".")
}

func (d *fakeDNS) Check(ctx context.Context, zone, name string) (Observation, error) {
	if err := d.checkZone(zone); err != nil {
		return Observation{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.checkErr != nil {
		return Observation{}, d.checkErr
	}
	d.syncLocked()
	obs := Observation{NegativeTTL: d.negTTL}
	rel := d.rel(name)
	for _, s := range d.servers {
		sv := Served{Server: s.name}
		if o, ok := s.override[rel]; ok {
			sv.Values, sv.TTL = o, time.Hour
		} else if r, ok := s.data[rel]; ok {
			sv.Values, sv.TTL = []string{r.Value}, r.TTL
		}
		obs.Servers = append(obs.Servers, sv)
	}
	return obs, nil
}

// servedEverywhere returns the value every server serves for the fully
// qualified name, or "" when they do not all serve one and the same.
func (d *fakeDNS) servedEverywhere(name string) string {
	obs, _ := d.Check(context.Background(), d.zone+".", name)
	v := ""
	for i, s := range obs.Servers {
		if len(s.Values) != 1 || (i > 0 && s.Values[0] != v) {
			return ""
		}
		v = s.Values[0]
	}
	return v
}

func (d *fakeDNS) names() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]string{}
	for n, r := range d.primary {
		out[n] = r.Value
	}
	return out
}

// sink collects events.
type sink struct {
	mu     sync.Mutex
	events []Event
}

func (s *sink) Event(ctx context.Context, e Event) {
	s.mu.Lock()
	s.events = append(s.events, e)
	s.mu.Unlock()
}

func (s *sink) all() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Event(nil), s.events...)
}

// faultyStore injects faults before and after each Update of a real store.
type faultyStore struct {
	Store
	faults *faults
}

func (s faultyStore) Update(ctx context.Context, changes ...Change) error {
	if err := s.faults.point("store update before"); err != nil {
		return err
	}
	// A store over the network (etcd) fails once ctx is done; bbolt
	// would not notice.
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.Store.Update(ctx, changes...); err != nil {
		return err
	}
	return s.faults.point("store update after")
}
