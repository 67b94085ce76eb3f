package hsm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Mechanisms and key types that miekg/pkcs11 v1.1.2 does not define
// (PKCS#11 v3.0).
const (
	ckkECEdwards             = 0x40
	ckmECEdwardsKeyPairGen   = 0x1055
	ckmEdDSA                 = 0x1057
	ckEffectivelyInfinite    = 0
	ckUnavailableInformation = ^uint(0)
)

const (
	// DefaultMaxSessions is the session pool size when neither Options
	// nor the URI's max-sessions set one. Signing is CPU-bound inside the
	// token, so a few sessions per core saturate it; more only queue.
	DefaultMaxSessions = 8

	// DefaultSignTimeout bounds one signature when the caller's context
	// has no deadline. A token signs in milliseconds: one that takes
	// seconds is sick, and the message is better deferred than stuck.
	DefaultSignTimeout = 5 * time.Second
)

// Options tunes Open. The zero value is ready to use.
type Options struct {
	// Logger receives recoveries and other token events. Nil discards them.
	Logger *slog.Logger
	// Getenv resolves pin-source=env:NAME. Nil means os.Getenv.
	Getenv func(string) string
	// MaxSessions is the session pool size. Zero means the URI's
	// max-sessions, or DefaultMaxSessions; it is capped by what the token
	// says it allows.
	MaxSessions int
	// SignTimeout bounds a signature whose context has no deadline. Zero
	// means DefaultSignTimeout.
	SignTimeout time.Duration
}

// Token is a logged-in PKCS#11 token: a pool of sessions shared by every
// key signing on it, which reconnects by itself when sessions, keys or the
// device are lost. It is safe for concurrent use.
type Token struct {
	uri         *URI
	pin         string
	log         *slog.Logger
	signTimeout time.Duration
	mod         *module

	// sem holds one entry per session in use: its capacity is the pool size.
	sem chan struct{}

	mu        sync.Mutex
	closed    bool
	connected bool
	slot      uint
	gen       uint64 // module generation of the sessions below
	epoch     uint64 // counts connections; key handles are cached per epoch
	// login is never closed while connected: the token logs the whole
	// process out when its last session closes, which voids every private
	// key handle.
	login    pkcs11.SessionHandle
	idle     []pkcs11.SessionHandle
	info     TokenInfo
	tokenMax uint // the token's ulMaxSessionCount
	mechs    map[uint]pkcs11.MechanismInfo
}

// TokenInfo describes the token a Token is connected to.
type TokenInfo struct {
	Label        string
	Serial       string
	Manufacturer string
	Model        string
}

// Open loads the URI's module, finds its token, logs in with its PIN and
// returns the Token. A wrong PIN is reported at once and never retried.
func Open(ctx context.Context, rawURI string, opts Options) (*Token, error) {
	uri, err := ParseURI(rawURI)
	if err != nil {
		return nil, err
	}
	pin, err := uri.PIN(opts.Getenv)
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	size := opts.MaxSessions
	if size <= 0 {
		size = uri.MaxSessions
	}
	if size <= 0 {
		size = DefaultMaxSessions
	}
	t := &Token{
		uri:         uri,
		pin:         pin,
		log:         log.With("component", "hsm"),
		signTimeout: opts.SignTimeout,
	}
	if t.signTimeout <= 0 {
		t.signTimeout = DefaultSignTimeout
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var fresh bool
	t.mod, fresh, err = acquireModule(uri.ModulePath)
	if err != nil {
		return nil, err
	}
	gen := t.mod.generation()
	err = t.connect()
	if errors.Is(err, ErrTokenNotFound) && !fresh {
		// The library reads its token list at C_Initialize (SoftHSM does):
		// a token created since then, by softhsm2-util or an HSM admin, is
		// only seen after a re-initialisation. Other Tokens of this process
		// reconnect by themselves when they notice.
		if rerr := t.mod.reinitialize(gen, false); rerr == nil {
			err = t.connect()
		}
	}
	if err != nil {
		t.mod.release()
		return nil, err
	}
	t.mu.Lock()
	if max := t.maxPoolLocked(); size > max {
		size = max
	}
	t.mu.Unlock()
	t.sem = make(chan struct{}, size)
	t.log.Info("token opened", "token", t.info.Label, "serial", t.info.Serial, "sessions", size)
	return t, nil
}

// connect connects (or reconnects) under the module's read lock.
func (t *Token) connect() error {
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.connectLocked()
}

// connectLocked finds the token, opens the login session and logs in,
// unless already connected in the module's current generation. The caller
// holds t.mu and the module's read lock.
func (t *Token) connectLocked() error {
	if t.closed {
		return errorf("%w", ErrClosed)
	}
	if t.connected && t.gen == t.mod.gen {
		return nil
	}
	t.disconnectLocked()
	c := t.mod.ctx
	slot, info, err := t.findSlot(c)
	if err != nil {
		return err
	}
	if info.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
		return errorf("token %q: %w: the security officer must unlock or reset the user PIN", info.Label, ErrPINLocked)
	}
	s, err := c.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return errorf("open session on token %q: %w", info.Label, err)
	}
	err = c.Login(s, pkcs11.CKU_USER, t.pin)
	already := errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN))
	if err != nil && !already {
		_ = c.CloseSession(s)
		return loginError(info.Label, err)
	}
	if !t.mod.checkPIN(info.Label+"\x00"+info.SerialNumber, t.pin, already) {
		_ = c.CloseSession(s)
		return loginError(info.Label, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT))
	}
	mechs, err := c.GetMechanismList(slot)
	if err != nil {
		_ = c.CloseSession(s)
		return errorf("list mechanisms of token %q: %w", info.Label, err)
	}
	t.mechs = make(map[uint]pkcs11.MechanismInfo, len(mechs))
	for _, m := range mechs {
		mi, err := c.GetMechanismInfo(slot, []*pkcs11.Mechanism{m})
		if err != nil {
			continue
		}
		t.mechs[m.Mechanism] = mi
	}
	t.slot = slot
	t.login = s
	t.gen = t.mod.gen
	t.epoch++
	t.connected = true
	t.info = TokenInfo{Label: info.Label, Serial: info.SerialNumber, Manufacturer: info.ManufacturerID, Model: info.Model}
	t.tokenMax = info.MaxSessionCount
	return nil
}

// disconnectLocked forgets the current sessions. Sessions of the current
// module generation are closed; those of an older one are void already,
// and closing their numbers could close someone else's new session.
func (t *Token) disconnectLocked() {
	if !t.connected {
		return
	}
	if t.gen == t.mod.gen {
		for _, s := range t.idle {
			_ = t.mod.ctx.CloseSession(s)
		}
		_ = t.mod.ctx.CloseSession(t.login)
	}
	t.idle = nil
	t.connected = false
}

// findSlot finds the one initialised token the URI selects. After the
// first connection the token is also pinned to the label and serial found
// then: slot ids change across re-initialisation, and a URI that selects
// by slot-id alone must not drift to another token.
func (t *Token) findSlot(c *pkcs11.Ctx) (uint, pkcs11.TokenInfo, error) {
	slots, err := c.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, errorf("list slots of %s: %w", t.uri.ModulePath, err)
	}
	var (
		found   []uint
		infos   []pkcs11.TokenInfo
		offered []string
	)
	for _, slot := range slots {
		ti, err := c.GetTokenInfo(slot)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		offered = append(offered, fmt.Sprintf("%q (serial %s)", ti.Label, ti.SerialNumber))
		if !t.matches(slot, ti) {
			continue
		}
		found = append(found, slot)
		infos = append(infos, ti)
	}
	switch len(found) {
	case 1:
		return found[0], infos[0], nil
	case 0:
		avail := "none"
		if len(offered) > 0 {
			avail = strings.Join(offered, ", ")
		}
		return 0, pkcs11.TokenInfo{}, temporary(errorf("%w matching %s; initialised tokens: %s", ErrTokenNotFound, t.uri, avail))
	default:
		return 0, pkcs11.TokenInfo{}, errorf("%d tokens match %s; add serial= to the URI to pick one", len(found), t.uri)
	}
}

func (t *Token) matches(slot uint, ti pkcs11.TokenInfo) bool {
	u := t.uri
	if t.info.Label != "" && (ti.Label != t.info.Label || ti.SerialNumber != t.info.Serial) {
		return false
	}
	return (u.Token == "" || u.Token == ti.Label) &&
		(u.Serial == "" || u.Serial == ti.SerialNumber) &&
		(u.Manufacturer == "" || u.Manufacturer == ti.ManufacturerID) &&
		(u.Model == "" || u.Model == ti.Model) &&
		(u.SlotID == nil || t.info.Label != "" || *u.SlotID == slot)
}

// maxPoolLocked is the largest pool the token allows, keeping one of its
// sessions for the login session.
func (t *Token) maxPoolLocked() int {
	if t.tokenMax == ckEffectivelyInfinite || t.tokenMax == ckUnavailableInformation || t.tokenMax > 1<<20 {
		return 1 << 20
	}
	if t.tokenMax <= 1 {
		return 1
	}
	return int(t.tokenMax - 1)
}

// Info describes the token.
func (t *Token) Info() TokenInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.info
}

// hasMechanism reports whether the token offers mech.
func (t *Token) hasMechanism(mech uint) (pkcs11.MechanismInfo, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	mi, ok := t.mechs[mech]
	return mi, ok
}

// Close closes the token's sessions and releases the module; the last
// Token of a module finalises it. Keys of a closed token fail with
// ErrClosed. Close waits for operations in flight.
func (t *Token) Close() error {
	t.mod.mu.RLock()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		t.mod.mu.RUnlock()
		return nil
	}
	t.disconnectLocked()
	t.closed = true
	t.mu.Unlock()
	t.mod.mu.RUnlock()
	t.mod.release()
	return nil
}

// sessionFunc is one token operation on a session. epoch identifies the
// connection the session belongs to, for caching object handles.
type sessionFunc func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error

// withSession runs fn on a pooled session, connecting first if needed.
// It waits for a free session no longer than ctx allows. It returns the
// module generation fn ran in, so that recovery re-initialises the module
// at most once per lost generation.
func (t *Token) withSession(ctx context.Context, fn sessionFunc) (uint64, error) {
	select {
	case t.sem <- struct{}{}:
	default:
		select {
		case t.sem <- struct{}{}:
		case <-ctx.Done():
			return 0, temporary(errorf("wait for a free session on token %q: %w", t.uri.Token, ctx.Err()))
		}
	}
	defer func() { <-t.sem }()

	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	gen := t.mod.gen
	c := t.mod.ctx

	t.mu.Lock()
	if err := t.connectLocked(); err != nil {
		t.mu.Unlock()
		return gen, err
	}
	epoch := t.epoch
	var s pkcs11.SessionHandle
	if n := len(t.idle); n > 0 {
		s = t.idle[n-1]
		t.idle = t.idle[:n-1]
	} else {
		var err error
		s, err = c.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.mu.Unlock()
			return gen, errorf("open session on token %q: %w", t.info.Label, err)
		}
	}
	t.mu.Unlock()

	err := fn(c, s, epoch)

	t.mu.Lock()
	switch {
	case t.connected && epoch == t.epoch && classify(err) < recoverSession:
		t.idle = append(t.idle, s)
	case t.gen == gen:
		// A session of an older connection, or one that just failed as a
		// session: close it rather than hand it out again.
		_ = c.CloseSession(s)
	}
	t.mu.Unlock()
	return gen, err
}

// do runs fn with recovery: when fn fails with a lost key, session or
// device, it recovers, escalating as far as needed, and retries fn once.
// refind re-finds the objects fn works on (nil when fn uses none). An
// error that persists is returned as temporary.
func (t *Token) do(ctx context.Context, what string, fn sessionFunc, refind func(context.Context) error) error {
	gen, err := t.withSession(ctx, fn)
	level := classify(err)
	if err == nil || level == recoverNone {
		return err
	}
	t.log.Warn("token operation failed, recovering", "op", what, "error", err, "recovery", level.String())
	if rerr := t.recover(ctx, level, gen, refind); rerr != nil {
		if !IsTemporary(rerr) {
			return rerr
		}
		return temporary(errorf("%s: %w (recovery failed: %v)", what, err, rerr))
	}
	_, err = t.withSession(ctx, fn)
	if err != nil && classify(err) != recoverNone {
		return temporary(errorf("%s after recovery: %w", what, err))
	}
	return err
}

// recover escalates from level until refind (or, without one, a fresh
// connection) succeeds: re-find the key; re-open sessions and log in;
// re-initialise the module and find the token again. A key still missing
// after the last step was deleted: that is ErrKeyNotFound, not temporary.
// A wrong or locked PIN stops escalation at once.
func (t *Token) recover(ctx context.Context, level recovery, gen uint64, refind func(context.Context) error) error {
	if refind == nil {
		refind = t.ping
	}
	var err error
	for ; level <= recoverModule; level++ {
		switch level {
		case recoverSession:
			t.mod.mu.RLock()
			t.mu.Lock()
			t.disconnectLocked()
			t.mu.Unlock()
			t.mod.mu.RUnlock()
		case recoverModule:
			if rerr := t.mod.reinitialize(gen, true); rerr != nil {
				err = rerr
				continue
			}
		}
		err = refind(ctx)
		if err == nil {
			t.log.Info("token recovered", "token", t.uri.Token, "recovery", level.String())
			return nil
		}
		if errors.Is(err, ErrPINIncorrect) || errors.Is(err, ErrPINLocked) || errors.Is(err, ErrClosed) {
			return err
		}
		if ctx.Err() != nil {
			break
		}
	}
	if errors.Is(err, errKeyGone) {
		return errorf("%w: %w", ErrKeyNotFound, err)
	}
	return temporary(err)
}

// ping checks that a session can be had and used.
func (t *Token) ping(ctx context.Context) error {
	_, err := t.withSession(ctx, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		_, err := c.GetSessionInfo(s)
		return err
	})
	return err
}
