package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// openToken gives the test a fresh SoftHSM token, opened; the returned
// buffer collects the token's log.
func openToken(t *testing.T, uriSuffix string) (*hsm.Token, *testenv.SoftHSMToken, *testenv.LogBuffer) {
	t.Helper()
	st := testenv.SoftHSM(t)
	logs := &testenv.LogBuffer{}
	tok, err := hsm.Open(t.Context(), st.URI()+uriSuffix, hsm.Options{
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { tok.Close() })
	return tok, st, logs
}

// signAndVerify signs a fresh digest the way go-msgauth does and checks
// the signature with Go's own crypto against the key read from the token.
func signAndVerify(t testing.TB, k *hsm.Key) {
	t.Helper()
	msg := make([]byte, 64)
	rand.Read(msg)
	digest := sha256.Sum256(msg)
	switch pub := k.Public().(type) {
	case *rsa.PublicKey:
		sig, err := k.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("sign: %v", err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("RSA signature does not verify: %v", err)
		}
	case ed25519.PublicKey:
		sig, err := k.Sign(rand.Reader, digest[:], crypto.Hash(0))
		if err != nil {
			t.Fatalf("sign: %v", err)
		}
		if !ed25519.Verify(pub, digest[:], sig) {
			t.Fatal("Ed25519 signature does not verify")
		}
	default:
		t.Fatalf("public key of type %T", pub)
	}
}

func TestGenerateEachAlgorithm(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	for _, alg := range hsm.Algorithms() {
		t.Run(string(alg), func(t *testing.T) {
			key, err := tok.GenerateKey(t.Context(), "Example.COM", "s-"+string(alg), alg)
			if err != nil {
				t.Fatalf("GenerateKey: %v", err)
			}
			info := key.Info()
			wantLabel := "s-" + string(alg) + "._domainkey.example.com"
			if info.Label != wantLabel || info.Domain != "example.com" || info.Selector != "s-"+string(alg) {
				t.Errorf("label/domain/selector = %q/%q/%q, want %q", info.Label, info.Domain, info.Selector, wantLabel)
			}
			if info.Algorithm != alg || info.Bits != alg.Bits() {
				t.Errorf("algorithm %s/%d bits, want %s/%d", info.Algorithm, info.Bits, alg, alg.Bits())
			}
			if info.Extractable || !info.Sensitive || !info.NeverExtractable || !info.AlwaysSensitive || !info.Local || !info.CanSign {
				t.Errorf("private key attributes as read from the token: %+v", info)
			}
			if len(info.ID) != 16 {
				t.Errorf("CKA_ID has %d bytes, want 16 random bytes", len(info.ID))
			}
			signAndVerify(t, key)

			// Found again by (domain, selector), the public key is the same.
			again, err := tok.Key(t.Context(), "example.com", "s-"+string(alg))
			if err != nil {
				t.Fatalf("Key: %v", err)
			}
			if !publicEqual(again.Public(), key.Public()) || !bytes.Equal(again.Info().ID, info.ID) {
				t.Error("Key found a different key than GenerateKey made")
			}
			signAndVerify(t, again)
		})
	}
}

func publicEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func TestPrivateKeyNeverLeaves(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	ctx := t.Context()
	rsaKey, err := tok.GenerateKey(ctx, "example.com", "r", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	edKey, err := tok.GenerateKey(ctx, "example.com", "e", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	sensitive := map[*hsm.Key][]uint{
		rsaKey: {pkcs11.CKA_PRIVATE_EXPONENT, pkcs11.CKA_PRIME_1, pkcs11.CKA_PRIME_2, pkcs11.CKA_EXPONENT_1, pkcs11.CKA_COEFFICIENT},
		edKey:  {pkcs11.CKA_VALUE},
	}
	for key, attrs := range sensitive {
		err := hsm.WithPrivateHandle(key, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle) error {
			for _, a := range attrs {
				_, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(a, nil)})
				if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
					t.Errorf("%s: reading attribute 0x%x: got %v, want CKR_ATTRIBUTE_SENSITIVE", key.Info().Label, a, err)
				}
			}
			for _, a := range []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
			} {
				if err := c.SetAttributeValue(s, h, []*pkcs11.Attribute{a}); err == nil {
					t.Errorf("%s: setting attribute 0x%x succeeded; it must be read-only", key.Info().Label, a.Type)
				}
			}
			ext, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil)})
			if err != nil || len(ext[0].Value) != 1 || ext[0].Value[0] != 0 {
				t.Errorf("%s: CKA_EXTRACTABLE = %v (err %v), want false", key.Info().Label, ext, err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestConcurrentSigningThroughSmallPool(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "&max-sessions=4")
	if got := hsm.PoolSize(tok); got != 4 {
		t.Fatalf("pool size %d, want 4 from max-sessions", got)
	}
	ctx := t.Context()
	rsaKey, err := tok.GenerateKey(ctx, "example.com", "r", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	edKey, err := tok.GenerateKey(ctx, "example.com", "e", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 32 {
		key := rsaKey
		if i%2 == 1 {
			key = edKey
		}
		wg.Go(func() {
			for range 10 {
				signAndVerify(t, key)
			}
		})
	}
	wg.Wait()
}

func TestPoolWaitIsBoundedByContext(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "&max-sessions=1")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	release := hsm.HoldSessions(tok, 1)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	_, err = key.SignContext(ctx, digest[:], crypto.Hash(0))
	if err == nil || !hsm.IsTemporary(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("sign with every session taken: got %v, want a temporary deadline error", err)
	}
	release()
	signAndVerify(t, key)
}

func TestRecoversWhenSessionsAreClosedBehindItsBack(t *testing.T) {
	// Not parallel: another test opening a new token re-initialises the
	// module too, and this test must see its own recovery.
	tok, _, logs := openToken(t, "&max-sessions=4")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	// Fill the pool with idle sessions first, so that all of them are lost.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { signAndVerify(t, key) })
	}
	wg.Wait()
	if err := hsm.CloseAllSessions(tok); err != nil {
		t.Fatal(err)
	}
	for range 8 {
		wg.Go(func() { signAndVerify(t, key) })
	}
	wg.Wait()
	if !strings.Contains(logs.String(), "token recovered") {
		t.Errorf("no recovery was logged; log:\n%s", logs)
	}
}

func TestRecoversWhenTheModuleIsFinalized(t *testing.T) {
	// Not parallel: another test opening a new token re-initialises the
	// module too, and this test must see its own recovery.
	tok, _, logs := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	if err := hsm.FinalizeModule(tok); err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	if !strings.Contains(logs.String(), "recovery=\"re-initialise module\"") {
		t.Errorf("recovery did not re-initialise the module; log:\n%s", logs)
	}
	// Re-initialising voids every session of the process: it is a warning
	// that says why.
	if !strings.Contains(logs.String(), "level=WARN msg=\"re-initialising the PKCS#11 module: every session of the process is void\"") ||
		!strings.Contains(logs.String(), "reason=") {
		t.Errorf("the re-initialisation was not logged as a warning with its reason; log:\n%s", logs)
	}
}

func TestVanishedTokenIsTemporaryAndComesBack(t *testing.T) {
	t.Parallel()
	tok, st, _ := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	dir := st.Dir()
	if dir == "" {
		t.Fatal("token directory not found")
	}
	// The token goes away (an HSM unplugged, a network HSM unreachable):
	// its files are deleted, a copy is kept to bring it back. (Renaming
	// the directory is not enough: SoftHSM goes on signing from memory.)
	aside := t.TempDir()
	copyFiles(t, dir, aside)
	removeToken(t, dir)
	digest := sha256.Sum256([]byte("x"))
	_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err == nil {
		t.Fatal("signed with a key whose token is gone")
	}
	if !hsm.IsTemporary(err) {
		t.Fatalf("error for a vanished token is not temporary: %v", err)
	}
	onePrefix(t, err)
	// It comes back: signing recovers by itself, without a restart.
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyFiles(t, aside, dir)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err == nil {
			break
		}
		if !hsm.IsTemporary(err) || time.Now().After(deadline) {
			t.Fatalf("signing did not recover after the token came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	signAndVerify(t, key)
}

func TestDeletedTokenIsATemporaryError(t *testing.T) {
	t.Parallel()
	tok, st, _ := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	removeToken(t, st.Dir())
	digest := sha256.Sum256([]byte("x"))
	_, err = key.Sign(rand.Reader, digest[:], crypto.Hash(0))
	if err == nil || !hsm.IsTemporary(err) {
		t.Fatalf("sign with a deleted token: got %v, want a temporary error", err)
	}
	onePrefix(t, err)
}

func TestKeysSurviveAnotherTokenReinitializingTheModule(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, key)
	// A token created now is invisible to the initialised module: opening
	// it re-initialises the module under the first Token.
	openToken(t, "")
	signAndVerify(t, key)
}

func TestWrongPIN(t *testing.T) {
	t.Parallel()
	st := testenv.SoftHSM(t)
	bad := strings.Replace(st.URI(), "pin-value="+st.PIN, "pin-value=0000"+st.PIN, 1)
	_, err := hsm.Open(t.Context(), bad, hsm.Options{})
	if !errors.Is(err, hsm.ErrPINIncorrect) {
		t.Fatalf("Open with a wrong PIN: got %v, want ErrPINIncorrect", err)
	}
	if hsm.IsTemporary(err) {
		t.Error("a wrong PIN is reported as temporary: callers would retry it and lock the token")
	}
	onePrefix(t, err)
	if strings.Contains(err.Error(), st.PIN) {
		t.Error("the error text contains the PIN")
	}
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatalf("Open with the right PIN after a wrong one: %v", err)
	}
	defer tok.Close()
	// The process is logged in to the token now, and the token answers
	// CKR_USER_ALREADY_LOGGED_IN to any PIN: a wrong one must still fail.
	if _, err := hsm.Open(t.Context(), bad, hsm.Options{}); !errors.Is(err, hsm.ErrPINIncorrect) {
		t.Fatalf("Open with a wrong PIN while logged in: got %v, want ErrPINIncorrect", err)
	}
	second, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatalf("second Open with the right PIN while logged in: %v", err)
	}
	second.Close()
}

func TestOpenErrors(t *testing.T) {
	t.Parallel()
	st := testenv.SoftHSM(t)
	tests := []struct {
		name string
		uri  string
		want error
	}{
		{"missing module", "pkcs11:token=x?module-path=/nonexistent/libpkcs11.so&pin-value=1", hsm.ErrModuleNotFound},
		{"not a module", "pkcs11:token=x?module-path=/etc/hostname&pin-value=1", hsm.ErrModuleNotFound},
		{"no such token", "pkcs11:token=no-such-token?module-path=" + testenv.SoftHSMModule + "&pin-value=1", hsm.ErrTokenNotFound},
		{"bad uri", "pkcs11:object=foo?module-path=" + testenv.SoftHSMModule, hsm.ErrInvalidURI},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := hsm.Open(t.Context(), tt.uri, hsm.Options{})
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			onePrefix(t, err)
		})
	}
	// The PIN from a file, as in production.
	tok, err := hsm.Open(t.Context(), st.URIWithPINFile(t), hsm.Options{})
	if err != nil {
		t.Fatalf("Open with pin-source=file: %v", err)
	}
	tok.Close()
}

func TestRefusals(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	ctx := t.Context()
	if _, err := tok.GenerateKey(ctx, "example.com", "weak", hsm.Algorithm("rsa-1024")); !errors.Is(err, hsm.ErrWeakKey) {
		t.Errorf("rsa-1024: got %v, want ErrWeakKey", err)
	}
	if _, err := tok.GenerateKey(ctx, "example.com", "dup", hsm.Ed25519); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.GenerateKey(ctx, "EXAMPLE.com", "dup", hsm.RSA2048); !errors.Is(err, hsm.ErrKeyExists) {
		t.Errorf("duplicate (domain, selector): got %v, want ErrKeyExists", err)
	}
	for _, bad := range [][2]string{{"example.com", "bad_selector"}, {"nodot", "s"}, {"example.com", ""}, {"-x.example.com", "s"}, {"example.com", "s;x"}} {
		if _, err := tok.GenerateKey(ctx, bad[0], bad[1], hsm.Ed25519); !errors.Is(err, hsm.ErrInvalidName) {
			t.Errorf("GenerateKey(%q, %q): got %v, want ErrInvalidName", bad[0], bad[1], err)
		}
	}
	_, err := tok.Key(ctx, "example.com", "absent")
	if !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("Key of a missing selector: got %v, want ErrKeyNotFound", err)
	}
	onePrefix(t, err)
	keys, err := tok.Keys(ctx)
	if err != nil || len(keys) != 1 {
		t.Errorf("after refusals the token holds %d keys (err %v), want 1", len(keys), err)
	}
}

func TestMissingEd25519MechanismIsReported(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	hsm.DropMechanism(tok, hsm.CKMECEdwardsKeyPairGen)
	_, err := tok.GenerateKey(t.Context(), "example.com", "e", hsm.Ed25519)
	if !errors.Is(err, hsm.ErrMechanismMissing) || !strings.Contains(err.Error(), "CKM_EC_EDWARDS_KEY_PAIR_GEN") {
		t.Fatalf("got %v, want ErrMechanismMissing naming CKM_EC_EDWARDS_KEY_PAIR_GEN", err)
	}
}

func TestImportedOrExtractableKeysAreRefused(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	ctx := t.Context()

	// An RSA key made outside the token and imported: CKA_LOCAL is false.
	goKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	label := hsm.RecordName("example.com", "imported")
	err = hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, err := c.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{1, 2, 3}),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, goKey.N.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(goKey.E)).Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, goKey.D.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, goKey.Primes[0].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, goKey.Primes[1].Bytes()),
		})
		return err
	})
	if err != nil {
		t.Fatalf("import key: %v", err)
	}
	if _, err := tok.Key(ctx, "example.com", "imported"); !errors.Is(err, hsm.ErrUnsafeKey) || !strings.Contains(err.Error(), "CKA_LOCAL") {
		t.Errorf("imported key: got %v, want ErrUnsafeKey naming CKA_LOCAL", err)
	}

	// A key generated in the token but extractable.
	label = hsm.RecordName("example.com", "extractable")
	err = hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, _, err := c.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(hsm.CKMECEdwardsKeyPairGen, nil)},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, []byte{0x06, 0x03, 0x2b, 0x65, 0x70}),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{4, 5, 6}),
			},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{4, 5, 6}),
			})
		return err
	})
	if err != nil {
		t.Fatalf("generate extractable key: %v", err)
	}
	if _, err := tok.Key(ctx, "example.com", "extractable"); !errors.Is(err, hsm.ErrUnsafeKey) || !strings.Contains(err.Error(), "CKA_EXTRACTABLE") {
		t.Errorf("extractable key: got %v, want ErrUnsafeKey naming CKA_EXTRACTABLE", err)
	}

	// Both are listed, so that an audit shows them, with what is wrong.
	keys, err := tok.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	flags := map[string]hsm.KeyInfo{}
	for _, k := range keys {
		flags[k.Selector] = k
	}
	if k, ok := flags["imported"]; !ok || k.Local {
		t.Errorf("imported key listed as %+v (present %v), want Local=false", k, ok)
	}
	if k, ok := flags["extractable"]; !ok || !k.Extractable {
		t.Errorf("extractable key listed as %+v (present %v), want Extractable=true", k, ok)
	}
}

func TestListAndDestroy(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	ctx := t.Context()
	for _, s := range []struct {
		domain, selector string
		alg              hsm.Algorithm
	}{{"example.com", "a", hsm.RSA2048}, {"example.org", "b", hsm.Ed25519}, {"mail.example.org", "c.sub", hsm.Ed25519}} {
		if _, err := tok.GenerateKey(ctx, s.domain, s.selector, s.alg); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := tok.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]hsm.Algorithm{}
	for _, k := range keys {
		got[k.Label] = k.Algorithm
	}
	want := map[string]hsm.Algorithm{
		"a._domainkey.example.com":          hsm.RSA2048,
		"b._domainkey.example.org":          hsm.Ed25519,
		"c.sub._domainkey.mail.example.org": hsm.Ed25519,
	}
	if len(got) != len(want) {
		t.Fatalf("Keys = %v, want %v", got, want)
	}
	for l, a := range want {
		if got[l] != a {
			t.Errorf("key %s: algorithm %q, want %q", l, got[l], a)
		}
	}
	if err := tok.DestroyKey(ctx, "example.org", "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Key(ctx, "example.org", "b"); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("destroyed key still found: %v", err)
	}
	// Both objects are gone: nothing is left with the label.
	err = hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		if err := c.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "b._domainkey.example.org")}); err != nil {
			return err
		}
		hs, _, err := c.FindObjects(s, 10)
		c.FindObjectsFinal(s)
		if len(hs) != 0 {
			t.Errorf("%d objects left after DestroyKey", len(hs))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tok.DestroyKey(ctx, "example.org", "b"); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("destroying twice: got %v, want ErrKeyNotFound", err)
	}
}

func TestSignRefusesWrongRequests(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	rsaKey, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	edKey, err := tok.GenerateKey(t.Context(), "example.com", "e", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	for _, c := range []struct {
		name string
		key  *hsm.Key
		data []byte
		opts crypto.SignerOpts
	}{
		{"rsa sha1", rsaKey, digest[:20], crypto.SHA1},
		{"rsa unhashed", rsaKey, []byte("message"), crypto.Hash(0)},
		{"rsa pss", rsaKey, digest[:], &rsa.PSSOptions{Hash: crypto.SHA256}},
		{"ed25519ph", edKey, digest[:], crypto.SHA256},
	} {
		if _, err := c.key.Sign(rand.Reader, c.data, c.opts); !errors.Is(err, hsm.ErrUnsupportedRequest) {
			t.Errorf("%s: got %v, want ErrUnsupportedRequest", c.name, err)
		}
	}
}

func TestClosedToken(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "r", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	if err := tok.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tok.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := key.Sign(rand.Reader, digest[:], crypto.Hash(0)); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("sign after Close: got %v, want ErrClosed", err)
	}
}

// copyFiles copies the regular files of dir src into dir dst.
func copyFiles(t *testing.T, src, dst string) {
	t.Helper()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// removeToken deletes a token's directory. SoftHSM, in this very process,
// may write a lock file into it meanwhile: try again until it is gone.
func removeToken(t *testing.T, dir string) {
	t.Helper()
	var err error
	for range 20 {
		if err = os.RemoveAll(dir); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal(err)
}

// TestHungCallFreezesNothing: one token call hangs (a network HSM that
// stops answering one request) and a re-initialisation of the module is
// pending behind it. Signing with a healthy key keeps its deadline, the
// re-initialisation gives up rather than finalise the module under the
// hung call, and Close returns.
func TestHungCallFreezesNothing(t *testing.T) {
	// Not parallel: the hung call belongs to the module every test of the
	// package shares, and would hold up their re-initialisations.
	tok, _, _ := openToken(t, "")
	key, err := tok.GenerateKey(t.Context(), "example.com", "healthy", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	gen := hsm.ModuleGeneration(tok)
	release := hsm.HangCall(tok)
	defer release()

	reinit := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		reinit <- hsm.Reinitialize(ctx, tok)
	}()
	waitReinitPending(t, tok)

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	digest := sha256.Sum256([]byte("x"))
	sig, err := key.SignContext(ctx, digest[:], crypto.Hash(0))
	if err != nil {
		t.Fatalf("a healthy key did not sign while a re-initialisation waited for a hung call: %v", err)
	}
	if !ed25519.Verify(key.Public().(ed25519.PublicKey), digest[:], sig) {
		t.Fatal("signature does not verify")
	}
	select {
	case err := <-reinit:
		if err == nil || !hsm.IsTemporary(err) {
			t.Errorf("re-initialisation with a call hung: got %v, want a temporary error", err)
		}
		onePrefix(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("the re-initialisation is still waiting for the hung call")
	}
	if got := hsm.ModuleGeneration(tok); got != gen {
		t.Fatalf("the module was re-initialised (generation %d -> %d) under a hung call", gen, got)
	}

	// Close does not wait for the hung call either.
	closed := make(chan error, 1)
	go func() { closed <- tok.Close() }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close waits for the hung call")
	}
}

// onePrefix checks that err's message names the package once.
func onePrefix(t *testing.T, err error) {
	t.Helper()
	if err != nil && strings.Count(err.Error(), "hsm: ") > 1 {
		t.Errorf("error repeats the package prefix: %q", err)
	}
}

// waitReinitPending waits until a re-initialisation of tok's module waits
// for calls in flight.
func waitReinitPending(t *testing.T, tok *hsm.Token) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !hsm.ReinitPending(tok) {
		if time.Now().After(deadline) {
			t.Fatal("no re-initialisation is pending")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestDestroyedKeyIsGone: a key destroyed while in use (rotation, an
// administrator, another gateway) fails with ErrKeyNotFound, at once and
// every time, without re-initialising the module (which would void the
// sessions of every key in the process); other keys go on signing.
func TestDestroyedKeyIsGone(t *testing.T) {
	// Not parallel: it counts the re-initialisations of the module every
	// test of the package shares.
	tok, st, logs := openToken(t, "")
	gone, err := tok.GenerateKey(t.Context(), "example.com", "gone", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	other, err := tok.GenerateKey(t.Context(), "example.org", "other", hsm.RSA2048)
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, gone)
	signAndVerify(t, other)

	// Another Token of the same token destroys it, as another process would.
	admin, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.DestroyKey(t.Context(), "example.com", "gone"); err != nil {
		t.Fatal(err)
	}
	admin.Close()

	gen := hsm.ModuleGeneration(tok)
	mark := len(logs.String())
	digest := sha256.Sum256([]byte("x"))
	for i := range 5 {
		_, err := gone.Sign(rand.Reader, digest[:], crypto.Hash(0))
		if !errors.Is(err, hsm.ErrKeyNotFound) || !strings.Contains(err.Error(), "gone._domainkey.example.com") {
			t.Fatalf("sign %d with a destroyed key: got %v, want ErrKeyNotFound naming the key", i, err)
		}
		onePrefix(t, err)
		signAndVerify(t, other)
		time.Sleep(100 * time.Millisecond) // longer than nothing, so that recovery is not throttled
	}
	if got := hsm.ModuleGeneration(tok); got != gen {
		t.Errorf("a destroyed key re-initialised the module (generation %d -> %d)", gen, got)
	}
	if !errors.Is(gone.Err(), hsm.ErrKeyNotFound) {
		t.Errorf("Key.Err() = %v, want ErrKeyNotFound", gone.Err())
	}
	if after := logs.String()[mark:]; strings.Contains(after, "re-initialising") || strings.Count(after, "key gone") != 1 {
		t.Errorf("want one log line saying the key is gone, and no re-initialisation; log:\n%s", after)
	}
}

// TestChangedPINIsNotRetried: the user PIN changes behind the Token's
// back and the process is logged out. The next signature tries the old
// PIN once; after that every operation fails at once with
// ErrPINIncorrect, without another login, until a Token is opened with
// the new PIN.
func TestChangedPINIsNotRetried(t *testing.T) {
	t.Parallel()
	st := testenv.SoftHSM(t)
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	key, err := tok.GenerateKey(t.Context(), "example.com", "s", hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	newPIN := "changed" + st.PIN
	err = hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		return c.SetPIN(s, st.PIN, newPIN)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.CloseAllSessions(tok); err != nil {
		t.Fatal(err)
	}
	before := hsm.Logins(tok)
	digest := sha256.Sum256([]byte("x"))
	for i := range 10 {
		_, err := key.Sign(rand.Reader, digest[:], crypto.Hash(0))
		if !errors.Is(err, hsm.ErrPINIncorrect) || hsm.IsTemporary(err) || !strings.Contains(err.Error(), "does not retry") {
			t.Fatalf("sign %d after the PIN changed: got %v, want ErrPINIncorrect, not temporary, saying it is not retried", i, err)
		}
		if strings.Contains(err.Error(), st.PIN) {
			t.Fatal("the error text contains the PIN")
		}
		onePrefix(t, err)
	}
	if n := hsm.Logins(tok) - before; n > 1 {
		t.Errorf("%d logins with the old PIN after it changed, want at most 1", n)
	}
	if !errors.Is(tok.PINError(), hsm.ErrPINIncorrect) {
		t.Errorf("PINError() = %v, want ErrPINIncorrect", tok.PINError())
	}
	if _, err := tok.Keys(t.Context()); !errors.Is(err, hsm.ErrPINIncorrect) {
		t.Errorf("Keys after the PIN failure: got %v, want ErrPINIncorrect", err)
	}
	if same, err := tok.SamePIN(st.URI(), nil); err != nil || !same {
		t.Errorf("SamePIN(old URI) = %v, %v; want true", same, err)
	}

	// Re-opened with the new PIN, the token signs again.
	uri := strings.Replace(st.URI(), "pin-value="+st.PIN, "pin-value="+newPIN, 1)
	if same, err := tok.SamePIN(uri, nil); err != nil || same {
		t.Errorf("SamePIN(new URI) = %v, %v; want false", same, err)
	}
	fresh, err := hsm.Open(t.Context(), uri, hsm.Options{})
	if err != nil {
		t.Fatalf("Open with the new PIN: %v", err)
	}
	defer fresh.Close()
	again, err := fresh.Key(t.Context(), "example.com", "s")
	if err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, again)
}

// TestKeysWithOtherUsesAreRefused: a key generated in the token, sensitive
// and never extractable, but allowed to decrypt, unwrap, derive or sign
// with recovery is refused, and the listing says why.
func TestKeysWithOtherUsesAreRefused(t *testing.T) {
	t.Parallel()
	tok, _, _ := openToken(t, "")
	ctx := t.Context()
	for i, attr := range []struct {
		typ  uint
		name string
	}{
		{pkcs11.CKA_DECRYPT, "CKA_DECRYPT"},
		{pkcs11.CKA_UNWRAP, "CKA_UNWRAP"},
		{pkcs11.CKA_SIGN_RECOVER, "CKA_SIGN_RECOVER"},
		{pkcs11.CKA_DERIVE, "CKA_DERIVE"},
	} {
		selector := "use" + string(rune('a'+i))
		label := hsm.RecordName("example.com", selector)
		id := []byte{9, byte(i)}
		err := hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
			_, _, err := c.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
				[]*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
					pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
					pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
					pkcs11.NewAttribute(pkcs11.CKA_ID, id),
				},
				[]*pkcs11.Attribute{
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
					pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
					pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
					pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
					pkcs11.NewAttribute(attr.typ, true),
					pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
					pkcs11.NewAttribute(pkcs11.CKA_ID, id),
				})
			return err
		})
		if err != nil {
			t.Logf("the token refuses an RSA key with %s=true (%v); nothing to check", attr.name, err)
			continue
		}
		_, err = tok.Key(ctx, "example.com", selector)
		if !errors.Is(err, hsm.ErrUnsafeKey) || !strings.Contains(err.Error(), attr.name) {
			t.Errorf("key with %s=true: got %v, want ErrUnsafeKey naming %s", attr.name, err, attr.name)
		}
		onePrefix(t, err)
	}
	keys, err := tok.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) == 0 {
		t.Fatal("the token refused every such key; the test checked nothing")
	}
	for _, k := range keys {
		if why := hsm.UnsafeReason(k); !strings.Contains(why, "more than sign") {
			t.Errorf("%s is listed as %+v; UnsafeReason %q does not say it may do more than sign", k.Label, k, why)
		}
	}
	// dkimgw's own keys may do nothing but sign; the token may not know
	// CKA_SIGN_RECOVER for Ed25519, which counts as false.
	for _, alg := range []hsm.Algorithm{hsm.RSA2048, hsm.Ed25519} {
		k, err := tok.GenerateKey(ctx, "example.org", "own-"+string(alg), alg)
		if err != nil {
			t.Fatal(err)
		}
		if why := hsm.UnsafeReason(k.Info()); why != "" {
			t.Errorf("dkimgw's own %s key is refused: %s", alg, why)
		}
	}
}

// TestInterruptedGenerationIsRepaired: a public key object without its
// private key, as a generation killed half-way leaves it, does not block
// the selector: GenerateKey removes it, says so, and makes the key.
func TestInterruptedGenerationIsRepaired(t *testing.T) {
	t.Parallel()
	tok, _, logs := openToken(t, "")
	ctx := t.Context()
	label := hsm.RecordName("example.com", "half")
	err := hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, priv, err := c.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(hsm.CKMECEdwardsKeyPairGen, nil)},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, hsm.CKKECEdwards),
				pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, []byte{0x06, 0x03, 0x2b, 0x65, 0x70}),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{7, 7}),
			},
			[]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
				pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, hsm.CKKECEdwards),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
				pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{7, 7}),
			})
		if err != nil {
			return err
		}
		return c.DestroyObject(s, priv)
	})
	if err != nil {
		t.Fatalf("make a lone public key object: %v", err)
	}
	k, err := tok.GenerateKey(ctx, "example.com", "half", hsm.Ed25519)
	if err != nil {
		t.Fatalf("GenerateKey over a lone public key object: %v", err)
	}
	if !strings.Contains(logs.String(), "interrupted generation") {
		t.Errorf("the removal is not logged:\n%s", logs.String())
	}
	var pubs int
	err = hsm.WithRawSession(tok, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		if err := c.FindObjectsInit(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		}); err != nil {
			return err
		}
		hs, _, err := c.FindObjects(s, 10)
		pubs = len(hs)
		_ = c.FindObjectsFinal(s)
		return err
	})
	if err != nil || pubs != 1 {
		t.Fatalf("public key objects labelled %s: %d (%v), want 1", label, pubs, err)
	}
	digest := sha256.Sum256([]byte("probe"))
	sig, err := k.Sign(nil, digest[:], crypto.Hash(0))
	if err != nil || !ed25519.Verify(k.Public().(ed25519.PublicKey), digest[:], sig) {
		t.Fatalf("the new key does not sign: %v", err)
	}
}
