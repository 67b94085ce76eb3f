package signer_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/signer"
	"github.com/dkimgw/dkimgw/testenv"
	"github.com/emersion/go-msgauth/dkim"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// keyPair is the dual-signing setup every corpus message gets: one
// rsa-sha256 and one ed25519-sha256 signature, s=rsa and s=ed.
type keyPair struct{ rsa, ed crypto.Signer }

func memoryKeys(t testing.TB) keyPair {
	t.Helper()
	r, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, e, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return keyPair{r, e}
}

// tokenKeys generates an RSA-2048 and an Ed25519 key in a fresh SoftHSM
// token, for domain.
func tokenKeys(t testing.TB, domains ...string) map[string]keyPair {
	t.Helper()
	tok := testenv.SoftHSM(t)
	ctx := context.Background()
	token, err := hsm.Open(ctx, tok.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { token.Close() })
	keys := make(map[string]keyPair)
	for _, d := range domains {
		r, err := token.GenerateKey(ctx, d, "rsa", hsm.RSA2048)
		if err != nil {
			t.Fatal(err)
		}
		e, err := token.GenerateKey(ctx, d, "ed", hsm.Ed25519)
		if err != nil {
			t.Fatal(err)
		}
		keys[d] = keyPair{r, e}
	}
	return keys
}

type corpusMessage struct {
	name  string
	input []byte
}

func readCorpus(t testing.TB) []corpusMessage {
	t.Helper()
	files, err := filepath.Glob("testdata/corpus/*.eml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus: %v", err)
	}
	var msgs []corpusMessage
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, corpusMessage{filepath.Base(f), b})
	}
	return msgs
}

// fromDomains spools each message to learn its From domain.
func fromDomains(t testing.TB, msgs []corpusMessage) []string {
	t.Helper()
	var ds []string
	for _, c := range msgs {
		m, err := signer.Spool(context.Background(), bytes.NewReader(c.input), signer.SpoolOptions{})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		ds = append(ds, m.FromDomain())
		m.Close()
	}
	return ds
}

var lineEnding = regexp.MustCompile(`\r\n|\r|\n`)

// signCorpusMessage signs c as d= its From domain with both keys, with
// the message in memory and spooled to a file, and checks that the two
// outputs are equal and are the fields followed by the input with CRLF
// line endings.
func signCorpusMessage(t *testing.T, c corpusMessage, keys func(domain string) keyPair) []byte {
	t.Helper()
	// One clock for both runs: RSA PKCS#1 v1.5 and Ed25519 are
	// deterministic, so the two outputs must then be equal.
	now := time.Now()
	var outputs [][]byte
	for _, limit := range []int64{0, 64} {
		m, err := signer.Spool(t.Context(), bytes.NewReader(c.input), signer.SpoolOptions{Dir: t.TempDir(), MemoryLimit: limit})
		if err != nil {
			t.Fatalf("%s: Spool: %v", c.name, err)
		}
		k := keys(m.FromDomain())
		fields, err := signer.Sign(t.Context(), m, []signer.Identity{
			{Domain: m.FromDomain(), Selector: "rsa", Key: k.rsa},
			{Domain: m.FromDomain(), Selector: "ed", Key: k.ed},
		}, signer.Options{Now: func() time.Time { return now }})
		if err != nil {
			t.Fatalf("%s: Sign: %v", c.name, err)
		}
		var out bytes.Buffer
		if _, err := signer.WriteSigned(&out, fields, m); err != nil {
			t.Fatal(err)
		}
		m.Close()
		body := strings.TrimPrefix(out.String(), strings.Join(fields, ""))
		want := lineEnding.ReplaceAllString(string(c.input), "\r\n")
		if !strings.HasPrefix(body, want) || strings.Trim(body[len(want):], "\r\n") != "" {
			t.Errorf("%s: output is not the fields followed by the normalised input:\n%q", c.name, body)
		}
		outputs = append(outputs, out.Bytes())
	}
	if !bytes.Equal(outputs[0], outputs[1]) {
		t.Errorf("%s: spooling to a file changed the output", c.name)
	}
	return outputs[0]
}

// Tampering that must make every signature fail.
var tamperings = []struct {
	name string
	fn   func(signed []byte) []byte
}{
	{"changed body byte", func(b []byte) []byte {
		i := bytes.Index(b, []byte("\r\n\r\n")) + 4
		out := bytes.Clone(b)
		for j := i; j < len(out); j++ {
			if c := out[j]; c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
				out[j] ^= 1 // stays alphanumeric, so no canonicalization absorbs it
				return out
			}
		}
		return append(out, "X\r\n"...) // no body: add one
	}},
	{"changed signed header", func(b []byte) []byte {
		re := regexp.MustCompile(`(?im)^subject:`)
		loc := re.FindIndex(b)
		return append(append(bytes.Clone(b[:loc[1]]), " Re:"...), b[loc[1]:]...)
	}},
	// Verifiers pick the bottom-most instance first (RFC 6376 §5.4.2):
	// a From added above the original is caught only by oversigning.
	{"added second From on top", func(b []byte) []byte {
		return append([]byte("From: attacker@evil.example\r\n"), b...)
	}},
	{"added second From at the bottom", func(b []byte) []byte {
		i := bytes.Index(b, []byte("\r\n\r\n")) + 2
		return append(append(bytes.Clone(b[:i]), "From: attacker@evil.example\r\n"...), b[i:]...)
	}},
	{"added Reply-To on top", func(b []byte) []byte {
		return append([]byte("Reply-To: attacker@evil.example\r\n"), b...)
	}},
}

// records returns the DNS answers for keys under s=rsa and s=ed.
func records(t testing.TB, keys map[string]keyPair) map[string]string {
	t.Helper()
	recs := make(map[string]string)
	for d, k := range keys {
		for sel, key := range map[string]crypto.Signer{"rsa": k.rsa, "ed": k.ed} {
			v, err := hsm.TXTRecord(key.Public())
			if err != nil {
				t.Fatal(err)
			}
			recs[hsm.RecordName(d, sel)] = v
		}
	}
	return recs
}

func TestCorpusMemoryKeys(t *testing.T) {
	k := memoryKeys(t)
	msgs := readCorpus(t)
	keys := make(map[string]keyPair)
	for _, d := range fromDomains(t, msgs) {
		keys[d] = k
	}
	testCorpus(t, msgs, keys)
}

// TestCorpusTokenKeys signs the corpus with keys generated in SoftHSM,
// one RSA-2048 and one Ed25519 pair per From domain.
func TestCorpusTokenKeys(t *testing.T) {
	if testing.Short() {
		t.Skip("token key generation takes seconds")
	}
	msgs := readCorpus(t)
	domains := fromDomains(t, msgs)
	unique := map[string]bool{}
	var list []string
	for _, d := range domains {
		if !unique[d] {
			unique[d] = true
			list = append(list, d)
		}
	}
	testCorpus(t, msgs, tokenKeys(t, list...))
}

// testCorpus signs every corpus message, checks every signature with
// go-msgauth and every independent verifier, and checks that each
// tampering makes every signature fail in all of them.
func testCorpus(t *testing.T, msgs []corpusMessage, keys map[string]keyPair) {
	recs := records(t, keys)
	lookup := func(name string) ([]string, error) {
		if v, ok := recs[strings.TrimSuffix(name, ".")]; ok {
			return []string{v}, nil
		}
		return nil, &os.PathError{Op: "lookup", Path: name, Err: os.ErrNotExist}
	}

	type sample struct {
		name   string
		domain string
		msg    []byte
		pass   bool
	}
	var samples []sample
	for _, c := range msgs {
		signed := signCorpusMessage(t, c, func(d string) keyPair { return keys[d] })
		m, _ := signer.Spool(t.Context(), bytes.NewReader(c.input), signer.SpoolOptions{})
		domain := m.FromDomain()
		m.Close()
		samples = append(samples, sample{c.name, domain, signed, true})
		for _, tm := range tamperings {
			samples = append(samples, sample{c.name + "/" + tm.name, domain, tm.fn(signed), false})
		}
	}

	t.Run("go-msgauth", func(t *testing.T) {
		for _, s := range samples {
			verifs, err := dkim.VerifyWithOptions(bytes.NewReader(s.msg), &dkim.VerifyOptions{LookupTXT: lookup})
			if err != nil {
				t.Errorf("%s: %v", s.name, err)
				continue
			}
			var res []testenv.DKIMResult
			for _, v := range verifs {
				r := testenv.DKIMResult{Domain: v.Domain, Pass: v.Err == nil}
				if v.Err != nil {
					r.Reason = v.Err.Error()
				}
				res = append(res, r)
			}
			// go-msgauth does not report s=; ours are the top two.
			res = res[:min(len(res), 2)]
			if len(res) == 2 {
				res[0].Selector, res[0].Algorithm = "rsa", "rsa-sha256"
				res[1].Selector, res[1].Algorithm = "ed", "ed25519-sha256"
			}
			checkResults(t, "go-msgauth", true, s.name, s.domain, s.pass, res)
		}
	})
	msgsOnly := make([][]byte, len(samples))
	for i, s := range samples {
		msgsOnly[i] = s.msg
	}
	for _, v := range testenv.DKIMVerifiers() {
		t.Run(v.Name, func(t *testing.T) {
			results := v.Verify(t, recs, msgsOnly...)
			for i, s := range samples {
				checkResults(t, v.Name, v.Ed25519, s.name, s.domain, s.pass, results[i])
			}
		})
	}
}

// checkResults checks that the results hold exactly one verdict for each
// of our two signatures (others' signatures are ignored) and that each is
// as wanted. Without Ed25519 support the verifier must not pass it.
func checkResults(t *testing.T, verifier string, ed25519 bool, name, domain string, wantPass bool, res []testenv.DKIMResult) {
	t.Helper()
	seen := map[string]int{}
	for _, r := range res {
		if !strings.EqualFold(r.Domain, domain) || (r.Selector != "rsa" && r.Selector != "ed") {
			continue
		}
		seen[r.Selector]++
		want := wantPass
		if r.Selector == "ed" && !ed25519 {
			want = false
		}
		if r.Pass != want {
			t.Errorf("%s: %s: %v, want pass=%v", verifier, name, r, want)
		}
	}
	if seen["rsa"] != 1 || seen["ed"] != 1 {
		t.Errorf("%s: %s: want one result per signature, got %v", verifier, name, res)
	}
}
