package hsm

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"os"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// module is one loaded PKCS#11 library, shared by every Token of the
// process that uses it: C_Initialize and C_Finalize act on the whole
// process, so two independent owners would finalise the library under
// each other (crypto11's Close does exactly that).
type module struct {
	path string
	ctx  *pkcs11.Ctx

	// mu is held for reading by every call into the library and for
	// writing by re-initialisation: C_Finalize while another goroutine is
	// inside a call crashes SoftHSM.
	mu sync.RWMutex
	// gen counts initialisations. Sessions, slot ids and object handles
	// belong to one generation; a Token that sees a newer one reconnects.
	gen uint64
	// lastRecovery is when recovery last re-initialised the library.
	lastRecovery time.Time

	refs int // guarded by modulesMu

	// pins holds, per token (label and serial), a hash of the PIN this
	// process logged in with. Login is per process: a second Token of
	// the same token gets CKR_USER_ALREADY_LOGGED_IN whatever PIN it
	// gives, so that PIN is checked against the hash instead.
	pinsMu sync.Mutex
	pins   map[string][32]byte
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
	m = &module{path: path, ctx: ctx, gen: 1, refs: 1}
	modules[path] = m
	return m, true, nil
}

// release drops a reference; the last one finalises and unloads the
// library.
func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	_ = m.ctx.Finalize()
	m.ctx.Destroy()
}

// generation returns the current initialisation count.
func (m *module) generation() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.gen
}

// minReinitInterval spaces re-initialisations while a device stays lost:
// each one voids every session of the process, and a gateway signing
// thousands of messages a second would otherwise re-initialise for each.
const minReinitInterval = 500 * time.Millisecond

// errReinitTooSoon says a re-initialisation was skipped for being too soon
// after the last one.
var errReinitTooSoon = errors.New("the module was re-initialised moments ago; the token is still unavailable")

// reinitialize finalises and initialises the library again, unless
// another caller already did so since seen: a whole pool of goroutines
// hitting a lost device must cause one re-initialisation, not one each.
// With throttle (recovery), it also declines within minReinitInterval of
// the last recovery that re-initialised, so a device that stays lost is
// probed twice a second, not once per message; opening a token created
// since the last initialisation is never throttled.
func (m *module) reinitialize(seen uint64, throttle bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gen != seen {
		return nil
	}
	if throttle {
		if time.Since(m.lastRecovery) < minReinitInterval {
			return temporary(errorf("%w", errReinitTooSoon))
		}
		m.lastRecovery = time.Now()
	}
	// Every session and handle of the old generation is void from here on,
	// whether or not the calls below succeed.
	m.gen++
	_ = m.ctx.Finalize()
	if err := m.ctx.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return errorf("re-initialise PKCS#11 module %s: %w", m.path, err)
	}
	return nil
}
