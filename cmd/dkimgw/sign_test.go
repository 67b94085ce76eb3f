package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
	"github.com/emersion/go-msgauth/dkim"
)

// signToken makes a SoftHSM token with an RSA-2048 key (s=rsa) and an
// Ed25519 key (s=ed) for example.com, and returns its URI and the DNS
// records of both keys.
func signToken(t *testing.T) (string, map[string]string) {
	t.Helper()
	st := testenv.SoftHSM(t)
	ctx := context.Background()
	tok, err := hsm.Open(ctx, st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	records := map[string]string{}
	for sel, alg := range map[string]hsm.Algorithm{"rsa": hsm.RSA2048, "ed": hsm.Ed25519} {
		k, err := tok.GenerateKey(ctx, "example.com", sel, alg)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := hsm.TXTRecord(k.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[hsm.RecordName("example.com", sel)] = rec
	}
	return st.URI(), records
}

const signTestMessage = "From: News <news@mail.example.com>\n" +
	"To: alice@example.net\n" +
	"Subject: Hello\n" +
	"List-Unsubscribe: <mailto:u@example.com>\n" +
	"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n" +
	"\n" +
	"Body.\n"

func TestSignCommand(t *testing.T) {
	uri, records := signToken(t)

	// --hsm, and $DKIMGW_HSM.
	r1 := runCLI(t, nil, signTestMessage, "sign", "--hsm", uri, "--domain", "example.com", "--selector", "rsa", "--selector", "ed", "--expire", "168h")
	r2 := runCLI(t, map[string]string{hsmEnv: uri}, signTestMessage, "sign", "--domain", "example.com", "--selector", "ed")
	for i, r := range []result{r1, r2} {
		if r.code != exitOK || r.stderr != "" {
			t.Fatalf("run %d: exit %d, stderr %q", i+1, r.code, r.stderr)
		}
		if !strings.HasSuffix(r.stdout, strings.ReplaceAll(signTestMessage, "\n", "\r\n")) {
			t.Errorf("run %d: stdout is not the signed message:\n%s", i+1, r.stdout)
		}
	}

	lookup := func(name string) ([]string, error) { return []string{records[strings.TrimSuffix(name, ".")]}, nil }
	verifs, err := dkim.VerifyWithOptions(strings.NewReader(r1.stdout), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil {
		t.Fatal(err)
	}
	if len(verifs) != 2 {
		t.Fatalf("%d signatures, want 2", len(verifs))
	}
	for _, v := range verifs {
		if v.Err != nil || v.Domain != "example.com" || v.Expiration.Sub(v.Time).Hours() != 168 {
			t.Errorf("go-msgauth: d=%s t=%v x=%v: %v", v.Domain, v.Time, v.Expiration, v.Err)
		}
	}
	for _, v := range testenv.DKIMVerifiers() {
		for _, res := range v.Verify(t, records, []byte(r1.stdout)) {
			if len(res) != 2 {
				t.Errorf("%s: %d results, want 2", v.Name, len(res))
			}
			for _, sig := range res {
				if want := sig.Selector == "rsa" || v.Ed25519; sig.Pass != want {
					t.Errorf("%s: %v, want pass=%v", v.Name, sig, want)
				}
			}
		}
	}
}

// TestSignRefused: every message that must not be signed exits 65 with
// the reason on stderr and nothing on stdout.
func TestSignRefused(t *testing.T) {
	uri, _ := signToken(t)
	env := map[string]string{hsmEnv: uri}
	cases := map[string]string{
		"From domain not aligned":   strings.Replace(signTestMessage, "mail.example.com", "example.org", 1),
		"From domain only a suffix": strings.Replace(signTestMessage, "mail.example.com", "badexample.com", 1),
	}
	files, err := filepath.Glob("../../signer/testdata/refused/*.eml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no refused corpus: %v", err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		cases[filepath.Base(f)] = string(b)
	}
	for name, msg := range cases {
		t.Run(name, func(t *testing.T) {
			r := runCLI(t, env, msg, "sign", "--domain", "example.com", "--selector", "rsa")
			if r.code != exitDataErr {
				t.Errorf("exit %d, want %d (stderr %q)", r.code, exitDataErr, r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("wrote %d bytes on stdout", len(r.stdout))
			}
			if !strings.HasPrefix(r.stderr, "dkimgw: ") || len(strings.TrimSpace(r.stderr)) < len("dkimgw: ")+10 {
				t.Errorf("stderr %q gives no reason", r.stderr)
			}
		})
	}
}

func TestSignErrors(t *testing.T) {
	uri, _ := signToken(t)
	missing := "pkcs11:token=no-such-token?module-path=" + testenv.SoftHSMModule + "&pin-value=1234"
	tests := []struct {
		name string
		env  map[string]string
		args []string
		code int
		want string
	}{
		{"no domain", nil, []string{"--hsm", uri, "--selector", "rsa"}, exitUsage, "--domain and at least one --selector"},
		{"no selector", nil, []string{"--hsm", uri, "--domain", "example.com"}, exitUsage, "--domain and at least one --selector"},
		{"negative expiry", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "rsa", "--expire", "-1h"}, exitUsage, `--expire "-1h" is not a duration; write it like --expire 7d`},
		{"bad expiry", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "rsa", "--expire", "soon"}, exitUsage, `--expire "soon" is not a duration; write it like --expire 7d`},
		{"duplicate selector", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "rsa", "--selector", "RSA"}, exitUsage, "--selector RSA is given twice"},
		{"pin file missing", nil, []string{"--hsm", "pkcs11:token=x?module-path=" + testenv.SoftHSMModule + "&pin-source=file:/nonexistent/pin", "--domain", "example.com", "--selector", "rsa"}, exitConfig, "no such file"},
		{"pin variable unset", nil, []string{"--hsm", "pkcs11:token=x?module-path=" + testenv.SoftHSMModule + "&pin-source=env:NOPE", "--domain", "example.com", "--selector", "rsa"}, exitConfig, "env:NOPE"},
		{"no pin", nil, []string{"--hsm", "pkcs11:token=x?module-path=" + testenv.SoftHSMModule, "--domain", "example.com", "--selector", "rsa"}, exitConfig, "no PIN"},
		{"stray argument", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "rsa", "msg.eml"}, exitUsage, "unexpected argument"},
		{"no token", nil, []string{"--domain", "example.com", "--selector", "rsa"}, exitUsage, hsmEnv},
		{"bad selector", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "a;b"}, exitUsage, ""},
		{"no such key", nil, []string{"--hsm", uri, "--domain", "example.com", "--selector", "nokey"}, exitUnavailable, "not found"},
		{"token unavailable", nil, []string{"--hsm", missing, "--domain", "example.com", "--selector", "rsa"}, exitConfig, "SOFTHSM2_CONF"},
		{"token timeout", map[string]string{hsmEnv: uri}, []string{"--domain", "example.com", "--selector", "rsa", "--timeout", "1ns"}, exitTempFail, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.env, signTestMessage, append([]string{"sign"}, tt.args...)...)
			if r.code != tt.code {
				t.Errorf("exit %d, want %d (stderr %q)", r.code, tt.code, r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("wrote on stdout: %q", r.stdout)
			}
			if !strings.Contains(r.stderr, tt.want) {
				t.Errorf("stderr %q does not mention %q", r.stderr, tt.want)
			}
		})
	}
}

// TestSignLargeMessage signs a message far over the memory limit, so
// that it goes through a spool file, and checks the output is complete.
func TestSignLargeMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("large message")
	}
	uri, records := signToken(t)
	var b bytes.Buffer
	b.WriteString(signTestMessage)
	line := strings.Repeat("0123456789", 7) + "\n"
	for b.Len() < 5<<20 {
		b.WriteString(line)
	}
	r := runCLI(t, map[string]string{hsmEnv: uri}, b.String(), "sign", "--domain", "example.com", "--selector", "rsa")
	if r.code != exitOK {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if !strings.HasSuffix(r.stdout, strings.ReplaceAll(b.String(), "\n", "\r\n")) {
		t.Error("stdout does not end with the message")
	}
	lookup := func(name string) ([]string, error) { return []string{records[strings.TrimSuffix(name, ".")]}, nil }
	verifs, err := dkim.VerifyWithOptions(strings.NewReader(r.stdout), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil || len(verifs) != 1 || verifs[0].Err != nil {
		t.Errorf("does not verify: %v %v", err, verifs)
	}
}
