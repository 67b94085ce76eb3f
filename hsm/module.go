package hsm

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// module is one loaded PKCS#11 library, shared by every Token of the
// process that uses it: C_Initialize and C_Finalize act on the whole
// process, so two independent owners would finalise the library under
// each other (crypto11's Close does exactly that).
//
// Every call into the library runs between enter and leave, which count
// it in flight. Re-initialisation closes a gate to new calls, waits a
// bounded time for the calls in flight to end, and finalises only when
// none is left; otherwise it gives up and reopens the gate. Nothing ever
// waits on the gate longer than its context allows, and no lock is held
// across a library call. See doc.go.
type module struct {
	path string
	ctx  *pkcs11.Ctx

	mu sync.Mutex
	// gen counts initialisations. Sessions, slot ids and object handles
	// belong to one generation; a Token that sees a newer one reconnects.
	gen uint64
	// calls are the calls in flight.
	calls map[*call]struct{}
	// gate is non-nil while a re-initialisation drains calls or runs; new
	// calls wait for it to be closed.
	gate chan struct{}
	// drained is closed by the call that leaves the module idle while a
	// re-initialisation waits for that.
	drained chan struct{}
	// stuck counts the calls in flight that outlasted a drain; unstuck is
	// closed when the last of them returns. Re-initialisation is not tried
	// again until then: it would only give up again.
	stuck   int
	unstuck chan struct{}
	// lastRecovery is when recovery last re-initialised the library.
	lastRecovery time.Time
	// finalized: the last Token released the module; no call may start.
	finalized bool

	refs int // guarded by modulesMu

	// pins holds, per token (label and serial), a hash of the PIN this
	// process logged in with. Login is per process: a second Token of
	// the same token gets CKR_USER_ALREADY_LOGGED_IN whatever PIN it
	// gives, so that PIN is checked against the hash instead.
	pinsMu sync.Mutex
	pins   map[string][32]byte
}

// call is one call in flight.
type call struct {
	gen   uint64 // the module generation it runs in
	stuck bool   // it outlasted a re-initialisation's drain
}

// drainTimeout bounds how long a re-initialisation keeps new calls
// waiting while the calls in flight end. A healthy token answers in
// milliseconds; a call still running after this is most likely hung, and
// a signature with a healthy key must not miss its deadline behind it.
const drainTimeout = 250 * time.Millisecond

// closeTimeout bounds the token calls of Close (closing sessions,
// finalising): a process that is shutting down must not hang on a token
// that stopped answering.
const closeTimeout = 2 * time.Second

// enter counts a call in flight and returns it, waiting (no longer than
// ctx allows) while a re-initialisation is under way.
func (m *module) enter(ctx context.Context) (*call, error) {
	m.mu.Lock()
	for m.gate != nil {
		gate := m.gate
		m.mu.Unlock()
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, temporary(errorf("wait for the re-initialisation of PKCS#11 module %s: %w", m.path, ctx.Err()))
		}
		m.mu.Lock()
	}
	defer m.mu.Unlock()
	if m.finalized {
		return nil, errorf("PKCS#11 module %s: %w", m.path, ErrClosed)
	}
	c := &call{gen: m.gen}
	m.calls[c] = struct{}{}
	return c, nil
}

// leave ends a call that enter counted.
func (m *module) leave(c *call) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.calls, c)
	if c.stuck {
		if m.stuck--; m.stuck == 0 && m.unstuck != nil {
			close(m.unstuck)
			m.unstuck = nil
		}
	}
	if len(m.calls) == 0 && m.drained != nil {
		close(m.drained)
		m.drained = nil
	}
}

// checkPIN records pin for token after a fresh login, or, when the
// process was already logged in, reports whether pin is the one it logged
// in with. A token logged in by something else in the process (no record)
// gets the benefit of the doubt.
func (m *module) checkPIN(token, pin string, alreadyLoggedIn bool) bool {
	sum := sha256.Sum256([]byte(pin))
	m.pinsMu.Lock()
	defer m.pinsMu.Unlock()
	if m.pins == nil {
		m.pins = make(map[string][32]byte)
	}
	known, ok := m.pins[token]
	if !alreadyLoggedIn || !ok {
		m.pins[token] = sum
		return true
	}
	return subtle.ConstantTimeCompare(known[:], sum[:]) == 1
}

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
)

// acquireModule loads and initialises the library at path, or returns the
// process's existing instance with one more reference; fresh tells which.
func acquireModule(path string) (m *module, fresh bool, err error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m := modules[path]; m != nil {
		m.refs++
		return m, false, nil
	}
	// pkcs11.New returns nil without a reason when dlopen fails, so say
	// what is wrong with the path ourselves.
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, false, errorf("%w: %s does not exist; install the vendor's PKCS#11 library (SoftHSM: apt-get install softhsm2) or fix module-path", ErrModuleNotFound, path)
		}
		return nil, false, errorf("%w: %w", ErrModuleNotFound, err)
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, false, errorf("%w: %s is not a loadable PKCS#11 library (dlopen failed or it has no C_GetFunctionList)", ErrModuleNotFound, path)
	}
	// Initialize keeps miekg's default CKF_OS_LOCKING_OK: without it
	// concurrent calls crash SoftHSM.
	if err := ctx.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		ctx.Destroy()
		return nil, false, temporary(errorf("initialise PKCS#11 module %s: %w", path, err))
	}
	m = &module{path: path, ctx: ctx, gen: 1, refs: 1, calls: map[*call]struct{}{}}
	modules[path] = m
	return m, true, nil
}

// release drops a reference; the last one finalises and unloads the
// library, unless a call is still in flight (hung): finalising under it
// crashes SoftHSM, and the process is most likely exiting anyway. Such a
// module stays loaded, for the next Token of the same library to reuse.
// release waits for the library no longer than closeTimeout.
func (m *module) release(log *slog.Logger) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		modulesMu.Lock()
		defer modulesMu.Unlock()
		m.refs--
		if m.refs > 0 {
			return
		}
		m.mu.Lock()
		busy := len(m.calls)
		if m.gate != nil {
			busy++ // a re-initialisation is under way
		}
		m.finalized = busy == 0
		m.mu.Unlock()
		if busy > 0 {
			log.Warn("PKCS#11 module left initialised: token calls are still in flight", "module", m.path, "calls", busy)
			return
		}
		delete(modules, m.path)
		// Holding modulesMu, so that loading the library again waits
		// until it is finalised.
		_ = m.ctx.Finalize()
		m.ctx.Destroy()
	}()
	select {
	case <-done:
	case <-time.After(closeTimeout):
		log.Warn("PKCS#11 module does not answer C_Finalize; giving up on it", "module", m.path)
	}
}

// generation returns the current initialisation count.
func (m *module) generation() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen
}

// minReinitInterval spaces re-initialisations while a device stays lost:
// each one voids every session of the process, and a gateway signing
// thousands of messages a second would otherwise re-initialise for each.
const minReinitInterval = 500 * time.Millisecond

// errReinitTooSoon says a re-initialisation was skipped for being too soon
// after the last one.
var errReinitTooSoon = errors.New("the module was re-initialised moments ago; the token is still unavailable")

// errCallsInFlight says a re-initialisation gave up because token calls
// did not end: finalising under them would crash the library.
var errCallsInFlight = errors.New("token calls in flight do not end, so the module is not re-initialised under them")

// reinitialize finalises and initialises the library again, unless
// another caller already did so since seen: a whole pool of goroutines
// hitting a lost device must cause one re-initialisation, not one each.
// With throttle (recovery), it also declines within minReinitInterval of
// the last recovery that re-initialised, so a device that stays lost is
// probed twice a second, not once per message; opening a token created
// since the last initialisation is never throttled. why is logged to log.
//
// It never finalises while a call is in flight. New calls wait while it
// drains the calls in flight, for drainTimeout at most; calls that
// outlast that are marked stuck, the gate reopens, and it waits (as long
// as ctx allows, holding nobody up) for them to end before it tries again.
func (m *module) reinitialize(ctx context.Context, log *slog.Logger, seen uint64, throttle bool, why string) error {
	for {
		m.mu.Lock()
		if m.gen != seen {
			m.mu.Unlock()
			return nil
		}
		if m.finalized {
			m.mu.Unlock()
			return errorf("PKCS#11 module %s: %w", m.path, ErrClosed)
		}
		if gate := m.gate; gate != nil {
			// Another caller re-initialises: wait for it, then look again.
			m.mu.Unlock()
			select {
			case <-gate:
				continue
			case <-ctx.Done():
				return temporary(errorf("wait for the re-initialisation of PKCS#11 module %s: %w", m.path, ctx.Err()))
			}
		}
		if m.stuck > 0 {
			unstuck := m.unstuck
			m.mu.Unlock()
			select {
			case <-unstuck:
				continue
			case <-ctx.Done():
				return temporary(errorf("re-initialise PKCS#11 module %s: %w", m.path, errCallsInFlight))
			}
		}
		if throttle && time.Since(m.lastRecovery) < minReinitInterval {
			m.mu.Unlock()
			return temporary(errorf("%w", errReinitTooSoon))
		}
		gate := make(chan struct{})
		m.gate = gate
		var drained chan struct{}
		if len(m.calls) > 0 {
			drained = make(chan struct{})
			m.drained = drained
		}
		m.mu.Unlock()

		if drained != nil && !m.drain(ctx, log, drained) {
			continue // the stuck calls are marked; wait for them above
		}
		// No call is in flight and none can start: the gate is closed.
		m.mu.Lock()
		if throttle {
			m.lastRecovery = time.Now()
		}
		// Every session and handle of the old generation is void from
		// here on, whether or not the calls below succeed.
		m.gen++
		gen := m.gen
		m.mu.Unlock()
		log.Warn("re-initialising the PKCS#11 module: every session of the process is void", "module", m.path, "reason", why, "generation", gen)
		_ = m.ctx.Finalize()
		err := m.ctx.Initialize()
		m.mu.Lock()
		m.gate = nil
		close(gate)
		m.mu.Unlock()
		if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			return temporary(errorf("re-initialise PKCS#11 module %s: %w", m.path, err))
		}
		return nil
	}
}

// drain waits for drained, at most drainTimeout and as long as ctx
// allows. When calls are still in flight after that it marks them stuck,
// reopens the gate and reports false; the gate stays closed on true.
func (m *module) drain(ctx context.Context, log *slog.Logger, drained chan struct{}) bool {
	timer := time.NewTimer(drainTimeout)
	defer timer.Stop()
	select {
	case <-drained:
		return true
	case <-timer.C:
	case <-ctx.Done():
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.drained = nil
	if len(m.calls) == 0 {
		return true
	}
	for c := range m.calls {
		if !c.stuck {
			c.stuck = true
			m.stuck++
		}
	}
	if m.unstuck == nil {
		m.unstuck = make(chan struct{})
	}
	close(m.gate)
	m.gate = nil
	log.Warn("re-initialisation of the PKCS#11 module postponed: token calls in flight do not end", "module", m.path, "calls", len(m.calls))
	return false
}
