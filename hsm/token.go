package hsm

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
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

	// mu guards the fields below. It is never held across a token call:
	// a call that hangs must not stop other goroutines from giving up on
	// their deadlines.
	mu        sync.Mutex
	closed    bool
	connected bool
	// connecting is non-nil while one goroutine (re)connects; the others
	// wait for it to be closed, no longer than their contexts allow.
	connecting chan struct{}
	// pinErr is the login failure caused by the PIN (wrong, locked). Once
	// set, the Token makes no more token calls: another login with the
	// same PIN would only bring the token closer to locking it. A new
	// Token, opened with a PIN that works, replaces this one.
	pinErr error
	slot   uint
	gen    uint64 // module generation of the sessions below
	epoch  uint64 // counts connections; key handles are cached per epoch
	// login is never closed while connected: the token logs the whole
	// process out when its last session closes, which voids every private
	// key handle.
	login    pkcs11.SessionHandle
	idle     []pkcs11.SessionHandle
	info     TokenInfo
	tokenMax uint // the token's ulMaxSessionCount
	mechs    map[uint]pkcs11.MechanismInfo

	// logins counts C_Login calls, for tests.
	logins int
	// waiting counts callers waiting for a pool session; ckrErrors the
	// failed token calls by return value (Stats).
	waiting   int
	ckrErrors map[string]uint64
}

// TokenInfo describes the token a Token is connected to.
type TokenInfo struct {
	Label        string
	Serial       string
	Manufacturer string
	Model        string
}

// Open loads the URI's module, finds its token, logs in with its PIN and
// returns the Token. The PIN is read from the URI's pin-source at every
// Open. A wrong PIN is reported at once and never retried.
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
		log = slog.New(slog.DiscardHandler)
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
	gen, err := t.connect(ctx)
	if errors.Is(err, ErrTokenNotFound) && !fresh {
		// The library reads its token list at C_Initialize (SoftHSM does):
		// a token created since then, by softhsm2-util or an HSM admin, is
		// only seen after a re-initialisation. Other Tokens of this process
		// reconnect by themselves when they notice.
		if rerr := t.mod.reinitialize(ctx, t.log, gen, false, "open token "+uri.String()+": not seen since the module was initialised"); rerr == nil {
			_, err = t.connect(ctx)
		}
	}
	if err != nil {
		t.mod.release(t.log)
		// A device that fails at start (an HSM rebooting, a network HSM
		// out of reach) may answer later, as the same failure says while
		// serving; a token that is not there at all is a configuration
		// error.
		if !errors.Is(err, ErrTokenNotFound) && classify(err) >= recoverSession {
			err = temporary(err)
		}
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

// connect connects unless connected, as one call into the module, and
// returns the module generation it ran in.
func (t *Token) connect(ctx context.Context) (uint64, error) {
	c, err := t.mod.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer t.mod.leave(c)
	return c.gen, t.ensureConnected(ctx, c)
}

// ensureConnected connects (or reconnects) in the generation of the call
// c, unless that is done already. One goroutine connects; the others wait
// for it.
func (t *Token) ensureConnected(ctx context.Context, c *call) error {
	for {
		t.mu.Lock()
		switch {
		case t.closed:
			t.mu.Unlock()
			return errorf("token %q: %w", t.uri.Token, ErrClosed)
		case t.pinErr != nil:
			t.mu.Unlock()
			return t.pinErr
		case t.connected && t.gen == c.gen:
			t.mu.Unlock()
			return nil
		}
		if ch := t.connecting; ch != nil {
			t.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return temporary(errorf("wait for the connection to token %q: %w", t.uri.Token, ctx.Err()))
			}
		}
		ch := make(chan struct{})
		t.connecting = ch
		old, oldGen := t.takeSessionsLocked()
		t.mu.Unlock()
		if oldGen == c.gen {
			// Sessions of an older generation are void already, and
			// closing their numbers could close someone else's new session.
			for _, s := range old {
				_ = t.mod.ctx.CloseSession(s)
			}
		}
		err := t.connectIn(c)
		t.mu.Lock()
		t.connecting = nil
		close(ch)
		t.mu.Unlock()
		return err
	}
}

// takeSessionsLocked forgets the current sessions and returns them, with
// their module generation, for the caller to close. The caller holds t.mu.
func (t *Token) takeSessionsLocked() ([]pkcs11.SessionHandle, uint64) {
	if !t.connected {
		return nil, 0
	}
	old := append(t.idle, t.login)
	t.idle = nil
	t.connected = false
	return old, t.gen
}

// connectIn finds the token, opens the login session and logs in, in the
// generation of the call c. Only the goroutine that set t.connecting runs
// it, without t.mu.
func (t *Token) connectIn(c *call) error {
	p := t.mod.ctx
	slot, info, err := t.findSlot(p)
	if err != nil {
		return err
	}
	if info.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
		return t.pinFailed(errorf("token %q: %w: the security officer must unlock or reset the user PIN", info.Label, ErrPINLocked))
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return errorf("open session on token %q: %w", info.Label, err)
	}
	t.mu.Lock()
	t.logins++
	t.mu.Unlock()
	err = p.Login(s, pkcs11.CKU_USER, t.pin)
	already := errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN))
	if err != nil && !already {
		_ = p.CloseSession(s)
		lerr := loginError(info.Label, err)
		if errors.Is(lerr, ErrPINIncorrect) || errors.Is(lerr, ErrPINLocked) {
			return t.pinFailed(lerr)
		}
		return lerr
	}
	if !t.mod.checkPIN(info.Label+"\x00"+info.SerialNumber, t.pin, already) {
		_ = p.CloseSession(s)
		return t.pinFailed(errorf("log in to token %q: %w: the process is logged in to the token already, with another PIN, so the token cannot check this one; if the PIN was changed in the token, restart dkimgw to use the new one", info.Label, ErrPINIncorrect))
	}
	mechs, err := p.GetMechanismList(slot)
	if err != nil {
		_ = p.CloseSession(s)
		return errorf("list mechanisms of token %q: %w", info.Label, err)
	}
	mechInfo := make(map[uint]pkcs11.MechanismInfo, len(mechs))
	for _, m := range mechs {
		mi, err := p.GetMechanismInfo(slot, []*pkcs11.Mechanism{m})
		if err != nil {
			continue
		}
		mechInfo[m.Mechanism] = mi
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		_ = p.CloseSession(s)
		return errorf("token %q: %w", info.Label, ErrClosed)
	}
	t.mechs = mechInfo
	t.slot = slot
	t.login = s
	t.gen = c.gen
	t.epoch++
	t.connected = true
	t.info = TokenInfo{Label: info.Label, Serial: info.SerialNumber, Manufacturer: info.ManufacturerID, Model: info.Model}
	t.tokenMax = info.MaxSessionCount
	return nil
}

// pinFailed records a login failure caused by the PIN, so that no other
// login is tried with it, and returns it.
func (t *Token) pinFailed(err error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pinErr == nil {
		t.pinErr = err
		t.log.Error("token refused the PIN; no more logins with it until the pin-source is fixed and the token re-opened (SIGHUP)", "token", t.uri.Token, "error", err)
	}
	return t.pinErr
}

// PINError is the login failure caused by the PIN (ErrPINIncorrect or
// ErrPINLocked) that stopped this Token, or nil. A Token that has one
// fails every operation with it, without calling the token: open a new
// Token once the PIN is fixed.
func (t *Token) PINError() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pinErr
}

// SamePIN reports whether the PIN that rawURI's pin-source gives now is
// the one this Token logged in with: a caller that re-reads its
// configuration opens a new Token only when the PIN changed.
func (t *Token) SamePIN(rawURI string, getenv func(string) string) (bool, error) {
	uri, err := ParseURI(rawURI)
	if err != nil {
		return false, err
	}
	pin, err := uri.PIN(getenv)
	if err != nil {
		return false, err
	}
	return subtle.ConstantTimeCompare([]byte(pin), []byte(t.pin)) == 1, nil
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
// ErrClosed. Close does not wait for operations in flight: a call that
// hangs in the token keeps its session, and the module is then not
// finalised (finalising under a call crashes some libraries). Close
// returns within a few seconds whatever the token does.
func (t *Token) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	old, gen := t.takeSessionsLocked()
	t.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := t.mod.enter(ctx)
		if err != nil {
			return
		}
		defer t.mod.leave(c)
		if c.gen == gen {
			for _, s := range old {
				_ = t.mod.ctx.CloseSession(s)
			}
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
		t.log.Warn("token does not answer; closed without closing its sessions", "token", t.uri.Token)
	}
	t.mod.release(t.log)
	return nil
}

// sessionFunc is one token operation on a session. epoch identifies the
// connection the session belongs to, for caching object handles.
type sessionFunc func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error

// ran is where an operation ran: the module generation and the Token's
// connection, so that recovery acts once per lost generation or
// connection, not once per goroutine that noticed.
type ran struct{ gen, epoch uint64 }

// withSession runs fn on a pooled session, connecting first if needed.
// It waits for a free session, a re-initialisation or another goroutine's
// connection no longer than ctx allows; fn itself cannot be interrupted.
func (t *Token) withSession(ctx context.Context, fn sessionFunc) (ran, error) {
	select {
	case t.sem <- struct{}{}:
	default:
		t.mu.Lock()
		t.waiting++
		t.mu.Unlock()
		var err error
		select {
		case t.sem <- struct{}{}:
		case <-ctx.Done():
			err = temporary(errorf("wait for a free session on token %q: %w", t.uri.Token, ctx.Err()))
		}
		t.mu.Lock()
		t.waiting--
		t.mu.Unlock()
		if err != nil {
			return ran{}, err
		}
	}
	defer func() { <-t.sem }()

	call, err := t.mod.enter(ctx)
	if err != nil {
		return ran{}, err
	}
	defer t.mod.leave(call)
	at := ran{gen: call.gen}
	if err := t.ensureConnected(ctx, call); err != nil {
		return at, err
	}
	c := t.mod.ctx

	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return at, errorf("token %q: %w", t.uri.Token, ErrClosed)
	}
	if !t.connected || t.gen != call.gen {
		// Disconnected by recovery since ensureConnected.
		t.mu.Unlock()
		return at, temporary(errorf("token %q: %w", t.uri.Token, pkcs11.Error(pkcs11.CKR_SESSION_CLOSED)))
	}
	at.epoch = t.epoch
	slot, label := t.slot, t.info.Label
	var s pkcs11.SessionHandle
	fresh := false
	if n := len(t.idle); n > 0 {
		s = t.idle[n-1]
		t.idle = t.idle[:n-1]
	} else {
		fresh = true
	}
	t.mu.Unlock()
	if fresh {
		if s, err = c.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
			t.countError(err)
			return at, errorf("open session on token %q: %w", label, err)
		}
	}

	err = fn(c, s, at.epoch)
	t.countError(err)

	t.mu.Lock()
	keep := t.connected && at.epoch == t.epoch && classify(err) < recoverSession
	if keep {
		t.idle = append(t.idle, s)
	}
	t.mu.Unlock()
	if !keep {
		// A session of an older connection, or one that just failed as a
		// session: close it rather than hand it out again. The module
		// generation cannot have changed while this call was in flight.
		_ = c.CloseSession(s)
	}
	return at, err
}

// do runs fn with recovery: when fn fails with a lost key, session or
// device, it recovers, escalating as far as needed, and retries fn once.
// refind re-finds the objects fn works on (nil when fn uses none). An
// error that persists is returned as temporary.
func (t *Token) do(ctx context.Context, what string, fn sessionFunc, refind func(context.Context) error) error {
	at, err := t.withSession(ctx, fn)
	level := classify(err)
	if err == nil || level == recoverNone {
		return err
	}
	t.log.Warn("token operation failed, recovering", "op", what, "error", err, "recovery", level.String())
	if rerr := t.recover(ctx, level, at, err, refind); rerr != nil {
		if !IsTemporary(rerr) {
			return rerr
		}
		return temporary(errorf("%s%w (recovery failed: %v)", opPrefix(what, err), err, rerr))
	}
	_, err = t.withSession(ctx, fn)
	if err != nil && classify(err) != recoverNone {
		return temporary(errorf("%s%w (after recovery)", opPrefix(what, err), err))
	}
	return err
}

// opPrefix is "what: ", unless err already starts by saying so.
func opPrefix(what string, err error) string {
	if strings.HasPrefix(err.Error(), prefix+what) {
		return ""
	}
	return what + ": "
}

// recover escalates from level until refind (or, without one, a fresh
// connection) succeeds: re-find the key; re-open sessions and log in;
// re-initialise the module and find the token again. A key that refind
// finds missing in a healthy, logged-in session is gone (ErrKeyNotFound):
// that stops escalation, as does a wrong or locked PIN. A key still
// missing after the last step is ErrKeyNotFound too.
func (t *Token) recover(ctx context.Context, level recovery, at ran, cause error, refind func(context.Context) error) error {
	if refind == nil {
		refind = t.ping
	}
	var err error
	for ; level <= recoverModule; level++ {
		switch level {
		case recoverSession:
			t.mu.Lock()
			if t.connected && t.epoch == at.epoch {
				// Sessions are closed by the next connect, inside a call.
				t.connected = false
			}
			t.mu.Unlock()
		case recoverModule:
			if rerr := t.mod.reinitialize(ctx, t.log, at.gen, true, cause.Error()); rerr != nil {
				err = rerr
				continue
			}
		}
		err = refind(ctx)
		if err == nil {
			t.log.Info("token recovered", "token", t.uri.Token, "recovery", level.String())
			return nil
		}
		if errors.Is(err, ErrPINIncorrect) || errors.Is(err, ErrPINLocked) || errors.Is(err, ErrClosed) || errors.Is(err, ErrKeyNotFound) {
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

// healthy reports whether session s is logged in and the token answers:
// then an object missing from it is really missing, not hidden by a lost
// login or a lost device.
func (t *Token) healthy(c *pkcs11.Ctx, s pkcs11.SessionHandle) bool {
	si, err := c.GetSessionInfo(s)
	if err != nil || (si.State != pkcs11.CKS_RO_USER_FUNCTIONS && si.State != pkcs11.CKS_RW_USER_FUNCTIONS) {
		return false
	}
	_, err = c.GetTokenInfo(si.SlotID)
	return err == nil
}
