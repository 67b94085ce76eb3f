package rotation

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"time"
)

// emergencyPasses bounds the passes Emergency runs at once: enough for
// planned -> generated -> published and for revoking retired keys; the
// rest waits for DNS.
const emergencyPasses = 4

// Emergency starts an emergency rotation of domain after a suspected key
// compromise. In one transaction it marks every key of the domain that
// is not yet revoked as compromised, retires the active keys (they stop
// signing at once: a key that may be in someone else's hands must not
// sign one more message), withdraws the keys on their way in (retired,
// never having signed) and plans a new key per algorithm; then it runs
// passes at once, so that every compromised selector's record is
// replaced by the revoked form now, without grace, and the new keys are
// generated and published now. They become active as soon as DNS serves
// them (the usual visibility rule); until then the domain has no active
// key and its mail gets 451 4.7.0 (or goes unsigned where the relay's
// policy says so), as for a domain's very first key.
//
// Each call is a new emergency rotation (the replacements of an earlier
// one are treated as compromised too). After an interruption, ordinary
// passes finish the one recorded: its intent is in the store.
func (r *Reconciler) Emergency(ctx context.Context, domain string) (Report, error) {
	domain = strings.TrimSuffix(strings.ToLower(domain), ".")
	p, ok := r.policy(domain)
	if !ok {
		return Report{}, fmt.Errorf("rotation: domain %q has no rotation policy", domain)
	}
	unlock, err := r.store.Lock(ctx)
	if err != nil {
		return Report{}, err
	}
	keys, err := r.store.Keys(ctx, domain)
	if err != nil {
		_ = unlock()
		return Report{}, err
	}
	now := r.now()
	r.log.Error("EMERGENCY key rotation: every key of the domain is treated as compromised; its active keys stop signing now and the domain's mail is deferred (451) until the new keys are visible in DNS", "domain", domain)
	var changes []Change
	var marked []Key
	var froms []State
	used := map[string]bool{}
	for _, k := range keys {
		used[k.Selector] = true
		if k.State == StateRevoked || k.State == StateDestroyed || k.Compromised {
			continue
		}
		from := k.State
		k.Compromised = true
		k.Note = "compromised: emergency rotation"
		if k.State.candidate() || k.State == StateActive {
			k.State, k.RetiredAt, k.Since = StateRetired, now, now
		}
		changes = append(changes, Change{Prev: k.Rev, Key: k})
		marked, froms = append(marked, k), append(froms, from)
	}
	inStore, err := r.listKeys(ctx)
	if err != nil {
		_ = unlock()
		return Report{}, err
	}
	for _, ki := range inStore {
		if strings.EqualFold(ki.Domain, domain) {
			used[strings.ToLower(ki.Selector)] = true
		}
	}
	var planned []Key
	for _, alg := range p.Algorithms {
		sel, err := newSelector(p.SelectorTemplate, alg, now, used)
		if err != nil {
			_ = unlock()
			return Report{}, err
		}
		used[sel] = true
		k := Key{Domain: domain, Selector: sel, Algorithm: alg, State: StatePlanned, Created: true,
			CreatedAt: now, Since: now, Note: "emergency replacement"}
		changes = append(changes, Change{Key: k})
		planned = append(planned, k)
	}
	if err := r.store.Update(ctx, changes...); err != nil {
		_ = unlock()
		return Report{}, err
	}
	rep := Report{Active: map[string][]ActiveKey{}}
	for i, k := range marked {
		what := "marked compromised (emergency rotation)"
		switch {
		case froms[i] == StateActive:
			what = "compromised: stopped signing at once; its record is revoked now, without grace (emergency rotation)"
		case froms[i] != k.State:
			what = "withdrawn before use (emergency rotation)"
		}
		rep.Actions = append(rep.Actions, Action{Domain: domain, Selector: k.Selector, Algorithm: k.Algorithm, From: froms[i], To: k.State, What: what})
		r.emit(ctx, k, froms[i], what, true)
	}
	for _, k := range planned {
		k.Compromised = false
		rep.Actions = append(rep.Actions, Action{Domain: domain, Selector: k.Selector, Algorithm: k.Algorithm, To: StatePlanned, What: "emergency replacement"})
		r.emitEmergency(ctx, k, "emergency replacement planned")
	}
	if err := unlock(); err != nil {
		r.log.Error("releasing the state store lock", "err", err)
	}
	var errs []error
	for range emergencyPasses {
		sub, err := r.Pass(ctx, PassOptions{Domains: []string{domain}})
		rep.Actions = append(rep.Actions, sub.Actions...)
		rep.Warnings = append(rep.Warnings, sub.Warnings...)
		rep.Active = sub.Active
		if err != nil {
			errs = append(errs, err)
			break
		}
		if len(sub.Actions) == 0 {
			break
		}
	}
	return rep, errors.Join(errs...)
}

func (r *Reconciler) emitEmergency(ctx context.Context, k Key, what string) {
	r.log.Warn("key state changed", "domain", k.Domain, "selector", k.Selector, "algorithm", string(k.Algorithm),
		"to", string(k.State), "what", what, "emergency", true)
	if r.events != nil {
		r.events.Event(ctx, Event{Time: r.now(), Domain: k.Domain, Selector: k.Selector, Algorithm: k.Algorithm,
			To: k.State, Emergency: true, Message: what})
	}
}

// Status is one managed key as `rotate status` shows it.
type Status struct {
	Key
	// Next is the key's next step, and When when it is due (zero: at the
	// next pass, or when DNS shows the record; see Next).
	Next string    `json:"next,omitempty"`
	When time.Time `json:"when,omitzero"`
}

// Status lists every key of every managed domain, tombstones included.
func (r *Reconciler) Status(ctx context.Context) ([]Status, error) {
	var out []Status
	for _, p := range r.policies {
		keys, err := r.store.Keys(ctx, p.Domain)
		if err != nil {
			return nil, err
		}
		for _, k := range keys {
			next, when := nextStep(p, k, keys)
			out = append(out, Status{Key: k, Next: next, When: when})
		}
	}
	return out, nil
}

func nextStep(p Policy, k Key, keys []Key) (string, time.Time) {
	switch k.State {
	case StatePlanned:
		return "generate in the key store", time.Time{}
	case StateGenerated:
		return "publish the record", time.Time{}
	case StatePublished:
		if k.SeenEverywhere.IsZero() {
			return "wait until every authoritative server serves the record", time.Time{}
		}
		return "visible", k.SeenEverywhere.Add(k.Wait)
	case StateVisible:
		return "probe and activate", time.Time{}
	case StateActive:
		for _, o := range keys {
			if o.Algorithm == k.Algorithm && o.State.candidate() {
				return "retire when " + o.Selector + " is active", time.Time{}
			}
		}
		return "start the successor", successorDue(p, k)
	case StateRetired:
		if k.Compromised {
			return "revoke", k.RetiredAt
		}
		return "revoke", k.RetiredAt.Add(p.Grace)
	case StateRevoked:
		return "delete the record and destroy the key", k.RevokedAt.Add(p.RevokeFor)
	}
	return "", time.Time{}
}

// Run calls Reconcile at once and then every period until ctx ends,
// like certmagic's maintenance loop, each pass bounded by
// Options.PassTimeout. A pass that panics is logged with
// its stack and the loop goes on: one bad domain or driver must not stop
// rotation (or the process) for the others.
func (r *Reconciler) Run(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		rep, err := r.safePass(ctx)
		if err != nil && ctx.Err() == nil {
			r.log.Error("rotation pass failed", "err", err)
		}
		if r.after != nil {
			r.after(rep, err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (r *Reconciler) safePass(ctx context.Context) (rep Report, err error) {
	ctx, cancel := context.WithTimeout(ctx, r.passMax)
	defer cancel()
	defer func() {
		if v := recover(); v != nil {
			r.log.Error("rotation pass panicked", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			err = fmt.Errorf("rotation: pass panicked: %v", v)
		}
	}()
	return r.Reconcile(ctx)
}
