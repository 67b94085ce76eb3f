package signer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"io"
	"math/big"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
)

var update = flag.Bool("update", false, "rewrite the known-answer golden file")

// katTime is the fixed signing time of the known-answer test.
var katTime = time.Date(2024, 3, 12, 9, 15, 0, 0, time.UTC)

// katMessage is RFC 8463 Appendix A.3's example message.
const katMessage = "From: Joe SixPack <joe@football.example.com>\r\n" +
	"To: Suzie Q <suzie@shopping.example.net>\r\n" +
	"Subject: Is dinner ready?\r\n" +
	"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n" +
	"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n" +
	"\r\n" +
	"Hi.\r\n" +
	"\r\n" +
	"We lost the game.  Are you hungry yet?\r\n" +
	"\r\n" +
	"Joe.\r\n"

// testKeys returns the known-answer keys: an RSA-2048 key made for this
// test, and RFC 8463 Appendix A's Ed25519 key.
func testKeys(t testing.TB) (*rsa.PrivateKey, ed25519.PrivateKey) {
	t.Helper()
	b, err := os.ReadFile("testdata/kat-rsa2048.pem")
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := base64.StdEncoding.DecodeString("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
	if err != nil {
		t.Fatal(err)
	}
	return k.(*rsa.PrivateKey), ed25519.NewKeyFromSeed(seed)
}

// lookupTXT answers go-msgauth's key queries for the test keys under
// s=rsa and s=ed of any domain.
func lookupTXT(rsaKey *rsa.PrivateKey, edKey ed25519.PrivateKey) func(string) ([]string, error) {
	der, err := x509.MarshalPKIXPublicKey(rsaKey.Public())
	if err != nil {
		panic(err)
	}
	return func(name string) ([]string, error) {
		switch {
		case strings.HasPrefix(name, "rsa._domainkey."):
			return []string{"v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)}, nil
		case strings.HasPrefix(name, "ed._domainkey."):
			return []string{"v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(edKey.Public().(ed25519.PublicKey))}, nil
		}
		return nil, errors.New("no such record")
	}
}

func signString(t testing.TB, msg string, ids []Identity, opts Options) string {
	t.Helper()
	m, err := Spool(context.Background(), strings.NewReader(msg), SpoolOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	fields, err := Sign(context.Background(), m, ids, opts)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	n, err := WriteSigned(&b, fields, m)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(b.Len()) {
		t.Errorf("WriteSigned returned %d, wrote %d", n, b.Len())
	}
	return b.String()
}

// TestKnownAnswer pins the exact output for fixed keys and a fixed
// clock: RSA PKCS#1 v1.5 and Ed25519 signatures are deterministic, so any
// change in canonicalization, header selection, tag order or folding
// shows up here. go-msgauth must verify the golden output.
func TestKnownAnswer(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	got := signString(t, katMessage, []Identity{
		{Domain: "football.example.com", Selector: "rsa", Key: rsaKey},
		{Domain: "football.example.com", Selector: "ed", Key: edKey},
	}, Options{Now: func() time.Time { return katTime }})

	const golden = "testdata/known-answer.golden"
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("signed message differs from %s:\ngot:\n%s\nwant:\n%s", golden, got, want)
	}
	// The body hash RFC 8463 Appendix A.3 gives for this message.
	if !strings.Contains(got, "bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;") {
		t.Error("the body hash differs from RFC 8463's")
	}
	if !strings.HasSuffix(got, katMessage) {
		t.Error("the signed message does not end with the original message")
	}
	verifs, err := dkim.VerifyWithOptions(strings.NewReader(string(want)), &dkim.VerifyOptions{LookupTXT: lookupTXT(rsaKey, edKey)})
	if err != nil {
		t.Fatal(err)
	}
	if len(verifs) != 2 {
		t.Fatalf("%d signatures verified, want 2", len(verifs))
	}
	for _, v := range verifs {
		if v.Err != nil {
			t.Errorf("go-msgauth: %v", v.Err)
		}
		// x= is checked in TestSignatureTags: go-msgauth's verifier
		// has no clock to set, and a fixed x= would be expired.
		if !v.Time.Equal(katTime) || !v.Expiration.IsZero() {
			t.Errorf("t=%v x=%v, want t=%v and no x=", v.Time, v.Expiration, katTime)
		}
	}
}

// TestSignatureTags checks the defaults docs/architecture.md sets, as verifiers
// parse them.
func TestSignatureTags(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	msg := "From: a@example.com\r\nSubject: s\r\nTo: b@example.net\r\nTo: c@example.net\r\nReceived: x\r\nX-Mailer: y\r\n\r\nbody\r\n"
	for _, tt := range []struct {
		opts  Options
		wantX bool
	}{{Options{}, false}, {Options{Expire: 90 * time.Minute}, true}, {Options{Expire: time.Millisecond}, true}} {
		signed := signString(t, msg, []Identity{{Domain: "Example.COM.", Selector: "rsa", Key: rsaKey}, {Domain: "example.com", Selector: "ed", Key: edKey}}, tt.opts)
		verifs, err := dkim.VerifyWithOptions(strings.NewReader(signed), &dkim.VerifyOptions{LookupTXT: lookupTXT(rsaKey, edKey)})
		if err != nil {
			t.Fatal(err)
		}
		wantKeys := "from:from:reply-to:sender:to:to:to:cc:subject:subject:date:mime-version:content-type:list-unsubscribe:list-unsubscribe-post"
		for _, v := range verifs {
			if v.Err != nil {
				t.Errorf("go-msgauth: %v", v.Err)
			}
			if v.Domain != "example.com" {
				t.Errorf("d=%s, want example.com", v.Domain)
			}
			if got := strings.Join(v.HeaderKeys, ":"); got != wantKeys {
				t.Errorf("h=%s\nwant %s", got, wantKeys)
			}
			if v.Time.IsZero() {
				t.Error("no t=")
			}
			if got := !v.Expiration.IsZero(); got != tt.wantX {
				t.Errorf("x= present: %v, want %v", got, tt.wantX)
			}
			if tt.wantX {
				if d := v.Expiration.Sub(v.Time); d < tt.opts.Expire || d >= tt.opts.Expire+time.Second {
					t.Errorf("x=-t= is %v for Expire %v", d, tt.opts.Expire)
				}
			}
		}
		head, _, _ := strings.Cut(signed, "From:")
		if !strings.Contains(head, "c=relaxed/relaxed;") || strings.Contains(head, " l=") {
			t.Errorf("fields break the defaults:\n%s", head)
		}
	}
}

func TestHeaderKeys(t *testing.T) {
	tests := []struct {
		name    string
		headers []string
		want    string
	}{
		{"only From", []string{"From"}, "from:from:reply-to:sender:to:cc:subject:date:mime-version:content-type:list-unsubscribe:list-unsubscribe-post"},
		{"unlisted fields are not signed", []string{"From", "Received", "X-Mailer", "DKIM-Signature", "Return-Path"}, "from:from:reply-to:sender:to:cc:subject:date:mime-version:content-type:list-unsubscribe:list-unsubscribe-post"},
		{"each instance plus one", []string{"To", "From", "to", "TO", "Message-ID", "Received", "References"},
			"from:from:reply-to:sender:to:to:to:to:cc:subject:date:message-id:references:mime-version:content-type:list-unsubscribe:list-unsubscribe-post"},
		{"not oversigned when absent", []string{"From", "List-Id", "Feedback-ID", "In-Reply-To", "Content-Transfer-Encoding"},
			"from:from:reply-to:sender:to:cc:subject:date:in-reply-to:mime-version:content-type:content-transfer-encoding:list-id:list-unsubscribe:list-unsubscribe-post:feedback-id"},
	}
	for _, tt := range tests {
		var fields []headerField
		for _, h := range tt.headers {
			fields = append(fields, headerField{name: h, raw: h + ": x\r\n"})
		}
		if got := strings.Join(headerKeys(fields), ":"); got != tt.want {
			t.Errorf("%s: h=%s\nwant %s", tt.name, got, tt.want)
		}
	}
}

// TestCanonicalHeadersPicksFromTheBottom: with two instances and h=x:x,
// the last instance is hashed first (RFC 6376 §5.4.2).
func TestCanonicalHeadersPicksFromTheBottom(t *testing.T) {
	fields := []headerField{
		{"To", "To: first\r\n"}, {"From", "From: f\r\n"}, {"TO", "TO: second\r\n"},
	}
	got := canonicalHeaders(fields, []string{"from", "from", "to", "to", "to", "cc"})
	want := "from:f\r\nto:second\r\nto:first\r\n"
	if got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func fieldLines(t *testing.T, field string) []string {
	t.Helper()
	if !strings.HasSuffix(field, "\r\n") {
		t.Fatalf("field does not end in CRLF: %q", field)
	}
	lines := strings.Split(strings.TrimSuffix(field, "\r\n"), "\r\n")
	for i, l := range lines[1:] {
		if l == "" || (l[0] != ' ' && l[0] != '\t') {
			t.Errorf("line %d is not a continuation line: %q", i+2, l)
		}
	}
	return lines
}

// TestFolding: every line of the field is at most 78 characters with
// ordinary names, and a long name (which cannot be folded) still stays
// far below 998.
func TestFolding(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	msg := "From: a@example.com\r\nTo: b@example.net\r\nCc: c@example.net\r\nReply-To: r@example.com\r\nSender: s@example.com\r\n" +
		"Subject: x\r\nDate: x\r\nMessage-ID: <x@y>\r\nIn-Reply-To: <x@y>\r\nReferences: <x@y>\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\nList-Id: <l.example.com>\r\n" +
		"List-Unsubscribe: <mailto:u@example.com>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nFeedback-ID: a:b:c\r\n\r\nbody\r\n"
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 36) + ".example" // 236 octets: rsa._domainkey. and it make 251
	for _, tt := range []struct {
		domain, selector string
		max              int
	}{
		{"example.com", "rsa", 78},
		{"mail.subdomain.example.com", "ed", 78},
		{long, "rsa", 998},
	} {
		m, err := Spool(t.Context(), strings.NewReader(msg), SpoolOptions{})
		if err != nil {
			t.Fatal(err)
		}
		key := crypto.Signer(rsaKey)
		if tt.selector == "ed" {
			key = edKey
		}
		fields, err := Sign(t.Context(), m, []Identity{{Domain: tt.domain, Selector: tt.selector, Key: key}}, Options{Expire: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range fieldLines(t, fields[0]) {
			if len(l) > tt.max {
				t.Errorf("d=%s: line of %d characters: %q", tt.domain, len(l), l)
			}
		}
		var b bytes.Buffer
		WriteSigned(&b, fields, m)
		m.Close()
		verifs, err := dkim.VerifyWithOptions(&b, &dkim.VerifyOptions{LookupTXT: lookupTXT(rsaKey, edKey)})
		if err != nil || len(verifs) != 1 || verifs[0].Err != nil {
			t.Errorf("d=%s: does not verify: %v %v", tt.domain, err, verifs)
		}
	}
}

// TestGoMsgauthDoesNotFoldH shows why Sign formats the field itself:
// go-msgauth puts h= on one line however long it is.
func TestGoMsgauthDoesNotFoldH(t *testing.T) {
	rsaKey, _ := testKeys(t)
	fields := []headerField{{"From", ""}, {"To", ""}, {"Subject", ""}, {"Date", ""}, {"Message-ID", ""}, {"List-Unsubscribe", ""}}
	s, err := dkim.NewSigner(&dkim.SignOptions{Domain: "example.com", Selector: "s", Signer: rsaKey, HeaderKeys: headerKeys(fields),
		HeaderCanonicalization: dkim.CanonicalizationRelaxed, BodyCanonicalization: dkim.CanonicalizationRelaxed})
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(s, "From: a@example.com\r\n\r\nbody\r\n")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	longest := 0
	for _, l := range strings.Split(s.Signature(), "\r\n") {
		longest = max(longest, len(l))
	}
	t.Logf("go-msgauth's longest DKIM-Signature line: %d characters", longest)
	if longest <= foldWidth {
		t.Errorf("go-msgauth's longest line is now %d characters: its Signer may do for formatting again", longest)
	}
}

func TestSignErrors(t *testing.T) {
	rsaKey, edKey := testKeys(t)
	// crypto/rsa no longer makes keys this small: fake the public half.
	small := smallKey{&rsa.PublicKey{N: new(big.Int).Lsh(big.NewInt(1), 767), E: 65537}}
	boom := errors.New("token gone")
	tests := []struct {
		name string
		ids  []Identity
		opts Options
		is   error
		want string
	}{
		{"no identity", nil, Options{}, nil, "signer: no identity"},
		{"nil key", []Identity{{Domain: "example.com", Selector: "s"}}, Options{}, nil, "no key"},
		{"bad domain", []Identity{{Domain: "exa mple.com", Selector: "s", Key: edKey}}, Options{}, nil, `"exa mple.com" is not a valid domain name`},
		{"bad selector", []Identity{{Domain: "example.com", Selector: "s;x=1", Key: edKey}}, Options{}, nil, "selector"},
		{"empty selector", []Identity{{Domain: "example.com", Key: edKey}}, Options{}, nil, `"" is not a valid selector`},
		{"negative expiry", []Identity{{Domain: "example.com", Selector: "s", Key: edKey}}, Options{Expire: -time.Second}, nil, "negative expiry"},
		{"small RSA key", []Identity{{Domain: "example.com", Selector: "s", Key: small}}, Options{}, nil, "768 bits"},
		{"key error is wrapped", []Identity{{Domain: "example.com", Selector: "ed", Key: edKey}, {Domain: "example.com", Selector: "s", Key: failingKey{rsaKey, boom}}}, Options{}, boom, "sign as s=s d=example.com"},
		{"unsupported key", []Identity{{Domain: "example.com", Selector: "s", Key: otherKey{}}}, Options{}, nil, "unsupported type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := spoolString(t, hdr+"body\r\n", SpoolOptions{})
			fields, err := Sign(t.Context(), m, tt.ids, tt.opts)
			if err == nil {
				t.Fatalf("Sign succeeded: %q", fields)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("err = %v, want it to wrap %v", err, tt.is)
			}
			if !strings.HasPrefix(err.Error(), "signer: ") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %q, want \"signer: ...%s...\"", err, tt.want)
			}
		})
	}
}

type failingKey struct {
	crypto.Signer
	err error
}

func (k failingKey) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, k.err }

type smallKey struct{ pub *rsa.PublicKey }

func (k smallKey) Public() crypto.PublicKey                                { return k.pub }
func (smallKey) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, nil }

type otherKey struct{}

func (otherKey) Public() crypto.PublicKey                                  { return "not a key" }
func (otherKey) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, nil }

// ctxKey records the context it was called with.
type ctxKey struct {
	crypto.Signer
	got context.Context
}

func (k *ctxKey) SignContext(ctx context.Context, d []byte, o crypto.SignerOpts) ([]byte, error) {
	k.got = ctx
	return k.Signer.Sign(nil, d, o)
}

func (k *ctxKey) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("Sign called instead of SignContext")
}

type ctxMarker struct{}

func TestSignUsesSignContext(t *testing.T) {
	_, edKey := testKeys(t)
	k := &ctxKey{Signer: edKey}
	ctx := context.WithValue(t.Context(), ctxMarker{}, 1)
	m := spoolString(t, hdr, SpoolOptions{})
	if _, err := Sign(ctx, m, []Identity{{Domain: "example.com", Selector: "ed", Key: k}}, Options{}); err != nil {
		t.Fatal(err)
	}
	if k.got == nil || k.got.Value(ctxMarker{}) != 1 {
		t.Error("SignContext did not get Sign's context")
	}
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := Sign(cancelled, m, []Identity{{Domain: "example.com", Selector: "ed", Key: edKey}}, Options{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Sign with a cancelled context: %v", err)
	}
}

// TestSignDoesNotChangeTheMessage: the output is the fields followed by
// the normalised input, byte for byte, including another signer's
// DKIM-Signature.
func TestSignDoesNotChangeTheMessage(t *testing.T) {
	_, edKey := testKeys(t)
	msg := "DKIM-Signature: v=1; a=rsa-sha256; d=esp.example; s=x; h=from; bh=; b=\r\nFrom: a@example.com\r\nSubject:  spaces  \r\n\r\n body \r\n\r\n"
	signed := signString(t, msg, []Identity{{Domain: "example.com", Selector: "ed", Key: edKey}}, Options{})
	_, rest, ok := strings.Cut(signed, "\r\nDKIM-Signature: v=1; a=rsa-sha256; d=esp.example")
	if !ok || "DKIM-Signature: v=1; a=rsa-sha256; d=esp.example"+rest != msg {
		t.Errorf("message changed:\n%q", signed)
	}
}

func TestAligned(t *testing.T) {
	tests := []struct {
		from, d string
		want    bool
	}{
		{"example.com", "example.com", true},
		{"mail.example.com", "example.com", true},
		{"a.b.example.com", "example.com", true},
		{"EXAMPLE.com.", "example.COM", true},
		{"example.com", "mail.example.com", false},
		{"badexample.com", "example.com", false},
		{"example.com.evil", "example.com", false},
		{"example.org", "example.com", false},
		{"xn--bcher-kva.example", "bücher.example", true},
		{"news.bücher.example", "xn--bcher-kva.example", true},
		{"", "example.com", false},
		{"example.com", "", false},
		{"com", ".com", false},
	}
	for _, tt := range tests {
		if got := Aligned(tt.from, tt.d); got != tt.want {
			t.Errorf("Aligned(%q, %q) = %v, want %v", tt.from, tt.d, got, tt.want)
		}
	}
}
