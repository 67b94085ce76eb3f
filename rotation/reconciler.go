package rotation

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"
)

// DefaultCallTimeout bounds each call to the key store, a publisher or the
// checker: generous, because an RSA-4096 key takes seconds to generate in
// some tokens and a DNS update may wait for a slow primary.
const DefaultCallTimeout = time.Minute

// Options configures New. Store, Keys, Publishers (one per name a policy
// uses) and Checker are required.
type Options struct {
	Store      Store
	Keys       KeyStore
	Publishers map[string]Publisher
	Checker    Checker
	// Events receives every transition. Nil: none.
	Events EventSink
	// Logger logs every transition. Nil: discard.
	Logger *slog.Logger
	// Now is the clock. Nil: time.Now.
	Now func() time.Time
	// CallTimeout bounds each key store, publisher and checker call.
	// Zero: DefaultCallTimeout.
	CallTimeout time.Duration
	// Policies are the managed domains, one policy each.
	Policies []Policy
	// AfterPass, when set, is called by Run after every pass (for
	// instance to switch the relay's keyring to the active keys).
	AfterPass func(Report, error)
	// PassTimeout bounds each pass of Run, so that one hung token or DNS
	// server cannot stop rotation for good. Zero: DefaultPassTimeout.
	PassTimeout time.Duration
}

// DefaultPassTimeout bounds a pass of Run: several calls of at most
// CallTimeout each per key, and room for a slow token.
const DefaultPassTimeout = 10 * time.Minute

// Reconciler drives each managed domain's keys through the lifecycle.
type Reconciler struct {
	store    Store
	keys     KeyStore
	pubs     map[string]Publisher
	checker  Checker
	events   EventSink
	log      *slog.Logger
	now      func() time.Time
	timeout  time.Duration
	policies []Policy
	after    func(Report, error)
	passMax  time.Duration
}

// New validates opts and returns a reconciler. It does no I/O.
func New(opts Options) (*Reconciler, error) {
	if opts.Store == nil || opts.Keys == nil || opts.Checker == nil {
		return nil, errors.New("rotation: a state store, a key store and a checker are required")
	}
	r := &Reconciler{
		store: opts.Store, keys: opts.Keys, pubs: opts.Publishers, checker: opts.Checker,
		events: opts.Events, log: opts.Logger, now: opts.Now, timeout: opts.CallTimeout,
		after: opts.AfterPass, passMax: opts.PassTimeout,
	}
	if r.passMax <= 0 {
		r.passMax = DefaultPassTimeout
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	r.log = r.log.With("component", "rotation")
	if r.now == nil {
		r.now = time.Now
	}
	if r.timeout <= 0 {
		r.timeout = DefaultCallTimeout
	}
	seen := map[string]bool{}
	for _, p := range opts.Policies {
		p = p.withDefaults()
		if err := p.validate(); err != nil {
			return nil, err
		}
		if seen[p.Domain] {
			return nil, fmt.Errorf("rotation: domain %q has two policies", p.Domain)
		}
		seen[p.Domain] = true
		if r.pubs[p.Publisher] == nil {
			return nil, fmt.Errorf("rotation: domain %q: no publisher named %q", p.Domain, p.Publisher)
		}
		r.policies = append(r.policies, p)
	}
	sort.Slice(r.policies, func(i, j int) bool { return r.policies[i].Domain < r.policies[j].Domain })
	return r, nil
}

// Action is one step a pass took (or, in a dry run, would take).
type Action struct {
	Domain    string
	Selector  string
	Algorithm Algorithm
	From, To  State
	What      string
	DryRun    bool
}

func (a Action) String() string {
	s := fmt.Sprintf("%s %s (%s): %s", a.Domain, a.Selector, a.Algorithm, a.What)
	if a.From != a.To {
		from := a.From
		if from == "" {
			from = "new"
		}
		s += fmt.Sprintf(" [%s -> %s]", from, a.To)
	}
	if a.DryRun {
		s = "would: " + s
	}
	return s
}

// ActiveKey is a key the relay may sign with.
type ActiveKey struct {
	Selector  string
	Algorithm Algorithm
}

// Report is what a pass did.
type Report struct {
	Actions []Action
	// Warnings are findings that need an operator: unknown keys, records
	// changed behind dkimgw's back, failed probes.
	Warnings []string
	// Active maps each managed domain to its active keys after the pass;
	// a domain with none must not be signed for (451 4.7.0).
	Active map[string][]ActiveKey
}

// PassOptions tunes one pass.
type PassOptions struct {
	// DryRun observes (key store, DNS) and reports what would be done,
	// writing nothing anywhere.
	DryRun bool
	// Domains limits the pass to these domains. Empty: every policy.
	Domains []string
}

// Reconcile runs one pass over every managed domain: each key takes at
// most its next lifecycle step. Errors of one domain do not stop the
// others; they are returned joined.
func (r *Reconciler) Reconcile(ctx context.Context) (Report, error) {
	return r.Pass(ctx, PassOptions{})
}

// Pass is Reconcile with options.
func (r *Reconciler) Pass(ctx context.Context, opts PassOptions) (Report, error) {
	pols, err := r.select_(opts.Domains)
	if err != nil {
		return Report{}, err
	}
	unlock, err := r.store.Lock(ctx)
	if err != nil {
		return Report{}, err
	}
	defer func() {
		if err := unlock(); err != nil {
			r.log.Error("releasing the state store lock", "err", err)
		}
	}()
	rep := Report{Active: map[string][]ActiveKey{}}
	// Read the key store once per pass: every domain's adoption and
	// selector choice works from the same listing.
	inStore, err := r.listKeys(ctx)
	if err != nil {
		return rep, err
	}
	var errs []error
	for _, p := range pols {
		if err := r.domainPass(ctx, p, inStore, opts.DryRun, &rep); err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.fillActive(ctx, pols, &rep); err != nil {
		errs = append(errs, err)
	}
	return rep, errors.Join(errs...)
}

func (r *Reconciler) select_(domains []string) ([]Policy, error) {
	if len(domains) == 0 {
		return r.policies, nil
	}
	var out []Policy
	for _, d := range domains {
		d = strings.TrimSuffix(strings.ToLower(d), ".")
		p, ok := r.policy(d)
		if !ok {
			return nil, fmt.Errorf("rotation: domain %q has no rotation policy", d)
		}
		out = append(out, p)
	}
	return out, nil
}

func (r *Reconciler) policy(domain string) (Policy, bool) {
	for _, p := range r.policies {
		if p.Domain == domain {
			return p, true
		}
	}
	return Policy{}, false
}

func (r *Reconciler) fillActive(ctx context.Context, pols []Policy, rep *Report) error {
	for _, p := range pols {
		keys, err := r.store.Keys(ctx, p.Domain)
		if err != nil {
			return err
		}
		rep.Active[p.Domain] = activeOf(keys)
	}
	return nil
}

func activeOf(keys []Key) []ActiveKey {
	act := []ActiveKey{}
	for _, k := range keys {
		if k.State == StateActive {
			act = append(act, ActiveKey{Selector: k.Selector, Algorithm: k.Algorithm})
		}
	}
	return act
}

// Active returns the active keys of every managed domain, for the relay's
// keyring. A domain with an empty list has no key DNS serves yet.
func (r *Reconciler) Active(ctx context.Context) (map[string][]ActiveKey, error) {
	out := map[string][]ActiveKey{}
	for _, p := range r.policies {
		keys, err := r.store.Keys(ctx, p.Domain)
		if err != nil {
			return nil, err
		}
		out[p.Domain] = activeOf(keys)
	}
	return out, nil
}

func (r *Reconciler) listKeys(ctx context.Context) ([]KeyInfo, error) {
	cctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	ks, err := r.keys.Keys(cctx)
	if err != nil {
		return nil, fmt.Errorf("rotation: list the key store's keys: %w", err)
	}
	return ks, nil
}

// pass is one domain's pass: its state, the key store's keys and what the
// steps need.
type pass struct {
	r       *Reconciler
	p       Policy
	dry     bool
	rep     *Report
	now     time.Time
	inStore map[string]KeyInfo // selector -> key, this domain's
	stepped map[string]bool
	// dryAdopted are the algorithms a dry run would adopt a key for, so
	// that it does not also report a new key for them.
	dryAdopted map[Algorithm]bool
}

func (r *Reconciler) domainPass(ctx context.Context, p Policy, all []KeyInfo, dry bool, rep *Report) error {
	ps := &pass{r: r, p: p, dry: dry, rep: rep, now: r.now(), inStore: map[string]KeyInfo{}, stepped: map[string]bool{}, dryAdopted: map[Algorithm]bool{}}
	for _, k := range all {
		if strings.EqualFold(strings.TrimSuffix(k.Domain, "."), p.Domain) {
			ps.inStore[strings.ToLower(k.Selector)] = k
		}
	}
	keys, err := r.store.Keys(ctx, p.Domain)
	if err != nil {
		return err
	}
	// Certmagic's rule: the lock is held, so what is read now is what
	// the work is decided on; a pass that lost a race before the lock
	// sees the other's result here and does nothing twice.
	if err := ps.adopt(ctx, keys); err != nil {
		return err
	}
	if keys, err = r.store.Keys(ctx, p.Domain); err != nil {
		return err
	}
	if err := ps.schedule(ctx, keys); err != nil {
		return err
	}
	if keys, err = r.store.Keys(ctx, p.Domain); err != nil {
		return err
	}
	var errs []error
	for _, k := range keys {
		if k.State.candidate() {
			ps.stepped[k.Selector] = true
			if err := ps.step(ctx, k, keys); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// Read again: an activation just retired a key, and a compromised
	// one is revoked in this same pass.
	if keys, err = r.store.Keys(ctx, p.Domain); err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, k := range keys {
		if !ps.stepped[k.Selector] && (k.State == StateRetired || k.State == StateRevoked || k.State == StateActive) {
			if err := ps.step(ctx, k, keys); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// adopt records keys of the domain that the key store holds and the state
// does not know: a key generated by hand, or a state store that was lost.
// Only keys of an algorithm the policy lists are adopted, and only when no
// other key of that algorithm is on its way in; the others are reported.
// Adopted keys are never destroyed.
func (ps *pass) adopt(ctx context.Context, keys []Key) error {
	known := map[string]bool{}
	inflight := map[Algorithm]bool{}
	for _, k := range keys {
		known[k.Selector] = true
		if k.State.candidate() {
			inflight[k.Algorithm] = true
		}
	}
	sels := make([]string, 0, len(ps.inStore))
	for s := range ps.inStore {
		sels = append(sels, s)
	}
	sort.Strings(sels)
	for _, sel := range sels {
		if known[sel] {
			continue
		}
		ki := ps.inStore[sel]
		switch {
		case !ps.p.hasAlgorithm(ki.Algorithm):
			ps.warn(ctx, sel, ki.Algorithm, fmt.Sprintf("unknown key %s in the key store is %s, which the policy does not list: not adopted (dkimgw never destroys it)", ps.p.recordName(sel), ki.Algorithm))
			continue
		case checkLabel(sel) != nil:
			ps.warn(ctx, sel, ki.Algorithm, fmt.Sprintf("unknown key %s in the key store has a selector that is not one DNS label: not adopted", ps.p.recordName(sel)))
			continue
		case inflight[ki.Algorithm]:
			ps.warn(ctx, sel, ki.Algorithm, fmt.Sprintf("unknown key %s in the key store: not adopted while another %s key is on its way in", ps.p.recordName(sel), ki.Algorithm))
			continue
		}
		if ps.dry {
			ps.act(Action{Selector: sel, Algorithm: ki.Algorithm, To: StateGenerated, What: "adopt unknown key from the key store"})
			inflight[ki.Algorithm] = true
			ps.dryAdopted[ki.Algorithm] = true
			continue
		}
		key, err := ps.key(ctx, sel)
		if err != nil {
			return err
		}
		rec, err := recordValue(key.Public())
		if err != nil {
			return err
		}
		k := Key{Domain: ps.p.Domain, Selector: sel, Algorithm: ki.Algorithm, State: StateGenerated,
			Record: rec, CreatedAt: ps.now, Since: ps.now, Note: "adopted from the key store"}
		if err := ps.r.store.Update(ctx, Change{Prev: 0, Key: k}); err != nil {
			return err
		}
		inflight[ki.Algorithm] = true
		ps.transition(ctx, k, "", "adopted unknown key from the key store", false)
	}
	return nil
}

// schedule starts a new key for each algorithm that needs one: none is
// active, or the active one is due for replacement, and none is on its
// way in.
func (ps *pass) schedule(ctx context.Context, keys []Key) error {
	used := map[string]bool{}
	for _, k := range keys {
		used[k.Selector] = true
	}
	for s := range ps.inStore {
		used[s] = true
	}
	for _, alg := range ps.p.Algorithms {
		var active *Key
		inflight := false
		for i, k := range keys {
			if k.Algorithm != alg {
				continue
			}
			if k.State == StateActive {
				active = &keys[i]
			}
			if k.State.candidate() {
				inflight = true
			}
		}
		if inflight || ps.dryAdopted[alg] {
			continue
		}
		why := ""
		switch {
		case active == nil:
			why = "no active key: start one"
		case active.Compromised:
			why = "active key is compromised: start its replacement"
		case !ps.now.Before(successorDue(ps.p, *active)):
			why = fmt.Sprintf("active key %s is due for replacement", active.Selector)
		default:
			continue
		}
		sel, err := newSelector(ps.p.SelectorTemplate, alg, ps.now, used)
		if err != nil {
			return fmt.Errorf("rotation: domain %s: %w", ps.p.Domain, err)
		}
		used[sel] = true
		if ps.dry {
			ps.act(Action{Selector: sel, Algorithm: alg, To: StatePlanned, What: why})
			continue
		}
		k := Key{Domain: ps.p.Domain, Selector: sel, Algorithm: alg, State: StatePlanned, Created: true,
			CreatedAt: ps.now, Since: ps.now}
		if err := ps.r.store.Update(ctx, Change{Key: k}); err != nil {
			return err
		}
		ps.transition(ctx, k, "", why, false)
	}
	return nil
}

// successorDue is when the successor of active should be started: at
// interval after activation, less the time active itself took from being
// planned to becoming active (generation, publication, propagation), so
// that the successor is active about interval after active was. The lead
// is capped at half the interval, so that one slow publication (a DNS
// admin on holiday) does not make rotation continuous.
func successorDue(p Policy, active Key) time.Time {
	lead := active.ActivatedAt.Sub(active.CreatedAt)
	lead = max(0, min(lead, p.Interval/2))
	return active.ActivatedAt.Add(p.Interval - lead)
}

func (ps *pass) key(ctx context.Context, sel string) (crypto.Signer, error) {
	cctx, cancel := context.WithTimeout(ctx, ps.r.timeout)
	defer cancel()
	k, err := ps.r.keys.Key(cctx, ps.p.Domain, sel)
	if err != nil {
		return nil, fmt.Errorf("rotation: key %s from the key store: %w", ps.p.recordName(sel), err)
	}
	return k, nil
}

func (ps *pass) act(a Action) {
	a.Domain = ps.p.Domain
	a.DryRun = ps.dry
	ps.rep.Actions = append(ps.rep.Actions, a)
}

// transition records a done step: report, event, log.
func (ps *pass) transition(ctx context.Context, k Key, from State, what string, loud bool) {
	ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: from, To: k.State, What: what})
	ps.r.emit(ctx, k, from, what, loud)
}

func (r *Reconciler) emit(ctx context.Context, k Key, from State, what string, loud bool) {
	lvl := slog.LevelInfo
	if loud || k.Compromised {
		lvl = slog.LevelWarn
	}
	r.log.Log(ctx, lvl, "key state changed", "domain", k.Domain, "selector", k.Selector,
		"algorithm", string(k.Algorithm), "from", string(from), "to", string(k.State), "what", what)
	if r.events != nil {
		r.events.Event(ctx, Event{Time: r.now(), Domain: k.Domain, Selector: k.Selector, Algorithm: k.Algorithm,
			From: from, To: k.State, Emergency: k.Compromised, Message: what})
	}
}

// warn reports a finding that needs an operator, without a transition.
func (ps *pass) warn(ctx context.Context, sel string, alg Algorithm, msg string) {
	ps.rep.Warnings = append(ps.rep.Warnings, ps.p.Domain+": "+msg)
	ps.r.log.Warn("rotation needs attention", "domain", ps.p.Domain, "selector", sel, "algorithm", string(alg), "finding", msg)
	if ps.r.events != nil && !ps.dry {
		ps.r.events.Event(ctx, Event{Time: ps.now, Domain: ps.p.Domain, Selector: sel, Algorithm: alg, Message: msg})
	}
}
