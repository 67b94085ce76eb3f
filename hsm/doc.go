// Package hsm is dkimgw's PKCS#11 token layer: it parses RFC 7512 token
// URIs, opens and logs in to a token, generates, finds, lists and destroys
// DKIM keys inside it, and signs with them as crypto.Signers. Private keys
// never leave the token; every signature is verified against the public
// key before it is returned. It renders public keys as DKIM TXT records
// and knows nothing else of DKIM.
//
// # Objects
//
// A module is one loaded PKCS#11 library. C_Initialize and C_Finalize act
// on the whole process, so every [Token] of the process that names the
// same library shares one module, reference-counted; the last Token to
// close finalises it. A Token is one logged-in token: a login session that
// stays open while connected (closing a token's last session logs the
// whole process out and voids every private-key handle), and a pool of
// sessions bounded by max-sessions. A [Key] is a private key in the token;
// it caches its object handle per connection and finds it again, by label
// and CKA_ID, after a reconnect.
//
// # Generations and epochs
//
// The module counts its initialisations (the generation). Sessions, slot
// ids and object handles belong to one generation; a Token that finds the
// module in a newer generation reconnects, and closes the sessions of an
// older one only by forgetting them (their numbers may belong to someone
// else's session by then). A Token counts its connections (the epoch);
// keys cache their handles per epoch.
//
// # Concurrency
//
// No lock is held across a call into the library: a network HSM can hang
// one call for minutes while answering others, and that must not stop
// anything else.
//
//   - Every call into the library runs between module.enter and
//     module.leave, which count it in flight. enter waits while a
//     re-initialisation runs (the gate is closed), no longer than the
//     caller's context allows.
//   - Re-initialisation (C_Finalize, C_Initialize) must never run while a
//     call is in flight: SoftHSM crashes. It closes the gate to new calls
//     and waits for the calls in flight to end, at most 250 ms (a healthy
//     token answers in milliseconds). If they end, it re-initialises and
//     reopens the gate. If not, it reopens the gate without finalising,
//     marks the calls still in flight as stuck, and waits, holding nobody
//     up and no longer than its own context, until they return before it
//     tries again. So a healthy key keeps signing within its deadline
//     while a re-initialisation waits behind a hung call: it waits for the
//     gate 250 ms at most, once per hung call.
//   - Several goroutines that notice the same lost generation cause one
//     re-initialisation: the others wait for the gate and see the new
//     generation. Recovery re-initialises at most twice a second
//     (minReinitInterval), so a device that stays lost is probed, not
//     hammered. Opening a token created since the last initialisation is
//     not throttled. Every re-initialisation is logged at WARN with its
//     reason, since it voids every session of every Token of the process.
//   - A Token's mutex guards only its bookkeeping. One goroutine at a time
//     connects (finds the slot, opens the login session, logs in); the
//     others wait for it as long as their contexts allow.
//   - Waiting for a pool session is bounded by the context. C_Sign cannot
//     be interrupted: Key.SignContext returns when its context ends and the
//     call finishes in the background, its session going back to the pool
//     then.
//   - Token.Close does not wait for calls in flight. It closes the
//     sessions it has, bounded by a few seconds; the module is not
//     finalised while any call is still in flight (it stays loaded for the
//     next Token), so a process with a hung call still exits.
//
// # Recovery
//
// An operation that fails for a lost key, session or device is recovered
// and retried once (Token.do). Recovery escalates: re-find the key's
// handle (CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID); re-open the
// sessions and log in again (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
// CKR_USER_NOT_LOGGED_IN, ...); re-initialise the module and find the
// token by label and serial again (CKR_DEVICE_REMOVED, CKR_DEVICE_ERROR,
// CKR_GENERAL_ERROR, a token no longer listed, ...). It stops at once for:
//
//   - a key missing from a session that is logged in, on a token that
//     answers C_GetTokenInfo: the key was destroyed or replaced. That is
//     ErrKeyNotFound; the Key remembers it ([Key.Err]) and fails every
//     later signature at once, without a token call. The module is not
//     re-initialised: that would void every other key's sessions for
//     nothing. A key missing from a session that is not logged in is a
//     lost login, and escalates.
//   - a PIN the token refuses (CKR_PIN_INCORRECT, CKR_PIN_LOCKED, or a
//     token flagged CKF_USER_PIN_LOCKED). The Token remembers it
//     ([Token.PINError]) and makes no more token calls: every operation
//     fails at once with the same error. Real HSMs lock the user PIN after
//     3 to 10 wrong logins. Open a new Token once the PIN is fixed (Open
//     reads the pin-source again; [Token.SamePIN] tells whether it
//     changed).
//   - a closed Token (ErrClosed).
//
// # Errors
//
// Match errors with errors.Is against the Err sentinels, and with
// [IsTemporary]:
//
//   - temporary (IsTemporary): the token could not serve now but may
//     later: lost device or sessions that recovery could not restore,
//     timeouts (a context deadline while waiting for a session, for the
//     gate or for the call), a re-initialisation postponed because calls
//     hang, an invalid signature from the token. Defer the message (4xx).
//   - ErrPINIncorrect, ErrPINLocked: not temporary and never retried; fix
//     the pin-source (or have the security officer unlock the PIN) and
//     open the token again.
//   - ErrPINSource: the pin-source gave no PIN (missing file or variable,
//     relative path, a file its group or others may read, no source at
//     all); nothing was tried with the token. Fix the URI or the file.
//   - ErrKeyNotFound: no such key, or it is gone. ErrUnsafeKey, ErrWeakKey:
//     the key exists but dkimgw refuses to sign with it ([UnsafeReason]).
//   - ErrTokenNotFound is temporary: a token that comes back (an HSM
//     reconnected, a token restored) is found again.
//   - ErrModuleNotFound, ErrInvalidURI, ErrMechanismMissing, ErrKeyExists,
//     ErrInvalidName, ErrUnknownAlgorithm, ErrUnsupportedRequest,
//     ErrClosed: configuration or caller errors; retrying changes nothing.
//
// Every error message starts with "hsm: " once, however deeply it wraps
// other errors of the package, and never contains a PIN.
package hsm
