package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// Stats is a snapshot of a Token's pool and of the errors its token
// calls returned, for metrics. Counters only grow while the Token lives;
// a Token opened again (a reload with a new PIN) starts from zero, which
// Prometheus reads as a counter reset.
type Stats struct {
	// SessionsInUse are pool sessions running a call; SessionsIdle are
	// open and free; SessionsWaiting are callers waiting for a session
	// because the pool (max-sessions) is exhausted.
	SessionsInUse, SessionsIdle, SessionsWaiting int
	// Errors counts failed token calls by PKCS#11 return value
	// ("CKR_DEVICE_ERROR"). The set of names is the standard's: bounded.
	Errors map[string]uint64
	// Reinitializations counts the module's recoveries by C_Finalize and
	// C_Initialize since it was loaded. It is the module's, shared by
	// every Token of the process on the same library.
	Reinitializations uint64
}

// Stats returns the Token's counters; it makes no token call.
func (t *Token) Stats() Stats {
	t.mu.Lock()
	s := Stats{
		SessionsInUse:   len(t.sem),
		SessionsIdle:    len(t.idle),
		SessionsWaiting: t.waiting,
		Errors:          make(map[string]uint64, len(t.ckrErrors)),
	}
	for k, v := range t.ckrErrors {
		s.Errors[k] = v
	}
	t.mu.Unlock()
	if g := t.mod.generation(); g > 0 {
		s.Reinitializations = g - 1
	}
	return s
}

// countError counts err by its PKCS#11 return value, if it carries one.
func (t *Token) countError(err error) {
	var ce pkcs11.Error
	if !errors.As(err, &ce) {
		return
	}
	name := ckrName(ce)
	t.mu.Lock()
	if t.ckrErrors == nil {
		t.ckrErrors = map[string]uint64{}
	}
	t.ckrErrors[name]++
	t.mu.Unlock()
}

// ckrName is the CKR_ name of e; miekg/pkcs11 spells errors as
// "pkcs11: 0x30: CKR_DEVICE_ERROR". A vendor code without a name is
// given as its hexadecimal value, still one series per code.
func ckrName(e pkcs11.Error) string {
	s := e.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && strings.HasPrefix(s[i+2:], "CKR_") {
		return s[i+2:]
	}
	return fmt.Sprintf("0x%X", uint(e))
}

// Check reports whether the token can serve a signature now: a pool
// session can be had within ctx, it is logged in, and the token answers
// C_GetTokenInfo. It is a readiness probe: a token found lost is recovered
// as a signature would recover it (so that a token that came back is
// found again even while no mail flows), and the error is temporary.
func (t *Token) Check(ctx context.Context) error {
	check := func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		si, err := c.GetSessionInfo(s)
		if err != nil {
			return errorf("check token %q: %w", t.uri.Token, err)
		}
		if si.State != pkcs11.CKS_RO_USER_FUNCTIONS && si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
			return errorf("check token %q: %w", t.uri.Token, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))
		}
		if _, err := c.GetTokenInfo(si.SlotID); err != nil {
			return errorf("check token %q: %w", t.uri.Token, err)
		}
		return nil
	}
	refind := func(ctx context.Context) error {
		_, err := t.withSession(ctx, check)
		return err
	}
	return t.do(ctx, "check token", check, refind)
}
