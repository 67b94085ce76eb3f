package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// reviewEnv is a BIND server, a publisher to it, and helpers to prepare
// a token and a configuration for `dkimgw audit`.
type reviewEnv struct {
	t      *testing.T
	srv    *testenv.DNSServer
	pub    *dnspub.RFC2136
	secret string
}

func newReviewEnv(t *testing.T) *reviewEnv {
	t.Helper()
	srv := testenv.StartBIND(t, testenv.DNSOptions{})
	k := srv.Keys[0]
	secret := srv.KeyFile(t, k)
	pub, err := dnspub.NewRFC2136(dnspub.RFC2136Options{Server: srv.Addr, TSIG: dnspub.TSIG{Name: k.Name, Algorithm: k.Algorithm, SecretFile: secret}})
	if err != nil {
		t.Fatal(err)
	}
	return &reviewEnv{t: t, srv: srv, pub: pub, secret: secret}
}

// publish puts value at selector._domainkey.domain.
func (e *reviewEnv) publish(domain, selector, value string) {
	e.t.Helper()
	if _, err := e.pub.AppendRecords(e.t.Context(), e.srv.Zone, []dnspub.Record{{Name: hsm.RecordName(domain, selector) + ".", TTL: time.Minute, Value: value}}); err != nil {
		e.t.Fatal(err)
	}
}

// publishKey publishes the record of a token key.
func (e *reviewEnv) publishKey(k *hsm.Key) {
	e.t.Helper()
	v, err := hsm.TXTRecord(k.Public())
	if err != nil {
		e.t.Fatal(err)
	}
	e.publish(k.Info().Domain, k.Info().Selector, v)
}

// config writes a configuration of the token uri with domains (YAML
// lines under domains:) and extra top-level YAML.
func (e *reviewEnv) config(uri, domains, extra string) string {
	e.t.Helper()
	dir := e.t.TempDir()
	text := fmt.Sprintf(`hsm: {uri: %q}
upstream: {address: "127.0.0.1:10026"}
clients: [{name: c, networks: ["127.0.0.1/32"], domains: [%s]}]
domains:
%s
dns:
  check_servers: [%q]
  timeout: 5s
data_dir: %q
%s`, uri, strings.TrimSuffix(e.srv.Zone, "."), domains, e.srv.Addr, filepath.Join(dir, "data"), extra)
	path := filepath.Join(dir, "dkimgw.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

func openToken(t *testing.T, st *testenv.SoftHSMToken) *hsm.Token {
	t.Helper()
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	return tok
}

func genKey(t *testing.T, tok *hsm.Token, domain, selector string, alg hsm.Algorithm) *hsm.Key {
	t.Helper()
	k, err := tok.GenerateKey(t.Context(), domain, selector, alg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestAuditReviewClean: keys that are safe, configured, dual-signing and
// served by DNS draw no finding, and exit 0.
func TestAuditReviewClean(t *testing.T) {
	e := newReviewEnv(t)
	st := testenv.SoftHSM(t)
	tok := openToken(t, st)
	d := strings.TrimSuffix(e.srv.Zone, ".")
	e.publishKey(genKey(t, tok, d, "rsa1", hsm.RSA2048))
	e.publishKey(genKey(t, tok, d, "ed1", hsm.Ed25519))
	cfg := e.config(st.URIWithPINFile(t), fmt.Sprintf("  %s: {selectors: [rsa1, ed1]}", d), "")
	r := runCLI(t, nil, "", "audit", "--config", cfg)
	if r.code != 0 || !strings.Contains(r.stdout, "no findings") {
		t.Fatalf("clean set-up: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "rsa1._domainkey."+d) || strings.Count(r.stdout, "matches") != 2 {
		t.Errorf("the review does not show both keys matching DNS:\n%s", r.stdout)
	}
}

// TestAuditReviewFindings prepares a token, DNS, rotation state and audit
// log with one of each problem and checks that each is reported.
func TestAuditReviewFindings(t *testing.T) {
	e := newReviewEnv(t)
	st := testenv.SoftHSM(t)
	tok := openToken(t, st)
	d := strings.TrimSuffix(e.srv.Zone, ".")
	tool := testenv.Require(t, "pkcs11-tool")[0]
	p11 := func(args ...string) {
		t.Helper()
		base := []string{"--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN}
		if out, err := exec.Command(tool, append(base, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("pkcs11-tool %v: %v\n%s", args, err, out)
		}
	}
	// RSA-1024, made behind dkimgw's back.
	p11("--keypairgen", "--key-type", "rsa:1024", "--usage-sign", "--label", hsm.RecordName(d, "weak"), "--id", "a1")
	// An extractable key.
	p11("--keypairgen", "--key-type", "rsa:2048", "--usage-sign", "--extractable", "--label", hsm.RecordName(d, "ext"), "--id", "a2")
	// An imported key (not generated in the token).
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	der := filepath.Join(t.TempDir(), "k.der")
	os.WriteFile(der, x509.MarshalPKCS1PrivateKey(rk), 0o600)
	p11("--write-object", der, "--type", "privkey", "--usage-sign", "--label", hsm.RecordName(d, "imp"), "--id", "a3")

	// Configured and published, but generated 200 days ago (the audit
	// log says so).
	old := genKey(t, tok, d, "old", hsm.RSA2048)
	e.publishKey(old)
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	al, err := audit.Open(auditPath, audit.Options{Actor: "x", Now: func() time.Time { return time.Now().Add(-200 * 24 * time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	al.Record(t.Context(), audit.Event{Event: audit.EventKeyGenerated, Domain: d, Selector: "old", KeyID: old.Info().IDHex(), Details: map[string]any{"result": "ok"}})
	// Configured, in the token, not in DNS.
	genKey(t, tok, d, "nodns", hsm.RSA2048)
	// Configured, in the token, DNS serves another key.
	genKey(t, tok, d, "wrong", hsm.RSA2048)
	v, _ := hsm.TXTRecord(old.Public())
	e.publish(d, "wrong", v)
	// Configured and published, but not in the token.
	e.publish(d, "ghost", v)

	cfgPath := e.config(st.URIWithPINFile(t), fmt.Sprintf("  %s: {selectors: [old, nodns, wrong, ghost]}", d), fmt.Sprintf("audit: {path: %q}\n", auditPath))

	// A PIN file others may read: the token layer refuses it (78, saying
	// chmod 600) before the review can look at anything.
	uri := st.URIWithPINFile(t)
	pin := strings.TrimPrefix(uri[strings.Index(uri, "pin-source=")+len("pin-source="):], "file:")
	if err := os.Chmod(pin, 0o644); err != nil {
		t.Fatal(err)
	}
	rewriteURI(t, cfgPath, uri)
	if r := runCLI(t, nil, "", "audit", "--config", cfgPath, "--json"); r.code != exitConfig || !strings.Contains(r.stderr, "chmod 600") {
		t.Errorf("audit with a PIN file others may read: exit %d, want %d saying chmod 600\n%s", r.code, exitConfig, r.stderr)
	}
	if err := os.Chmod(pin, 0o600); err != nil {
		t.Fatal(err)
	}

	r := runCLI(t, nil, "", "audit", "--config", cfgPath, "--json")
	if r.code != exitFailure {
		t.Errorf("exit %d, want 1 (errors found)\n%s", r.code, r.stderr)
	}
	var rep reviewReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("audit --json: %v\n%s\n%s", err, r.stdout, r.stderr)
	}
	t.Logf("findings:\n%s", findingList(rep.Findings))
	has := func(sev, selector, text string) {
		t.Helper()
		for _, f := range rep.Findings {
			if f.Severity == sev && f.Selector == selector && strings.Contains(f.Message, text) {
				return
			}
		}
		t.Errorf("no %s finding for %q with %q; findings:\n%s", sev, selector, text, findingList(rep.Findings))
	}
	has(sevError, "weak", "RSA-1024 is below 2048")
	has(sevError, "ext", "extractable")
	has(sevError, "imp", "not generated in the token")
	has(sevWarning, "old", "older than 180 days")
	has(sevError, "nodns", "does not serve its record everywhere (absent)")
	has(sevError, "wrong", "does not serve its record everywhere (different)")
	has(sevError, "ghost", "DNS publishes a key for this selector, but the token has no key")
	has(sevWarning, "", "no Ed25519 signature")
	for _, f := range rep.Findings {
		if f.Selector == "old" && f.Severity == sevError {
			t.Errorf("the published, safe old key has an error: %+v", f)
		}
	}
	for _, k := range rep.Keys {
		if k.Selector == "old" && (k.AgeSource != "audit log" || k.AgeDays == nil || *k.AgeDays < 199) {
			t.Errorf("old key age: %+v", k)
		}
	}
}

// rewriteURI puts uri in the configuration's hsm.uri.
func rewriteURI(t *testing.T, path, uri string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	lines[0] = fmt.Sprintf("hsm: {uri: %q}", uri)
	os.WriteFile(path, []byte(strings.Join(lines, "\n")), 0o600)
}

func findingList(fs []finding) string {
	var b strings.Builder
	for _, f := range fs {
		fmt.Fprintf(&b, "  %s %s/%s: %s\n", f.Severity, f.Domain, f.Selector, f.Message)
	}
	return b.String()
}

// TestAuditFindingNoEd25519: a token without Ed25519 is a note, and no
// dual-signing warning is given then (SoftHSM has Ed25519, so the
// report is built by hand).
func TestAuditFindingNoEd25519(t *testing.T) {
	rep := &reviewReport{Ed25519: false}
	var got []finding
	findings(&policy.Config{}, nil, rep, time.Now(), func(sev, d, s, format string, args ...any) {
		got = append(got, finding{sev, d, s, fmt.Sprintf(format, args...)})
	})
	if len(got) != 1 || got[0].Severity != sevNote || !strings.Contains(got[0].Message, "cannot make Ed25519") {
		t.Errorf("findings: %+v", got)
	}
}

// TestAuditReviewRetired: a rotating domain without Ed25519, whose key
// retired 10 days ago (grace 7d) is still published, and whose zone holds
// a selector nobody knows.
func TestAuditReviewRetired(t *testing.T) {
	e := newReviewEnv(t)
	st := testenv.SoftHSM(t)
	tok := openToken(t, st)
	rot := strings.TrimSuffix(e.srv.Zone, ".")
	retired := genKey(t, tok, rot, "r1", hsm.RSA2048)
	e.publishKey(retired)
	v, _ := hsm.TXTRecord(retired.Public())
	// A selector published behind dkimgw's back, known to neither the
	// configuration nor the rotation state: found by a zone transfer.
	e.publish(rot, "stray", v)
	k := e.srv.Keys[0]
	cfgPath := e.config(st.URIWithPINFile(t), fmt.Sprintf("  %s: {rotation: {algorithms: [rsa-2048], interval: 90d, grace: 7d, publisher: primary}}", rot), "")
	b, _ := os.ReadFile(cfgPath)
	text := strings.Replace(string(b), "dns:\n", fmt.Sprintf("dns:\n  publishers:\n    primary: {type: rfc2136, server: %q, zone: %q, tsig: {name: %q, algorithm: %s, secret_file: %q}}\n", e.srv.Addr, e.srv.Zone, k.Name, k.Algorithm, e.secret), 1)
	os.WriteFile(cfgPath, []byte(text), 0o600)
	store, err := rotation.OpenBolt(filepath.Join(filepath.Dir(cfgPath), "data"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := store.Update(t.Context(), rotation.Change{Key: rotation.Key{
		Domain: rot, Selector: "r1", Algorithm: rotation.RSA2048, State: rotation.StateRetired, Created: true,
		Record: v, Since: now.Add(-10 * 24 * time.Hour), CreatedAt: now.Add(-40 * 24 * time.Hour),
		ActivatedAt: now.Add(-39 * 24 * time.Hour), RetiredAt: now.Add(-10 * 24 * time.Hour),
	}}); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, nil, "", "audit", "--config", cfgPath, "--json")
	var rep reviewReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("audit --json: exit %d: %v\n%s\n%s", r.code, err, r.stdout, r.stderr)
	}
	if r.code != exitFailure {
		t.Errorf("exit %d, want 1 for the stray selector:\n%s", r.code, findingList(rep.Findings))
	}
	want := map[string]bool{"retired key past its grace period is still published": false, "no Ed25519 signature": false}
	foundStray := false
	for _, f := range rep.Findings {
		if f.Selector == "stray" && f.Severity == sevError && strings.Contains(f.Message, "token has no key for it") {
			foundStray = true
		}
	}
	if !foundStray {
		t.Errorf("a selector only the zone knows is not reported:\n%s", findingList(rep.Findings))
	}
	for _, f := range rep.Findings {
		for w := range want {
			if f.Severity == sevWarning && strings.Contains(f.Message, w) {
				want[w] = true
			}
		}
	}
	for w, found := range want {
		if !found {
			t.Errorf("no warning %q; findings:\n%s", w, findingList(rep.Findings))
		}
	}
	for _, k := range rep.Keys {
		if k.Selector == "r1" && (k.AgeSource != "rotation state" || k.State != "retired" || k.AgeDays == nil || *k.AgeDays < 39) {
			t.Errorf("retired key: %+v", k)
		}
	}
}
