package hsm

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestClassify(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  error
		want recovery
	}{
		{nil, recoverNone},
		{errors.New("plain"), recoverNone},
		{pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID), recoverKey},
		{fmt.Errorf("wrapped: %w", pkcs11.Error(pkcs11.CKR_KEY_HANDLE_INVALID)), recoverKey},
		{pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID), recoverSession},
		{pkcs11.Error(pkcs11.CKR_SESSION_CLOSED), recoverSession},
		{pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN), recoverSession},
		{fmt.Errorf("x: %w", errKeyGone), recoverSession},
		{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED), recoverModule},
		{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR), recoverModule},
		{pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT), recoverModule},
		{pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED), recoverModule},
		{pkcs11.Error(pkcs11.CKR_GENERAL_ERROR), recoverModule},
		// Credentials and bad requests are never retried: a retried wrong
		// PIN locks the token, a bad mechanism stays bad.
		{pkcs11.Error(pkcs11.CKR_PIN_INCORRECT), recoverNone},
		{pkcs11.Error(pkcs11.CKR_PIN_LOCKED), recoverNone},
		{pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID), recoverNone},
		{pkcs11.Error(pkcs11.CKR_DATA_LEN_RANGE), recoverNone},
	}
	for _, tt := range tests {
		if got := classify(tt.err); got != tt.want {
			t.Errorf("classify(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestLoginErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		code uint
		want error
		text string
	}{
		{pkcs11.CKR_PIN_INCORRECT, ErrPINIncorrect, "does not retry"},
		{pkcs11.CKR_PIN_LOCKED, ErrPINLocked, "security officer"},
		{pkcs11.CKR_PIN_LEN_RANGE, ErrPINIncorrect, "invalid length"},
		{pkcs11.CKR_PIN_EXPIRED, pkcs11.Error(pkcs11.CKR_PIN_EXPIRED), "expired"},
	}
	for _, tt := range tests {
		err := loginError("tok", pkcs11.Error(tt.code))
		if !errors.Is(err, tt.want) || IsTemporary(err) {
			t.Errorf("loginError(0x%x) = %v; want %v, not temporary", tt.code, err, tt.want)
		}
		if !containsFold(err.Error(), tt.text) {
			t.Errorf("loginError(0x%x) = %q; want it to say %q", tt.code, err, tt.text)
		}
	}
}

func TestTemporaryWrapping(t *testing.T) {
	t.Parallel()
	base := pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
	err := fmt.Errorf("outer: %w", temporary(base))
	if !IsTemporary(err) || !errors.Is(err, base) {
		t.Fatalf("temporary(%v) lost its class or its cause: %v", base, err)
	}
	if temporary(nil) != nil {
		t.Fatal("temporary(nil) != nil")
	}
	if IsTemporary(ErrPINIncorrect) {
		t.Fatal("ErrPINIncorrect is temporary")
	}
}

func containsFold(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if asciiEqualFold(s[i:i+len(sub)], sub) {
			return true
		}
	}
	return false
}

// TestOnePrefix: however deep hsm errors are wrapped in each other, the
// message names the package once, and errors.Is and IsTemporary still see
// every layer.
func TestOnePrefix(t *testing.T) {
	t.Parallel()
	device := pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
	inner := errorf("find objects: %w", device)
	tests := []struct {
		err       error
		is        []error
		temporary bool
	}{
		{errorf("%w: %w", ErrKeyNotFound, errorf("a._domainkey.example.com: %w", errKeyGone)), []error{ErrKeyNotFound, errKeyGone}, false},
		{temporary(errorf("sign with x: %w (recovery failed: %v)", temporary(inner), errorf("re-initialise: %w", errReinitTooSoon))), []error{device}, true},
		{errorf("a: %w", errorf("b: %w", errorf("c: %w", ErrClosed))), []error{ErrClosed}, false},
		{loginError("tok", pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)), []error{ErrPINIncorrect}, false},
		{errorf("token %q: %w", "tok", loginError("tok", pkcs11.Error(pkcs11.CKR_PIN_LOCKED))), []error{ErrPINLocked}, false},
	}
	for _, tt := range tests {
		if n := strings.Count(tt.err.Error(), prefix); n != 1 || !strings.HasPrefix(tt.err.Error(), prefix) {
			t.Errorf("%q: %d package prefixes, want one at the start", tt.err, n)
		}
		for _, target := range tt.is {
			if !errors.Is(tt.err, target) {
				t.Errorf("%q: errors.Is(%v) = false", tt.err, target)
			}
		}
		if IsTemporary(tt.err) != tt.temporary {
			t.Errorf("%q: IsTemporary = %v, want %v", tt.err, !tt.temporary, tt.temporary)
		}
	}
}
