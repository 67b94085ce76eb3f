package hsm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// Errors a caller can match with errors.Is. Each is wrapped with what
// failed and, where there is one, what to do about it.
var (
	ErrModuleNotFound     = errors.New("PKCS#11 module not found")
	ErrTokenNotFound      = errors.New("no such token")
	ErrPINIncorrect       = errors.New("PIN incorrect")
	ErrPINLocked          = errors.New("PIN locked")
	ErrPINSource          = errors.New("no PIN from the pin-source")
	ErrMechanismMissing   = errors.New("token lacks a needed mechanism")
	ErrKeyNotFound        = errors.New("key not found")
	ErrKeyExists          = errors.New("key already exists")
	ErrWeakKey            = errors.New("key too weak")
	ErrUnsafeKey          = errors.New("key is not safe to sign with")
	ErrInvalidName        = errors.New("invalid domain or selector")
	ErrUnknownAlgorithm   = errors.New("unknown algorithm")
	ErrClosed             = errors.New("token closed")
	ErrInvalidSignature   = errors.New("token returned a signature that does not verify")
	ErrUnsupportedRequest = errors.New("unsupported signing request")
)

// temporaryError marks an error as worth retrying later: the token was
// unreachable, or a session or key handle was lost and could not be
// recovered. SMTP callers answer such errors with 4xx.
type temporaryError struct{ err error }

func (e *temporaryError) Error() string   { return e.err.Error() }
func (e *temporaryError) Unwrap() error   { return e.err }
func (e *temporaryError) Temporary() bool { return true }

func temporary(err error) error {
	if err == nil || IsTemporary(err) {
		return err
	}
	return &temporaryError{err}
}

// IsTemporary reports whether err says the token could not serve now but
// may later (lost device, lost sessions, timeouts): the operation can be
// retried later, and a message it was for must be deferred, not bounced.
func IsTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// recovery is how deep the token layer must go to recover from an error.
type recovery int

const (
	recoverNone    recovery = iota // not recoverable by reconnecting: report it
	recoverKey                     // re-find the key's object handles
	recoverSession                 // re-open sessions and log in again
	recoverModule                  // re-initialise the module and find the token again
)

func (r recovery) String() string {
	switch r {
	case recoverKey:
		return "re-find key"
	case recoverSession:
		return "re-open sessions"
	case recoverModule:
		return "re-initialise module"
	}
	return "none"
}

// errKeyGone is returned inside an operation when a key's objects can no
// longer be found: after a re-login that is normal, so recovery escalates
// before calling the key deleted.
var errKeyGone = errors.New("key objects not found in token")

// classify maps an error to the recovery it needs. Codes that describe
// the request (bad mechanism, bad data) or the credentials (PIN) are not
// recoverable: retrying them changes nothing, and retrying a wrong PIN
// locks the token.
func classify(err error) recovery {
	if errors.Is(err, errKeyGone) {
		return recoverSession
	}
	if errors.Is(err, ErrTokenNotFound) {
		// The library lists tokens at C_Initialize: one that comes back
		// (an HSM reconnected, a token restored) is seen only after a
		// re-initialisation.
		return recoverModule
	}
	var code pkcs11.Error
	if !errors.As(err, &code) {
		return recoverNone
	}
	switch code {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		return recoverKey
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_SESSION_COUNT, pkcs11.CKR_OPERATION_ACTIVE:
		return recoverSession
	case pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_GENERAL_ERROR,
		pkcs11.CKR_SLOT_ID_INVALID, pkcs11.CKR_DEVICE_MEMORY:
		return recoverModule
	}
	return recoverNone
}

// loginError turns a C_Login failure into an error that says what to do.
func loginError(label string, err error) error {
	var code pkcs11.Error
	if errors.As(err, &code) {
		switch code {
		case pkcs11.CKR_PIN_INCORRECT:
			return errorf("log in to token %q: %w: check the pin-source; dkimgw does not retry, as tokens lock after a few wrong PINs", label, ErrPINIncorrect)
		case pkcs11.CKR_PIN_LOCKED:
			return errorf("log in to token %q: %w: the security officer must unlock or reset the user PIN", label, ErrPINLocked)
		case pkcs11.CKR_PIN_EXPIRED:
			return errorf("log in to token %q: PIN expired: set a new user PIN with the token's tools: %w", label, err)
		case pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_PIN_INVALID:
			return errorf("log in to token %q: %w: the PIN has an invalid length or characters", label, ErrPINIncorrect)
		}
	}
	return errorf("log in to token %q: %w", label, err)
}

// errorf is fmt.Errorf with the package prefix, once: an hsm error it
// wraps loses its own "hsm: ", so that a chain of wrapped errors reads
// "hsm: sign with x: find objects: ..." and not "hsm: ...: hsm: ...".
// Every error of the package is built with it.
func errorf(format string, args ...any) error {
	for i, a := range args {
		if e, ok := a.(error); ok && strings.HasPrefix(e.Error(), prefix) {
			args[i] = unprefixed{e}
		}
	}
	return fmt.Errorf(prefix+format, args...)
}

const prefix = "hsm: "

// unprefixed is an error without its leading package prefix; errors.Is
// and errors.As see through it.
type unprefixed struct{ err error }

func (u unprefixed) Error() string { return strings.TrimPrefix(u.err.Error(), prefix) }
func (u unprefixed) Unwrap() error { return u.err }
