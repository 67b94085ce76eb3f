package main

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

func TestKeysLifecycle(t *testing.T) {
	st := testenv.SoftHSM(t)
	env := map[string]string{hsmEnv: st.URIWithPINFile(t)}

	for _, k := range []struct{ selector, alg string }{{"rsa1", "rsa-2048"}, {"ed1", "ed25519"}} {
		r := runCLI(t, env, "", "keys", "generate", "--domain", "example.com", "--selector", k.selector, "--algorithm", k.alg)
		if r.code != 0 {
			t.Fatalf("keys generate %s: exit %d: %s", k.selector, r.code, r.stderr)
		}
		if !strings.HasPrefix(r.stdout, k.selector+"._domainkey.example.com. 3600 IN TXT \"v=DKIM1;") {
			t.Errorf("keys generate printed %q, want the zone-file line", r.stdout)
		}
	}

	r := runCLI(t, env, "", "keys", "list", "--json")
	if r.code != 0 {
		t.Fatalf("keys list --json: exit %d: %s", r.code, r.stderr)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("keys list --json printed invalid JSON: %v\n%s", err, r.stdout)
	}
	if len(list) != 2 {
		t.Fatalf("keys list --json listed %d keys, want 2", len(list))
	}
	for _, k := range list {
		for _, field := range []string{"domain", "selector", "algorithm", "bits", "label", "id", "extractable", "sensitive", "never_extractable", "local"} {
			if _, ok := k[field]; !ok {
				t.Errorf("key %v lacks field %q", k["label"], field)
			}
		}
		if k["extractable"] != false || k["sensitive"] != true || k["never_extractable"] != true || k["local"] != true {
			t.Errorf("key %v has unsafe attributes: %v", k["label"], k)
		}
	}
	r = runCLI(t, env, "", "keys", "list")
	if r.code != 0 || !strings.Contains(r.stdout, "rsa-2048") || !strings.Contains(r.stdout, "ed25519") {
		t.Errorf("keys list: exit %d, table:\n%s", r.code, r.stdout)
	}

	// The record keys dns prints verifies what the token signs.
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	var zone strings.Builder
	for _, selector := range []string{"rsa1", "ed1"} {
		r := runCLI(t, env, "", "keys", "dns", "--domain", "example.com", "--selector", selector)
		if r.code != 0 {
			t.Fatalf("keys dns: exit %d: %s", r.code, r.stderr)
		}
		zone.WriteString(r.stdout)
		pub := publicKeyFromZoneLine(t, r.stdout)
		key, err := tok.Key(t.Context(), "example.com", selector)
		if err != nil {
			t.Fatal(err)
		}
		digest := sha256.Sum256([]byte("message " + selector))
		switch pub := pub.(type) {
		case *rsa.PublicKey:
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
				t.Errorf("%s: the published p= does not verify the token's signature: %v", selector, err)
			}
		case ed25519.PublicKey:
			sig, err := key.Sign(rand.Reader, digest[:], crypto.Hash(0))
			if err != nil {
				t.Fatal(err)
			}
			if !ed25519.Verify(pub, digest[:], sig) {
				t.Errorf("%s: the published p= does not verify the token's signature", selector)
			}
		}
	}
	checkZoneWithBIND(t, zone.String())

	// pkcs11-tool, independent of our code, sees every private key as
	// sensitive, always sensitive, never extractable and local.
	checkWithPkcs11Tool(t, st, 2)

	r = runCLI(t, env, "", "keys", "destroy", "--domain", "example.com", "--selector", "ed1")
	if r.code != exitUsage || !strings.Contains(r.stderr, "--yes") {
		t.Errorf("keys destroy without --yes: exit %d, %q", r.code, r.stderr)
	}
	r = runCLI(t, env, "", "keys", "destroy", "--domain", "example.com", "--selector", "ed1", "--yes")
	if r.code != 0 {
		t.Fatalf("keys destroy: exit %d: %s", r.code, r.stderr)
	}
	r = runCLI(t, env, "", "keys", "dns", "--domain", "example.com", "--selector", "ed1")
	if r.code != exitUnavailable {
		t.Errorf("keys dns of a destroyed key: exit %d, want %d: %s", r.code, exitUnavailable, r.stderr)
	}
}

func publicKeyFromZoneLine(t *testing.T, line string) crypto.PublicKey {
	t.Helper()
	rr, err := dns.NewRR(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("zone line does not parse: %v\n%s", err, line)
	}
	value := strings.Join(rr.(*dns.TXT).Txt, "")
	var p string
	for tag := range strings.SplitSeq(value, ";") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(tag), "p="); ok {
			p = v
		}
	}
	raw, err := base64.StdEncoding.DecodeString(p)
	if err != nil {
		t.Fatalf("p= is not base64: %v", err)
	}
	if strings.Contains(value, "k=ed25519") {
		return ed25519.PublicKey(raw)
	}
	pub, err := x509.ParsePKIXPublicKey(raw)
	if err != nil {
		t.Fatalf("p= is not a SubjectPublicKeyInfo: %v", err)
	}
	return pub
}

// checkZoneWithBIND loads the lines into a zone file and has BIND's own
// checker parse it.
func checkZoneWithBIND(t *testing.T, lines string) {
	t.Helper()
	checker := testenv.Require(t, "named-checkzone")[0]
	zone := "$ORIGIN example.com.\n$TTL 3600\n@ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 300\n@ IN NS ns.example.com.\nns IN A 127.0.0.1\n" + lines
	path := filepath.Join(t.TempDir(), "example.com.zone")
	if err := os.WriteFile(path, []byte(zone), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(checker, "example.com", path).CombinedOutput()
	if err != nil {
		t.Fatalf("named-checkzone refused the records: %v\n%s", err, out)
	}
}

func checkWithPkcs11Tool(t *testing.T, st *testenv.SoftHSMToken, want int) {
	t.Helper()
	tool := testenv.Require(t, "pkcs11-tool")[0]
	out, err := exec.Command(tool, "--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN,
		"--list-objects", "--type", "privkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		access, ok := strings.CutPrefix(strings.TrimSpace(line), "Access:")
		if !ok {
			continue
		}
		n++
		if got := strings.TrimSpace(access); got != "sensitive, always sensitive, never extractable, local" {
			t.Errorf("pkcs11-tool shows a private key with Access: %s", got)
		}
	}
	if n != want {
		t.Errorf("pkcs11-tool listed %d private keys, want %d:\n%s", n, want, out)
	}
}

func TestKeysErrors(t *testing.T) {
	st := testenv.SoftHSM(t)
	env := map[string]string{hsmEnv: st.URI()}
	tests := []struct {
		name     string
		env      map[string]string
		args     []string
		code     int
		contains string
	}{
		{"no subcommand", env, []string{"keys"}, exitUsage, "missing subcommand"},
		{"unknown subcommand", env, []string{"keys", "rotate"}, exitUsage, "unknown subcommand"},
		{"no token", nil, []string{"keys", "list"}, exitUsage, hsmEnv},
		{"missing selector", env, []string{"keys", "generate", "--domain", "example.com"}, exitUsage, "--selector"},
		{"weak rsa", env, []string{"keys", "generate", "--domain", "example.com", "--selector", "s", "--algorithm", "rsa-1024"}, exitUsage, "below 2048"},
		{"bad selector", env, []string{"keys", "generate", "--domain", "example.com", "--selector", "a b"}, exitUsage, "selector"},
		{"wrong pin", map[string]string{hsmEnv: strings.Replace(st.URI(), st.PIN, "x"+st.PIN, 1)}, []string{"keys", "list"}, 77, "PIN incorrect"},
		{"bad module", map[string]string{hsmEnv: "pkcs11:token=x?module-path=/nope.so&pin-value=1"}, []string{"keys", "list"}, exitConfig, "does not exist"},
		{"no such token", map[string]string{hsmEnv: "pkcs11:token=nope?module-path=" + testenv.SoftHSMModule + "&pin-value=1"}, []string{"keys", "list"}, exitConfig, "SOFTHSM2_CONF"},
		{"stray argument", env, []string{"keys", "list", "extra"}, exitUsage, "unexpected argument"},
		{"help", env, []string{"keys", "generate", "--help"}, exitOK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.env, "", tt.args...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.contains) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, tt.code, tt.contains)
			}
			if strings.Contains(r.stderr, st.PIN) {
				t.Error("stderr shows the PIN")
			}
		})
	}
	if r := runCLI(t, env, "", "keys", "generate", "--help"); !strings.Contains(r.stdout, "--algorithm") && !strings.Contains(r.stdout, "-algorithm") {
		t.Errorf("--help does not list the flags:\n%s", r.stdout)
	}
}

// TestEveryCommandHasHelp: --help prints the usage on stdout and exits 0,
// for every command and subcommand.
func TestEveryCommandHasHelp(t *testing.T) {
	for _, args := range [][]string{
		{"help"}, {"--help"}, {"keys", "--help"}, {"keys", "generate", "--help"}, {"keys", "list", "--help"},
		{"keys", "dns", "--help"}, {"keys", "destroy", "--help"}, {"sign", "--help"}, {"serve", "--help"},
		{"config", "--help"}, {"config", "check", "--help"}, {"help", "serve"},
		{"audit", "--help"}, {"audit", "verify-log", "--help"}, {"audit", "export-key", "--help"}, {"help", "audit"},
	} {
		r := runCLI(t, nil, "", args...)
		if r.code != exitOK || !strings.Contains(r.stdout, "usage: dkimgw") {
			t.Errorf("dkimgw %s: exit %d, stdout %q, stderr %q", strings.Join(args, " "), r.code, r.stdout, r.stderr)
		}
	}
	if r := runCLI(t, nil, "", "frobnicate"); r.code != exitUsage {
		t.Errorf("unknown command: exit %d, want %d", r.code, exitUsage)
	}
}
