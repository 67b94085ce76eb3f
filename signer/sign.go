package signer

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/dnsname"
)

// signedHeaders are the fields signed when present, in h= order
// (docs/architecture.md, "Signing defaults"; RFC 6376 §5.4.1). They are what a reader
// sees and what DMARC, list handling (RFC 2369, RFC 8058) and feedback
// loops rely on. Trace and transport fields (Received, Return-Path) are
// left out: relays add and rewrite them.
var signedHeaders = []string{
	"From", "Reply-To", "Sender", "To", "Cc", "Subject", "Date", "Message-ID",
	"In-Reply-To", "References", "MIME-Version", "Content-Type",
	"Content-Transfer-Encoding", "List-Id", "List-Unsubscribe",
	"List-Unsubscribe-Post", "Feedback-ID",
}

// oversignedHeaders get one more h= entry than they have instances, even
// when absent, so that adding one after signing breaks the signature
// (RFC 6376 §5.4.2, §8.15): a second From or Subject would change what
// the reader sees, an added Reply-To or List-Unsubscribe where replies
// and unsubscriptions go, an added Content-Type or MIME-Version how the
// body is rendered. Threading and trace fields are not oversigned: some
// list managers legitimately add them.
var oversignedHeaders = map[string]bool{
	"from": true, "subject": true, "date": true, "to": true, "cc": true,
	"reply-to": true, "sender": true, "content-type": true,
	"mime-version": true, "list-unsubscribe": true, "list-unsubscribe-post": true,
}

// Identity is one signature to make: d=Domain, s=Selector, signed with Key.
type Identity struct {
	// Domain is the signing domain (d=), ASCII or UTF-8, valid for
	// [dnsname.Domain]; it is written lower-case, in A-label form.
	Domain string
	// Selector is the key's selector (s=), valid for [dnsname.Selector];
	// it is written lower-case, in A-label form.
	Selector string
	// Key is the private key: an RSA key of at least 1024 bits (RFC 8301;
	// dkimgw's tokens refuse less than 2048) gives rsa-sha256, an Ed25519
	// key gives ed25519-sha256 (RFC 8463). If Key also has a method
	// SignContext(ctx, digest, opts), Sign calls that with its ctx.
	//
	// Sign does not verify the signatures a key returns: that is the
	// key's job, done where a fault can be reported for what it is (a
	// faulty RSA-CRT signature gives the private key away). crypto/rsa
	// and hsm.Key verify before returning; another Key must too.
	Key crypto.Signer
}

// Options configures Sign. The zero value signs with the defaults.
type Options struct {
	// Expire sets x= to t= plus Expire, rounded up to whole seconds. Zero
	// means no x=; a negative value is an error.
	Expire time.Duration
	// Now returns the signing time (t=). Nil means time.Now. All
	// signatures of one Sign call share one t=.
	Now func() time.Time
}

// contextSigner is a key whose signing can be bounded by a context, e.g.
// while it waits for a token session (hsm.Key is one).
type contextSigner interface {
	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

// Sign returns one DKIM-Signature field per identity, in the order given,
// each complete, folded and ending in CRLF. Prepend them with WriteSigned.
//
// An error from an identity's key is returned wrapped with %w, so callers
// can classify it (e.g. as a temporary token failure).
func Sign(ctx context.Context, m *Message, ids []Identity, opts Options) ([]string, error) {
	if len(ids) == 0 {
		return nil, errors.New("signer: no identity to sign with")
	}
	if opts.Expire < 0 {
		return nil, fmt.Errorf("signer: negative expiry %v", opts.Expire)
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	t := now().Unix()
	var x int64
	if opts.Expire > 0 {
		x = t + int64((opts.Expire+time.Second-1)/time.Second)
	}
	keys := headerKeys(m.fields)
	canonHeaders := canonicalHeaders(m.fields, keys)
	bh := base64.StdEncoding.EncodeToString(m.bodyHash)

	fields := make([]string, 0, len(ids))
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("signer: %w", err)
		}
		f, err := signOne(ctx, id, canonHeaders, signatureTags{t: t, x: x, h: keys, bh: bh})
		if err != nil {
			return nil, err
		}
		fields = append(fields, f)
	}
	return fields, nil
}

func signOne(ctx context.Context, id Identity, canonHeaders string, tags signatureTags) (string, error) {
	if id.Key == nil {
		return "", fmt.Errorf("signer: no key for selector %q of %q", id.Selector, id.Domain)
	}
	// d= and s= follow dkimgw's one definition of names, the one the
	// configuration and the token use.
	d, sel, err := dnsname.Key(id.Domain, id.Selector)
	if err != nil {
		if ne, ok := errors.AsType[*dnsname.Error](err); ok {
			return "", fmt.Errorf("signer: identity: %s", ne.Detail())
		}
		return "", fmt.Errorf("signer: identity: %w", err)
	}
	tags.d, tags.s = d, sel
	pub := id.Key.Public()
	var hashOpt crypto.Hash
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if pub.N.BitLen() < 1024 {
			return "", fmt.Errorf("signer: RSA key of %s has %d bits; RFC 8301 requires at least 1024", tags.name(), pub.N.BitLen())
		}
		tags.a, hashOpt = "rsa-sha256", crypto.SHA256
	case ed25519.PublicKey:
		// RFC 8463 §3: the SHA-256 of the header data is the message
		// Ed25519 signs; it must not be hashed again.
		tags.a, hashOpt = "ed25519-sha256", crypto.Hash(0)
	default:
		return "", fmt.Errorf("signer: key of %s has unsupported type %T", tags.name(), pub)
	}

	unsigned := tags.format()
	// RFC 6376 §3.7: the header hash covers the signed fields, then this
	// field with an empty b= and without its final CRLF.
	digest := sha256.Sum256([]byte(canonHeaders + strings.TrimSuffix(relaxedHeader(unsigned), "\r\n")))
	var sig []byte
	if cs, ok := id.Key.(contextSigner); ok {
		sig, err = cs.SignContext(ctx, digest[:], hashOpt)
	} else {
		sig, err = id.Key.Sign(rand.Reader, digest[:], hashOpt)
	}
	if err != nil {
		return "", fmt.Errorf("signer: sign as %s: %w", tags.name(), err)
	}
	return unsigned + foldBase64(base64.StdEncoding.EncodeToString(sig)) + "\r\n", nil
}

// headerKeys returns the h= list for a header section: each field of
// signedHeaders once per instance present, plus the oversign entries.
func headerKeys(fields []headerField) []string {
	count := make(map[string]int, len(fields))
	for _, f := range fields {
		count[strings.ToLower(f.name)]++
	}
	var keys []string
	for _, name := range signedHeaders {
		k := strings.ToLower(name)
		n := count[k]
		if oversignedHeaders[k] {
			n++
		}
		for range n {
			keys = append(keys, k)
		}
	}
	return keys
}

// canonicalHeaders returns the relaxed-canonical header data for keys
// (RFC 6376 §5.4.2): each name picks the last instance not yet picked,
// counting from the bottom; a name with no instance left adds nothing.
func canonicalHeaders(fields []headerField, keys []string) string {
	byName := make(map[string][]int)
	for i, f := range fields {
		k := strings.ToLower(f.name)
		byName[k] = append(byName[k], i)
	}
	var b strings.Builder
	for _, k := range keys {
		idx := byName[k]
		if len(idx) == 0 {
			continue
		}
		b.WriteString(relaxedHeader(fields[idx[len(idx)-1]].raw))
		byName[k] = idx[:len(idx)-1]
	}
	return b.String()
}

// relaxedHeader is the "relaxed" header canonicalization (RFC 6376
// §3.4.2) of one raw field: lower-case name, no whitespace around the
// colon, unfolded, whitespace runs as one SP, none at the end; then CRLF.
func relaxedHeader(raw string) string {
	name, value, _ := strings.Cut(raw, ":")
	var b strings.Builder
	b.Grow(len(raw))
	b.WriteString(strings.ToLower(strings.TrimRight(name, " \t")))
	b.WriteByte(':')
	wsp, started := false, false
	for i := 0; i < len(value); i++ {
		switch c := value[i]; c {
		case '\r', '\n':
			// Unfolding removes the CRLF; the WSP after it remains.
		case ' ', '\t':
			wsp = true
		default:
			if wsp && started {
				b.WriteByte(' ')
			}
			wsp, started = false, true
			b.WriteByte(c)
		}
	}
	b.WriteString("\r\n")
	return b.String()
}

// signatureTags are the tags of one DKIM-Signature field but b=.
type signatureTags struct {
	a, d, s string
	t, x    int64 // x == 0: no x=
	h       []string
	bh      string
}

func (t signatureTags) name() string { return fmt.Sprintf("s=%s d=%s", t.s, t.d) }

// Folding targets (RFC 5322 §2.1.1): lines SHOULD be at most 78
// characters and MUST be at most 998, both without the CRLF.
const foldWidth = 78

// format renders the field up to and including "b=", folded. The b=
// value goes last so that it can be folded anywhere (RFC 6376 §3.5: FWS
// inside it is ignored); every other fold lies between tags or after a
// colon in h=, where RFC 6376 §3.5 allows FWS. The header hash covers
// exactly this text, so verifiers see the folds that were signed.
func (t signatureTags) format() string {
	var f folder
	f.b.WriteString("DKIM-Signature:")
	f.token("v=1;")
	f.token("a=" + t.a + ";")
	f.token("c=relaxed/relaxed;")
	f.token("d=" + t.d + ";")
	f.token("s=" + t.s + ";")
	f.token("t=" + strconv.FormatInt(t.t, 10) + ";")
	if t.x != 0 {
		f.token("x=" + strconv.FormatInt(t.x, 10) + ";")
	}
	// h= is folded after its colons: "h=from:to:\r\n subject:...".
	for i, k := range t.h {
		tok := k + ":"
		if i == 0 {
			tok = "h=" + tok
		}
		if i == len(t.h)-1 {
			tok = strings.TrimSuffix(tok, ":") + ";"
		}
		if i == 0 {
			f.token(tok)
		} else {
			f.glued(tok)
		}
	}
	f.token("bh=" + t.bh + ";")
	f.newLine()
	f.b.WriteString(" b=")
	return f.b.String()
}

// folder writes tokens separated by SP, starting a continuation line
// when the next one would pass foldWidth.
type folder struct {
	b    strings.Builder
	line int // offset in b where the current line starts
}

func (f *folder) newLine() {
	f.b.WriteString("\r\n")
	f.line = f.b.Len()
}

// token writes " tok", on a new line if it does not fit on this one.
func (f *folder) token(tok string) {
	if f.b.Len()-f.line+1+len(tok) > foldWidth {
		f.newLine()
	}
	f.b.WriteString(" " + tok)
}

// glued writes tok right after the previous one, or on a new line.
func (f *folder) glued(tok string) {
	if f.b.Len()-f.line+len(tok) > foldWidth {
		f.newLine()
		f.b.WriteByte(' ')
	}
	f.b.WriteString(tok)
}

// foldBase64 folds the b= value, which follows " b=" on its line.
func foldBase64(v string) string {
	var b strings.Builder
	width := foldWidth - len(" b=")
	for len(v) > width {
		b.WriteString(v[:width])
		b.WriteString("\r\n ")
		v = v[width:]
		width = foldWidth - 1
	}
	b.WriteString(v)
	return b.String()
}

// WriteSigned writes fields (from Sign) and then the normalised message
// to w, and returns the number of bytes written.
func WriteSigned(w io.Writer, fields []string, m *Message) (int64, error) {
	var n int64
	for _, f := range fields {
		k, err := io.WriteString(w, f)
		n += int64(k)
		if err != nil {
			return n, fmt.Errorf("signer: write signed message: %w", err)
		}
	}
	r, err := m.Open()
	if err != nil {
		return n, err
	}
	defer r.Close()
	if sr, ok := r.(*sourceReader); ok {
		// Its errors say whether reading the source or writing failed.
		k, err := sr.WriteTo(w)
		return n + k, err
	}
	k, err := io.Copy(w, r)
	n += k
	if err != nil {
		return n, fmt.Errorf("signer: write signed message: %w", err)
	}
	return n, nil
}

// Algorithm is the a= tag a signature by k carries: "rsa-sha256" or
// "ed25519-sha256" ("unknown" for a key Sign refuses). Reports and
// metrics name signatures by it.
func Algorithm(k crypto.Signer) string {
	switch k.Public().(type) {
	case *rsa.PublicKey:
		return "rsa-sha256"
	case ed25519.PublicKey:
		return "ed25519-sha256"
	}
	return "unknown"
}
