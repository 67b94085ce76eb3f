package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/dkimgw/dkimgw/dnsname"
)

// KeyInfo describes a dkimgw key in the token, with the private key's
// protection attributes as the token reports them.
type KeyInfo struct {
	Domain    string
	Selector  string
	Label     string // "<selector>._domainkey.<domain>", the DNS name of its record
	ID        []byte // CKA_ID shared by the private and public objects
	Algorithm Algorithm
	Bits      int

	Extractable      bool
	Sensitive        bool
	NeverExtractable bool
	AlwaysSensitive  bool
	Local            bool // generated in the token, never imported
	CanSign          bool
	// Other uses of the private key, all of which a DKIM key must lack: a
	// key that may decrypt, unwrap or derive can be used to get secrets out
	// of the token, and signature with recovery is another mechanism.
	CanDecrypt     bool
	CanUnwrap      bool
	CanDerive      bool
	CanSignRecover bool

	// Public is the public key (*rsa.PublicKey or ed25519.PublicKey).
	Public crypto.PublicKey
	// Start is the key's CKA_START_DATE, which some tokens set at
	// generation; zero when the token has none (SoftHSM).
	Start time.Time
}

// IDHex is the key's CKA_ID in hex, as pkcs11-tool prints it.
func (i KeyInfo) IDHex() string { return hex.EncodeToString(i.ID) }

// UnsafeReason says why dkimgw refuses to sign with the key, or "" when
// it may: a key that is or ever was extractable, or that was imported
// rather than generated in the token, may exist outside it; a key that
// may decrypt, unwrap, derive or sign with recovery has uses beyond DKIM
// signing that dkimgw's keys never have.
func UnsafeReason(i KeyInfo) string {
	if i.Algorithm.IsRSA() && i.Bits < minRSABits {
		return fmt.Sprintf("RSA-%d is below the %d-bit floor (RFC 8301)", i.Bits, minRSABits)
	}
	var why []string
	if i.Extractable {
		why = append(why, "it is extractable (CKA_EXTRACTABLE=true)")
	}
	if !i.Sensitive {
		why = append(why, "it is not sensitive (CKA_SENSITIVE=false)")
	}
	if !i.Local {
		why = append(why, "it was not generated in the token (CKA_LOCAL=false)")
	}
	if !i.NeverExtractable && !i.Extractable {
		why = append(why, "it was extractable once (CKA_NEVER_EXTRACTABLE=false)")
	}
	if !i.AlwaysSensitive && i.Sensitive {
		why = append(why, "it was not sensitive once (CKA_ALWAYS_SENSITIVE=false)")
	}
	if !i.CanSign {
		why = append(why, "it may not sign (CKA_SIGN=false)")
	}
	for _, u := range []struct {
		set  bool
		attr string
	}{
		{i.CanDecrypt, "CKA_DECRYPT"},
		{i.CanUnwrap, "CKA_UNWRAP"},
		{i.CanDerive, "CKA_DERIVE"},
		{i.CanSignRecover, "CKA_SIGN_RECOVER"},
	} {
		if u.set {
			why = append(why, "it may do more than sign ("+u.attr+"=true)")
		}
	}
	return strings.Join(why, "; ")
}

// Key is a private key inside the token, usable as a crypto.Signer. Every
// signature is computed by the token; the key never leaves it.
type Key struct {
	token *Token
	info  KeyInfo
	pub   crypto.PublicKey

	mu     sync.Mutex
	handle pkcs11.ObjectHandle
	epoch  uint64 // the token connection handle belongs to; 0 = re-find
	gone   error  // ErrKeyNotFound once found gone from a healthy token
}

var _ crypto.Signer = (*Key)(nil)

// Info describes the key.
func (k *Key) Info() KeyInfo { return k.info }

// Public returns the public key read from the token: *rsa.PublicKey or
// ed25519.PublicKey.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// keyLabel checks and normalises a key's domain and selector with
// dnsname, dkimgw's one definition of both, and returns the key's label.
// It touches nothing, so a bad name is refused before any token call.
func keyLabel(domain, selector string) (label, d, s string, err error) {
	d, s, err = dnsname.Key(domain, selector)
	if err != nil {
		if ne, ok := errors.AsType[*dnsname.Error](err); ok {
			return "", "", "", fmt.Errorf("hsm: %w: %s", ErrInvalidName, ne.Detail())
		}
		return "", "", "", fmt.Errorf("hsm: %w: %v", ErrInvalidName, err)
	}
	return RecordName(d, s), d, s, nil
}

// parseLabel splits a key label back into domain and selector.
func parseLabel(label string) (domain, selector string, ok bool) {
	selector, domain, ok = strings.Cut(label, "._domainkey.")
	return domain, selector, ok && domain != "" && selector != ""
}

// GenerateKey generates a key pair inside the token for (domain,
// selector). The private key is sensitive, non-extractable and may only
// sign. A second key for the same (domain, selector) is ErrKeyExists.
func (t *Token) GenerateKey(ctx context.Context, domain, selector string, alg Algorithm) (*Key, error) {
	label, domain, selector, err := keyLabel(domain, selector)
	if err != nil {
		return nil, err
	}
	if _, err := ParseAlgorithm(string(alg)); err != nil {
		return nil, err
	}
	return t.generate(ctx, domain, selector, label, alg)
}

// generate generates the pair labelled label; domain and selector are
// "" for a key that is not a DKIM key (the audit key).
func (t *Token) generate(ctx context.Context, domain, selector, label string, alg Algorithm) (*Key, error) {
	if err := t.checkMechanisms(alg); err != nil {
		return nil, err
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, errorf("random key id: %w", err)
	}
	genMech, pubTmpl, privTmpl := keyTemplates(alg, label, id)
	orphans := 0
	err := t.do(ctx, "generate "+label, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		// Checked inside the operation so that a retry after recovery
		// finds the pair a first attempt may have created before its
		// answer was lost, instead of creating a second one.
		privs, pubs, err := findByLabel(c, s, label)
		if err != nil {
			return err
		}
		if len(privs) == 0 && len(pubs) > 0 {
			// Public objects without a private key are what a generation
			// interrupted by a crash leaves (SoftHSM stores the public
			// half first). They hold no secret and no key can use them;
			// left in place they would block the selector for good.
			for _, h := range pubs {
				if err := c.DestroyObject(s, h); err != nil {
					return errorf("remove the public key object of %s left by an interrupted generation: %w", label, err)
				}
			}
			orphans += len(pubs)
			pubs = nil
		}
		for _, h := range append(privs, pubs...) {
			got, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)})
			if err != nil || !bytes.Equal(got[0].Value, id) {
				return errorf("%w: the token already holds %s; pick another selector, or destroy it first", ErrKeyExists, label)
			}
		}
		if len(privs) > 0 {
			return nil
		}
		_, _, err = c.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(genMech, nil)}, pubTmpl, privTmpl)
		if err != nil {
			return errorf("generate %s key pair %s: %w", alg, label, err)
		}
		return nil
	}, nil)
	if err != nil {
		return nil, err
	}
	if orphans > 0 {
		t.log.Warn("removed public key objects without a private key, left by an interrupted generation", "label", label, "objects", orphans)
	}
	t.log.Info("key generated", "label", label, "algorithm", string(alg), "id", hex.EncodeToString(id))
	return t.loadKey(ctx, domain, selector, label)
}

func (t *Token) checkMechanisms(alg Algorithm) error {
	name := t.Info().Label
	if alg == Ed25519 {
		if _, ok := t.hasMechanism(ckmECEdwardsKeyPairGen); !ok {
			return errorf("%w: token %q has no CKM_EC_EDWARDS_KEY_PAIR_GEN, so it cannot generate Ed25519 keys; use rsa-2048, or a token (or firmware) with EdDSA support", ErrMechanismMissing, name)
		}
		if _, ok := t.hasMechanism(ckmEdDSA); !ok {
			return errorf("%w: token %q has no CKM_EDDSA, so it cannot sign with Ed25519 keys; use rsa-2048", ErrMechanismMissing, name)
		}
		return nil
	}
	mi, ok := t.hasMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN)
	if !ok {
		return errorf("%w: token %q has no CKM_RSA_PKCS_KEY_PAIR_GEN (RSA key generation)", ErrMechanismMissing, name)
	}
	if bits := uint(alg.Bits()); mi.MaxKeySize != 0 && (bits < mi.MinKeySize || bits > mi.MaxKeySize) {
		return errorf("%w: token %q generates RSA keys of %d to %d bits, not %d", ErrMechanismMissing, name, mi.MinKeySize, mi.MaxKeySize, bits)
	}
	if _, ok := t.hasMechanism(pkcs11.CKM_RSA_PKCS); !ok {
		return errorf("%w: token %q has no CKM_RSA_PKCS (RSA PKCS#1 v1.5 signing)", ErrMechanismMissing, name)
	}
	return nil
}

// ed25519Params is the DER encoding of the OID id-Ed25519 (1.3.101.112),
// the CKA_EC_PARAMS of an Ed25519 key (PKCS#11 v3.0 §2.3.6).
var ed25519Params = []byte{0x06, 0x03, 0x2b, 0x65, 0x70}

// keyTemplates returns the generation mechanism and the attributes of the
// pair: docs/architecture.md, "Keys in the token". The private key may sign and do
// nothing else; the public key may verify and do nothing else.
func keyTemplates(alg Algorithm, label string, id []byte) (uint, []*pkcs11.Attribute, []*pkcs11.Attribute) {
	pub := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	priv := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	if alg == Ed25519 {
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ckkECEdwards),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, ed25519Params))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, ckkECEdwards))
		return ckmECEdwardsKeyPairGen, pub, priv
	}
	pub = append(pub,
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, alg.Bits()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{0x01, 0x00, 0x01}))
	priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA))
	return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pub, priv
}

// findByLabel returns the private and public key objects with label.
func findByLabel(c *pkcs11.Ctx, s pkcs11.SessionHandle, label string) (privs, pubs []pkcs11.ObjectHandle, err error) {
	privs, err = findObjects(c, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
	if err != nil {
		return nil, nil, err
	}
	pubs, err = findObjects(c, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
	return privs, pubs, err
}

func findObjects(c *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(s, tmpl); err != nil {
		return nil, errorf("find objects: %w", err)
	}
	var all []pkcs11.ObjectHandle
	for {
		hs, _, err := c.FindObjects(s, 64)
		if err != nil {
			_ = c.FindObjectsFinal(s)
			return nil, errorf("find objects: %w", err)
		}
		all = append(all, hs...)
		if len(hs) < 64 {
			break
		}
	}
	if err := c.FindObjectsFinal(s); err != nil {
		return nil, errorf("find objects: %w", err)
	}
	return all, nil
}

// readAttr reads one attribute. Tokens fail a whole C_GetAttributeValue
// when any one attribute is sensitive or unknown, so attributes are read
// one at a time.
func readAttr(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) ([]byte, error) {
	attrs, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	if err != nil {
		return nil, err
	}
	return attrs[0].Value, nil
}

func readBool(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) (bool, error) {
	v, err := readAttr(c, s, h, typ)
	if err != nil {
		return false, err
	}
	return len(v) == 1 && v[0] != 0, nil
}

func readUint(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, typ uint) (uint, error) {
	v, err := readAttr(c, s, h, typ)
	if err != nil {
		return 0, err
	}
	// CK_ULONG in the platform's byte order (little-endian on every
	// platform dkimgw builds for).
	var n uint
	for i := len(v) - 1; i >= 0; i-- {
		n = n<<8 | uint(v[i])
	}
	return n, nil
}

// describe reads a private key's attributes and its public key (from the
// public object with the same id, or, for RSA, from the private object,
// which carries the modulus too).
func describe(c *pkcs11.Ctx, s pkcs11.SessionHandle, priv pkcs11.ObjectHandle, pubs []pkcs11.ObjectHandle) (KeyInfo, crypto.PublicKey, error) {
	var info KeyInfo
	label, err := readAttr(c, s, priv, pkcs11.CKA_LABEL)
	if err != nil {
		return info, nil, errorf("read key label: %w", err)
	}
	info.Label = string(label)
	info.Domain, info.Selector, _ = parseLabel(info.Label)
	if info.ID, err = readAttr(c, s, priv, pkcs11.CKA_ID); err != nil {
		return info, nil, errorf("read CKA_ID of %s: %w", info.Label, err)
	}
	for _, a := range []struct {
		typ uint
		dst *bool
	}{
		{pkcs11.CKA_EXTRACTABLE, &info.Extractable},
		{pkcs11.CKA_SENSITIVE, &info.Sensitive},
		{pkcs11.CKA_NEVER_EXTRACTABLE, &info.NeverExtractable},
		{pkcs11.CKA_ALWAYS_SENSITIVE, &info.AlwaysSensitive},
		{pkcs11.CKA_LOCAL, &info.Local},
		{pkcs11.CKA_SIGN, &info.CanSign},
	} {
		if *a.dst, err = readBool(c, s, priv, a.typ); err != nil {
			return info, nil, errorf("read attribute 0x%x of %s: %w", a.typ, info.Label, err)
		}
	}
	// A token may not know an attribute for a key type (SoftHSM and
	// CKA_SIGN_RECOVER of an Ed25519 key): unknown means the key cannot.
	for _, a := range []struct {
		typ uint
		dst *bool
	}{
		{pkcs11.CKA_DECRYPT, &info.CanDecrypt},
		{pkcs11.CKA_UNWRAP, &info.CanUnwrap},
		{pkcs11.CKA_DERIVE, &info.CanDerive},
		{pkcs11.CKA_SIGN_RECOVER, &info.CanSignRecover},
	} {
		*a.dst, err = readBool(c, s, priv, a.typ)
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)) {
			*a.dst, err = false, nil
		}
		if err != nil {
			return info, nil, errorf("read attribute 0x%x of %s: %w", a.typ, info.Label, err)
		}
	}
	// CK_DATE is "YYYYMMDD"; a token that does not keep it answers
	// nothing, or blanks.
	if d, err := readAttr(c, s, priv, pkcs11.CKA_START_DATE); err == nil && len(d) == 8 {
		info.Start, _ = time.Parse("20060102", string(d))
	}
	keyType, err := readUint(c, s, priv, pkcs11.CKA_KEY_TYPE)
	if err != nil {
		return info, nil, errorf("read key type of %s: %w", info.Label, err)
	}
	var pubObj pkcs11.ObjectHandle
	havePub := false
	for _, p := range pubs {
		if id, err := readAttr(c, s, p, pkcs11.CKA_ID); err == nil && bytes.Equal(id, info.ID) {
			pubObj, havePub = p, true
			break
		}
	}
	switch keyType {
	case pkcs11.CKK_RSA:
		src := priv
		if havePub {
			src = pubObj
		}
		n, err := readAttr(c, s, src, pkcs11.CKA_MODULUS)
		if err != nil {
			return info, nil, errorf("read modulus of %s: %w", info.Label, err)
		}
		e, err := readAttr(c, s, src, pkcs11.CKA_PUBLIC_EXPONENT)
		if err != nil {
			return info, nil, errorf("read public exponent of %s: %w", info.Label, err)
		}
		exp := new(big.Int).SetBytes(e)
		if !exp.IsInt64() || exp.Int64() > 1<<31-1 || exp.Int64() < 3 {
			return info, nil, errorf("%s has an unusable RSA public exponent", info.Label)
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(exp.Int64())}
		info.Bits = pub.N.BitLen()
		info.Algorithm = Algorithm(fmt.Sprintf("rsa-%d", info.Bits))
		return info, pub, nil
	case ckkECEdwards:
		if !havePub {
			return info, nil, errorf("%s has no public key object with CKA_ID %x; the Ed25519 public key cannot be read from the private one", info.Label, info.ID)
		}
		point, err := readAttr(c, s, pubObj, pkcs11.CKA_EC_POINT)
		if err != nil {
			return info, nil, errorf("read EC point of %s: %w", info.Label, err)
		}
		pub, err := parseEd25519Point(point)
		if err != nil {
			return info, nil, errorf("%s: %w", info.Label, err)
		}
		info.Bits = 256
		info.Algorithm = Ed25519
		return info, pub, nil
	default:
		return info, nil, errorf("%s has key type 0x%x; dkimgw signs with RSA and Ed25519 only", info.Label, keyType)
	}
}

// parseEd25519Point decodes CKA_EC_POINT: a DER OCTET STRING (SoftHSM,
// PKCS#11 v3.0) or the raw 32 bytes (some HSMs). Anything else, such as an
// Ed448 point, is refused.
func parseEd25519Point(point []byte) (ed25519.PublicKey, error) {
	switch {
	case len(point) == ed25519.PublicKeySize+2 && point[0] == 0x04 && point[1] == ed25519.PublicKeySize:
		return ed25519.PublicKey(bytes.Clone(point[2:])), nil
	case len(point) == ed25519.PublicKeySize:
		return ed25519.PublicKey(bytes.Clone(point)), nil
	}
	return nil, fmt.Errorf("EC point of %d bytes is not an Ed25519 public key", len(point))
}

// Key returns the key for (domain, selector), ready to sign. A key that
// is or was extractable, or was not generated in the token, is refused
// with ErrUnsafeKey.
func (t *Token) Key(ctx context.Context, domain, selector string) (*Key, error) {
	label, domain, selector, err := keyLabel(domain, selector)
	if err != nil {
		return nil, err
	}
	return t.loadKey(ctx, domain, selector, label)
}

func (t *Token) loadKey(ctx context.Context, domain, selector, label string) (*Key, error) {
	k := &Key{token: t}
	err := t.do(ctx, "find "+label, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error {
		privs, pubs, err := findByLabel(c, s, label)
		if err != nil {
			return err
		}
		switch len(privs) {
		case 0:
			hint := "generate one with 'dkimgw keys generate'"
			if label == AuditKeyLabel {
				hint = "'dkimgw serve' generates it on first use"
			}
			return errorf("%w: no private key labelled %s in token %q; %s", ErrKeyNotFound, label, t.Info().Label, hint)
		case 1:
		default:
			return errorf("%d private keys are labelled %s; destroy the extra ones with pkcs11-tool", len(privs), label)
		}
		info, pub, err := describe(c, s, privs[0], pubs)
		if err != nil {
			return err
		}
		info.Domain, info.Selector, info.Public = domain, selector, pub
		k.info, k.pub, k.handle, k.epoch = info, pub, privs[0], epoch
		return nil
	}, nil)
	if err != nil {
		return nil, err
	}
	if k.info.Algorithm.IsRSA() && k.info.Bits < minRSABits {
		return nil, errorf("%w: %s is RSA-%d; RSA keys below %d bits are refused (RFC 8301)", ErrWeakKey, label, k.info.Bits, minRSABits)
	}
	if why := UnsafeReason(k.info); why != "" {
		return nil, errorf("%w: %s: %s; generate a new key with 'dkimgw keys generate'", ErrUnsafeKey, label, why)
	}
	if mech := t.MissingSignMechanism(k.info.Algorithm); mech != "" {
		return nil, errorf("%w: %s is %s, but token %q does not offer %s, the mechanism that signs with it (p11-kit's client, for one, carries no EdDSA); use an RSA selector", ErrMechanismMissing, label, k.info.Algorithm, t.Info().Label, mech)
	}
	return k, nil
}

// MissingSignMechanism returns the name of the mechanism dkimgw signs
// with keys of alg when the token does not offer it, else "". A key can
// be in a token that cannot sign with it: a module in front of the
// token, such as p11-kit's client, may pass only some mechanisms on.
func (t *Token) MissingSignMechanism(alg Algorithm) string {
	if alg == Ed25519 {
		if _, ok := t.hasMechanism(ckmEdDSA); !ok {
			return "CKM_EDDSA"
		}
		return ""
	}
	if _, ok := t.hasMechanism(pkcs11.CKM_RSA_PKCS); !ok {
		return "CKM_RSA_PKCS"
	}
	return ""
}

// Keys lists every dkimgw key in the token (private keys labelled
// "<selector>._domainkey.<domain>"), unsafe ones included, so that an
// audit shows them.
func (t *Token) Keys(ctx context.Context) ([]KeyInfo, error) {
	var infos []KeyInfo
	err := t.do(ctx, "list keys", func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		infos = infos[:0]
		privs, err := findObjects(c, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY)})
		if err != nil {
			return err
		}
		pubs, err := findObjects(c, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY)})
		if err != nil {
			return err
		}
		for _, h := range privs {
			label, err := readAttr(c, s, h, pkcs11.CKA_LABEL)
			if err != nil {
				return errorf("read key label: %w", err)
			}
			if _, _, ok := parseLabel(string(label)); !ok {
				continue
			}
			info, pub, err := describe(c, s, h, pubs)
			if err != nil {
				return err
			}
			info.Public = pub
			infos = append(infos, info)
		}
		return nil
	}, nil)
	return infos, err
}

// DestroyKey destroys both objects of the key for (domain, selector).
func (t *Token) DestroyKey(ctx context.Context, domain, selector string) error {
	label, _, _, err := keyLabel(domain, selector)
	if err != nil {
		return err
	}
	destroyed := 0
	err = t.do(ctx, "destroy "+label, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		privs, pubs, err := findByLabel(c, s, label)
		if err != nil {
			return err
		}
		for _, h := range append(privs, pubs...) {
			if err := c.DestroyObject(s, h); err != nil {
				return errorf("destroy object of %s: %w", label, err)
			}
			destroyed++
		}
		return nil
	}, nil)
	if err != nil {
		return err
	}
	if destroyed == 0 {
		return errorf("%w: no key labelled %s in token %q", ErrKeyNotFound, label, t.Info().Label)
	}
	t.log.Info("key destroyed", "label", label, "objects", destroyed)
	return nil
}

// sha256DigestInfo is the DER prefix of a DigestInfo for SHA-256 (RFC 8017
// §9.2 note 1): CKM_RSA_PKCS over it plus the digest is PKCS#1 v1.5
// signing of a hash the caller computed.
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// Sign signs with the token key, bounded by the token's sign timeout. See
// SignContext.
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), k.token.signTimeout)
	defer cancel()
	return k.SignContext(ctx, digest, opts)
}

// SignContext signs in the token. For RSA keys digest is a SHA-256 hash and
// opts.HashFunc() is crypto.SHA256 (PKCS#1 v1.5). For Ed25519 keys
// opts.HashFunc() is 0 and digest is the message itself (pure Ed25519;
// DKIM's ed25519-sha256 passes the SHA-256 of the header data as the
// message, RFC 8463). ctx bounds the wait for a session and the token
// call; C_Sign cannot be interrupted, so on timeout the call finishes in
// the background and its session returns to the pool then. Every
// signature is verified against the public key before it is returned: a
// faulty RSA-CRT signature would give the private key away.
func (k *Key) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var (
		mech  uint
		input []byte
	)
	switch k.pub.(type) {
	case *rsa.PublicKey:
		if _, pss := opts.(*rsa.PSSOptions); pss || opts.HashFunc() != crypto.SHA256 || len(digest) != 32 {
			return nil, errorf("%s: %w: RSA keys sign 32-byte SHA-256 digests with PKCS#1 v1.5", k.info.Label, ErrUnsupportedRequest)
		}
		mech, input = pkcs11.CKM_RSA_PKCS, append(bytes.Clone(sha256DigestInfo), digest...)
	case ed25519.PublicKey:
		if opts.HashFunc() != 0 {
			return nil, errorf("%s: %w: Ed25519 keys sign the message itself (HashFunc 0), not a %v digest", k.info.Label, ErrUnsupportedRequest, opts.HashFunc())
		}
		mech, input = ckmEdDSA, digest
	default:
		return nil, errorf("%s: %w: unknown key type", k.info.Label, ErrUnsupportedRequest)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, k.token.signTimeout)
		defer cancel()
	}
	type result struct {
		sig []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		sig, err := k.sign(ctx, mech, input)
		done <- result{sig, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		return nil, temporary(errorf("sign with %s: %w", k.info.Label, ctx.Err()))
	}
	if r.err != nil {
		return nil, r.err
	}
	if err := k.verify(digest, r.sig); err != nil {
		k.token.log.Error("token returned an invalid signature", "label", k.info.Label)
		return nil, temporary(err)
	}
	return r.sig, nil
}

func (k *Key) sign(ctx context.Context, mech uint, input []byte) ([]byte, error) {
	if err := k.Err(); err != nil {
		return nil, err
	}
	var sig []byte
	err := k.token.do(ctx, "sign with "+k.info.Label, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error {
		h, err := k.handleFor(c, s, epoch)
		if err != nil {
			return err
		}
		if err := c.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, h); err != nil {
			return errorf("sign with %s: %w", k.info.Label, err)
		}
		sig, err = c.Sign(s, input)
		if err != nil {
			return errorf("sign with %s: %w", k.info.Label, err)
		}
		return nil
	}, k.refind)
	return sig, err
}

// handleFor returns the private key's handle in the connection epoch,
// finding it again after a reconnect: handles do not survive a re-login.
// A key absent from a session that is logged in, on a token that answers,
// is gone (destroyed, or replaced by a key with another CKA_ID): that is
// ErrKeyNotFound, remembered, and no reason to reconnect. Absent from a
// session that is not logged in, it is errKeyGone, which recovery
// escalates.
func (k *Key) handleFor(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) (pkcs11.ObjectHandle, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gone != nil {
		return 0, k.gone
	}
	if k.epoch == epoch {
		return k.handle, nil
	}
	privs, err := findObjects(c, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, k.info.Label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, k.info.ID),
	})
	if err != nil {
		return 0, err
	}
	if len(privs) == 0 && k.token.healthy(c, s) {
		k.gone = errorf("%w: %s (id %x) is no longer in token %q: it was destroyed or replaced", ErrKeyNotFound, k.info.Label, k.info.ID, k.token.Info().Label)
		k.token.log.Error("key gone from the token", "label", k.info.Label, "domain", k.info.Domain, "selector", k.info.Selector, "id", k.info.IDHex())
		return 0, k.gone
	}
	if len(privs) != 1 {
		return 0, errorf("%s (id %x): %d private keys found: %w", k.info.Label, k.info.ID, len(privs), errKeyGone)
	}
	k.handle, k.epoch = privs[0], epoch
	return k.handle, nil
}

// Err is ErrKeyNotFound once the key was found gone from the token
// (destroyed or replaced), else nil. A gone key fails every signature at
// once, without calling the token; look the selector up again with
// Token.Key to use a key that replaced it.
func (k *Key) Err() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.gone
}

// refind forgets the cached handle and finds it again, for recovery.
func (k *Key) refind(ctx context.Context) error {
	k.mu.Lock()
	k.epoch = 0
	k.mu.Unlock()
	_, err := k.token.withSession(ctx, func(c *pkcs11.Ctx, s pkcs11.SessionHandle, epoch uint64) error {
		_, err := k.handleFor(c, s, epoch)
		return err
	})
	return err
}

func (k *Key) verify(digest, sig []byte) error {
	switch pub := k.pub.(type) {
	case *rsa.PublicKey:
		if rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest, sig) != nil {
			return errorf("sign with %s: %w", k.info.Label, ErrInvalidSignature)
		}
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errorf("sign with %s: %w", k.info.Label, ErrInvalidSignature)
		}
	}
	return nil
}
