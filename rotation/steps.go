package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// step takes k's next lifecycle step, if its time has come. keys is the
// domain's state as read for this phase of the pass.
//
// Every step has the same shape: observe, do the side effect only if the
// observation shows it is not done yet, then record the new state with a
// compare-and-set on the revision read. A crash after the side effect
// and before the record leaves the old state, and the next pass's
// observation finds the effect done and only records it.
func (ps *pass) step(ctx context.Context, k Key, keys []Key) error {
	var err error
	switch k.State {
	case StatePlanned:
		err = ps.generate(ctx, k)
	case StateGenerated:
		err = ps.publish(ctx, k)
	case StatePublished:
		err = ps.await(ctx, k)
	case StateVisible:
		err = ps.activate(ctx, k, keys)
	case StateActive:
		err = ps.watch(ctx, k, keys)
	case StateRetired:
		err = ps.revoke(ctx, k)
	case StateRevoked:
		err = ps.destroy(ctx, k)
	}
	if err != nil {
		return fmt.Errorf("rotation: %s %s (%s): %w", k.State, ps.p.recordName(k.Selector), k.Algorithm, stripPrefix(err))
	}
	return nil
}

// stripPrefix keeps one "rotation: " per message.
func stripPrefix(err error) error {
	if s, ok := strings.CutPrefix(err.Error(), "rotation: "); ok {
		return prefixless{s, err}
	}
	return err
}

type prefixless struct {
	msg string
	err error
}

func (p prefixless) Error() string { return p.msg }
func (p prefixless) Unwrap() error { return p.err }

// save records k (read at revision k.Rev) in its new state. What it
// records has already been done (a record set, a key generated or
// destroyed), so it is written even when ctx ends meanwhile (serve
// shutting down, leadership lost), within one call timeout: otherwise
// the state would lag what DNS serves until another pass. A stale write
// is still refused by the compare-and-set on k.Rev.
func (ps *pass) save(ctx context.Context, k Key, from State, what string) error {
	ctx, cancel := ps.call(context.WithoutCancel(ctx))
	defer cancel()
	prev := k.Rev
	if k.State != from {
		k.Since = ps.now
	}
	if err := ps.r.store.Update(ctx, Change{Prev: prev, Key: k}); err != nil {
		return err
	}
	k.Rev = prev + 1
	if k.State != from {
		ps.transition(ctx, k, from, what, false)
	}
	return nil
}

func (ps *pass) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, ps.r.timeout)
}

// generate: planned -> generated. The selector was reserved in the state
// before anything was generated, so a key under it in the key store is
// ours: a crash between generating and recording is repaired by finding
// the key, never by generating a second one.
func (ps *pass) generate(ctx context.Context, k Key) error {
	if ps.dry {
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateGenerated, What: "generate the key in the key store"})
		return nil
	}
	what := "generated the key in the key store"
	var pub any
	if _, ok := ps.inStore[k.Selector]; ok {
		key, err := ps.key(ctx, k.Selector)
		if err != nil {
			return err
		}
		pub = key.Public()
		what = "found the key generated before an interruption"
	} else {
		cctx, cancel := ps.call(ctx)
		key, err := ps.r.keys.GenerateKey(cctx, ps.p.Domain, k.Selector, k.Algorithm)
		cancel()
		if err != nil {
			return fmt.Errorf("generate the key: %w", err)
		}
		pub = key.Public()
	}
	rec, err := recordValue(pub)
	if err != nil {
		return err
	}
	k.Record = rec
	k.State = StateGenerated
	k.Note = ""
	return ps.save(ctx, k, StatePlanned, what)
}

// published returns the values the publisher holds for name (relative
// to the zone).
func (ps *pass) published(ctx context.Context, name string) ([]string, error) {
	cctx, cancel := ps.call(ctx)
	defer cancel()
	recs, err := ps.r.pubs[ps.p.Publisher].GetRecords(cctx, ps.p.zoneFQDN())
	if err != nil {
		return nil, fmt.Errorf("read the records of zone %s from publisher %q: %w", ps.p.zoneFQDN(), ps.p.Publisher, err)
	}
	var vals []string
	for _, r := range recs {
		if strings.EqualFold(strings.TrimSuffix(r.Name, "."), name) {
			vals = append(vals, r.Value)
		}
	}
	return vals, nil
}

// setRecord makes the publisher hold exactly value at the key's name,
// unless it already does (so a repeated step changes nothing).
func (ps *pass) setRecord(ctx context.Context, sel, value string) (changed bool, err error) {
	name := ps.p.relName(sel)
	have, err := ps.published(ctx, name)
	if err != nil {
		return false, err
	}
	if len(have) == 1 && have[0] == value {
		return false, nil
	}
	cctx, cancel := ps.call(ctx)
	defer cancel()
	err = ps.r.pubs[ps.p.Publisher].SetRecords(cctx, ps.p.zoneFQDN(), []Record{{Name: name, TTL: ps.p.TTL, Value: value}})
	if err != nil {
		return false, fmt.Errorf("publish %s in zone %s with publisher %q: %w", ps.p.recordName(sel), ps.p.zoneFQDN(), ps.p.Publisher, err)
	}
	return true, nil
}

// publish: generated -> published.
func (ps *pass) publish(ctx context.Context, k Key) error {
	if ps.dry {
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StatePublished, What: "publish the key record"})
		return nil
	}
	if k.Record == "" {
		// An adopted key recorded by an older version, or a damaged
		// record: render it again from the key store.
		key, err := ps.key(ctx, k.Selector)
		if err != nil {
			return err
		}
		if k.Record, err = recordValue(key.Public()); err != nil {
			return err
		}
	}
	changed, err := ps.setRecord(ctx, k.Selector, k.Record)
	if err != nil {
		return err
	}
	what := "published the key record"
	if !changed {
		what = "found the key record already published"
	}
	k.State, k.SeenEverywhere, k.Note = StatePublished, time.Time{}, ""
	return ps.save(ctx, k, StateGenerated, what)
}

// exact reports whether every authoritative server serves exactly want
// (one TXT record, that value), and if not, why not. It also returns the
// largest TTL seen (the answers' and the zone's negative TTL).
func (ps *pass) exact(ctx context.Context, sel, want string) (ok bool, why string, wait time.Duration, err error) {
	cctx, cancel := ps.call(ctx)
	defer cancel()
	obs, err := ps.r.checker.Check(cctx, ps.p.zoneFQDN(), ps.p.recordName(sel))
	if err != nil {
		return false, "", 0, fmt.Errorf("check what the servers of zone %s serve: %w", ps.p.zoneFQDN(), err)
	}
	if len(obs.Servers) == 0 {
		return false, "the checker found no authoritative server", 0, nil
	}
	wait = max(ps.p.TTL, obs.NegativeTTL)
	var bad []string
	for _, s := range obs.Servers {
		wait = max(wait, s.TTL)
		switch {
		case s.Err != nil:
			bad = append(bad, fmt.Sprintf("%s: %v", s.Server, s.Err))
		case len(s.Values) == 0:
			bad = append(bad, s.Server+": absent")
		case len(s.Values) > 1:
			bad = append(bad, fmt.Sprintf("%s: %d TXT records", s.Server, len(s.Values)))
		case s.Values[0] != want:
			bad = append(bad, fmt.Sprintf("%s: different (%.40q...)", s.Server, s.Values[0]))
		}
	}
	if len(bad) > 0 {
		return false, strings.Join(bad, "; "), wait, nil
	}
	return true, "", wait, nil
}

// await: published -> visible, once every authoritative server has
// served exactly the record for the longest of the record's TTL and the
// zone's negative TTL: by then no resolver can still hold "no such name"
// from before, nor another value.
func (ps *pass) await(ctx context.Context, k Key) error {
	ok, why, wait, err := ps.exact(ctx, k.Selector, k.Record)
	if err != nil {
		return err
	}
	if !ok {
		if !k.SeenEverywhere.IsZero() {
			ps.warn(ctx, k.Selector, k.Algorithm, fmt.Sprintf("%s was served everywhere but no longer is (%s): waiting again", ps.p.recordName(k.Selector), why))
		}
		note := "waiting for every authoritative server: " + why
		if ps.dry || (k.SeenEverywhere.IsZero() && k.Note == note) {
			return nil
		}
		k.SeenEverywhere, k.Note = time.Time{}, note
		return ps.save(ctx, k, k.State, "")
	}
	if k.SeenEverywhere.IsZero() {
		if ps.dry {
			return nil
		}
		k.SeenEverywhere, k.Wait = ps.now, wait
		k.Note = fmt.Sprintf("served everywhere; visible after %s", wait)
		return ps.save(ctx, k, k.State, "")
	}
	wait = max(wait, k.Wait)
	if ps.now.Before(k.SeenEverywhere.Add(wait)) {
		if wait != k.Wait && !ps.dry {
			k.Wait = wait
			return ps.save(ctx, k, k.State, "")
		}
		return nil
	}
	if ps.dry {
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateVisible, What: "every server serves the record and the TTLs have passed"})
		return nil
	}
	k.State, k.Wait, k.Note = StateVisible, wait, ""
	return ps.save(ctx, k, StatePublished, fmt.Sprintf("every authoritative server has served the record for %s", wait))
}

// activate: visible -> active, after a probe signed with the key verifies
// against the record as DNS serves it now. The previous active key of the
// algorithm is retired in the same transaction.
func (ps *pass) activate(ctx context.Context, k Key, keys []Key) error {
	ok, why, _, err := ps.exact(ctx, k.Selector, k.Record)
	if err != nil {
		return err
	}
	if !ok {
		ps.warn(ctx, k.Selector, k.Algorithm, fmt.Sprintf("%s is no longer served exactly (%s): not activated", ps.p.recordName(k.Selector), why))
		if ps.dry {
			return nil
		}
		k.State, k.SeenEverywhere, k.Note = StatePublished, time.Time{}, "record changed in DNS: "+why
		return ps.save(ctx, k, StateVisible, "record changed in DNS; waiting for it again")
	}
	var prev *Key
	for i, o := range keys {
		if o.State == StateActive && o.Algorithm == k.Algorithm && o.Selector != k.Selector {
			prev = &keys[i]
		}
	}
	if ps.dry {
		what := "probe the key against DNS and activate it"
		if prev != nil {
			what += "; retire " + prev.Selector
		}
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateActive, What: what})
		return nil
	}
	key, err := ps.key(ctx, k.Selector)
	if err != nil {
		return err
	}
	if err := probe(ctx, ps.p.Domain, k.Selector, key, k.Record, ps.now); err != nil {
		ps.warn(ctx, k.Selector, k.Algorithm, stripPrefix(err).Error()+": not activated")
		k.Note = "probe failed: " + stripPrefix(err).Error()
		if serr := ps.save(ctx, k, k.State, ""); serr != nil {
			return errors.Join(err, serr)
		}
		return err
	}
	from := k.State
	k.State, k.ActivatedAt, k.Since, k.Note = StateActive, ps.now, ps.now, ""
	changes := []Change{{Prev: k.Rev, Key: k}}
	var old Key
	if prev != nil {
		old = *prev
		old.State, old.RetiredAt, old.Since = StateRetired, ps.now, ps.now
		old.Note = "replaced by " + k.Selector
		changes = append(changes, Change{Prev: prev.Rev, Key: old})
	}
	if err := ps.r.store.Update(ctx, changes...); err != nil {
		return err
	}
	ps.transition(ctx, k, from, "a probe signed with the key verified against DNS", k.Compromised)
	if prev != nil {
		what := "replaced by " + k.Selector
		if old.Compromised {
			what += "; compromised: revoked now, without grace"
		}
		ps.transition(ctx, old, StateActive, what, old.Compromised)
	}
	return nil
}

// watch checks an active key. A key missing from the key store, or whose
// record DNS no longer serves exactly, is reported (its mail may fail verification; only an operator
// can tell why the zone changed). A key of an algorithm the policy no
// longer lists is retired, once another algorithm has an active key, so
// that the domain is never left without one.
func (ps *pass) watch(ctx context.Context, k Key, keys []Key) error {
	if !ps.p.hasAlgorithm(k.Algorithm) {
		other := ""
		for _, o := range keys {
			if o.State == StateActive && ps.p.hasAlgorithm(o.Algorithm) {
				other = o.Selector
			}
		}
		if other == "" {
			return nil
		}
		if ps.dry {
			ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateRetired, What: "the policy no longer lists " + string(k.Algorithm)})
			return nil
		}
		k.State, k.RetiredAt, k.Note = StateRetired, ps.now, "the policy no longer lists "+string(k.Algorithm)
		return ps.save(ctx, k, StateActive, k.Note)
	}
	if _, ok := ps.inStore[k.Selector]; !ok {
		ps.warn(ctx, k.Selector, k.Algorithm, fmt.Sprintf("active key %s is missing from the key store: the domain's mail cannot be signed with it; start an emergency rotation", ps.p.recordName(k.Selector)))
	}
	ok, why, _, err := ps.exact(ctx, k.Selector, k.Record)
	if err != nil {
		return err
	}
	if !ok {
		ps.warn(ctx, k.Selector, k.Algorithm, fmt.Sprintf("active key %s is not served exactly (%s): mail it signs may fail verification; check the zone", ps.p.recordName(k.Selector), why))
	}
	return nil
}

// revoke: retired -> revoked once the grace period is over (at once for
// a compromised key): the record becomes "v=DKIM1; p=".
func (ps *pass) revoke(ctx context.Context, k Key) error {
	grace := ps.p.Grace
	if k.Compromised {
		grace = 0
	}
	if ps.now.Before(k.RetiredAt.Add(grace)) {
		return nil
	}
	if ps.dry {
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateRevoked, What: "replace the record by the revoked form"})
		return nil
	}
	changed, err := ps.setRecord(ctx, k.Selector, RevokedRecord)
	if err != nil {
		return err
	}
	what := "replaced the record by the revoked form " + RevokedRecord
	if !changed {
		what = "found the record already revoked"
	}
	k.State, k.RevokedAt, k.Note = StateRevoked, ps.now, ""
	return ps.save(ctx, k, StateRetired, what)
}

// destroy: revoked -> destroyed once revoke_for is over: the record is
// deleted and the key destroyed, if dkimgw generated it.
func (ps *pass) destroy(ctx context.Context, k Key) error {
	if ps.now.Before(k.RevokedAt.Add(ps.p.RevokeFor)) {
		return nil
	}
	if ps.dry {
		ps.act(Action{Selector: k.Selector, Algorithm: k.Algorithm, From: k.State, To: StateDestroyed, What: "delete the record and destroy the key"})
		return nil
	}
	name := ps.p.relName(k.Selector)
	have, err := ps.published(ctx, name)
	if err != nil {
		return err
	}
	var done []string
	if len(have) > 0 {
		cctx, cancel := ps.call(ctx)
		err := ps.r.pubs[ps.p.Publisher].DeleteRecords(cctx, ps.p.zoneFQDN(), []Record{{Name: name, TTL: ps.p.TTL, Value: have[0]}})
		cancel()
		if err != nil {
			return fmt.Errorf("delete %s from zone %s with publisher %q: %w", ps.p.recordName(k.Selector), ps.p.zoneFQDN(), ps.p.Publisher, err)
		}
		done = append(done, "deleted the record")
	}
	_, present := ps.inStore[k.Selector]
	switch {
	case present && k.Created:
		cctx, cancel := ps.call(ctx)
		err := ps.r.keys.DestroyKey(cctx, ps.p.Domain, k.Selector)
		cancel()
		if err != nil {
			return fmt.Errorf("destroy the key: %w", err)
		}
		delete(ps.inStore, k.Selector)
		done = append(done, "destroyed the key")
	case present:
		done = append(done, "left the key in the key store: dkimgw did not create it")
	}
	if len(done) == 0 {
		done = append(done, "found the record and the key already gone")
	}
	k.State, k.Note = StateDestroyed, ""
	if present && !k.Created {
		k.Note = "key left in the key store (adopted, not created by dkimgw)"
	}
	return ps.save(ctx, k, StateRevoked, strings.Join(done, "; "))
}
