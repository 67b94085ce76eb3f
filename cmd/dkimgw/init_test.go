package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

// TestInitThenConfigCheck runs `dkimgw init --yes` on a fresh token and
// then `dkimgw config check` on what it wrote: the keys, the 0600 PIN
// file and the configuration must work together as printed.
func TestInitThenConfigCheck(t *testing.T) {
	st := testenv.SoftHSM(t)
	dir := t.TempDir()
	etc, data := filepath.Join(dir, "etc"), filepath.Join(dir, "data")
	args := []string{"init", "--yes", "--hsm", st.URI(), "--domain", "example.com", "--domain", "Example.ORG.",
		"--upstream", "127.0.0.1:10026", "--listen", "127.0.0.1:10025", "--dir", etc, "--data-dir", data}
	r := runCLI(t, nil, "", args...)
	if r.code != exitOK {
		t.Fatalf("init: exit %d\n%s", r.code, r.stderr)
	}
	for _, want := range []string{
		"._domainkey.example.com. 3600 IN TXT \"v=DKIM1; k=rsa; p=",
		"._domainkey.example.com. 3600 IN TXT \"v=DKIM1; k=ed25519; p=",
		"._domainkey.example.org. 3600 IN TXT \"v=DKIM1; k=rsa; p=",
		"dkimgw config check --config " + filepath.Join(etc, "dkimgw.yaml"),
		"relayhost = [127.0.0.1]:10025",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("init output lacks %q:\n%s", want, r.stdout)
		}
	}
	pin := filepath.Join(etc, "pin")
	fi, err := os.Stat(pin)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("PIN file: %v, mode %v; want 0600", err, fi)
	}
	if b, _ := os.ReadFile(pin); string(b) != st.PIN+"\n" {
		t.Errorf("PIN file does not hold the PIN")
	}
	conf, _ := os.ReadFile(filepath.Join(etc, "dkimgw.yaml"))
	if strings.Contains(string(conf), st.PIN) {
		t.Errorf("the configuration holds the PIN:\n%s", conf)
	}
	if !strings.Contains(string(conf), "pin-source=file:"+pin) {
		t.Errorf("the configuration does not read the PIN file:\n%s", conf)
	}
	if r := runCLI(t, nil, "", "config", "check", "--config", filepath.Join(etc, "dkimgw.yaml")); r.code != exitOK || !strings.Contains(r.stdout, "2 domains, 4 keys") {
		t.Fatalf("config check after init: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// A second run keeps what is there, unless --force.
	before, _ := os.ReadFile(filepath.Join(etc, "dkimgw.yaml"))
	if r := runCLI(t, nil, "", args...); r.code != exitCantCreate || !strings.Contains(r.stderr, "--force") {
		t.Errorf("init over an existing configuration: exit %d, %q; want %d naming --force", r.code, r.stderr, exitCantCreate)
	}
	if after, _ := os.ReadFile(filepath.Join(etc, "dkimgw.yaml")); string(after) != string(before) {
		t.Errorf("the refused init changed the configuration")
	}
	r = runCLI(t, nil, "", append(args, "--force")...)
	if r.code != exitOK || !strings.Contains(r.stderr, "reusing rsa-2048 key") {
		t.Errorf("init --force: exit %d, want 0 reusing the keys\n%s", r.code, r.stderr)
	}
}

// TestInitKeepsItsOwnPINSource checks that a URI whose pin-source is
// DIR/pin already is taken as it is: the file is neither refused as in
// the way nor rewritten.
func TestInitKeepsItsOwnPINSource(t *testing.T) {
	st := testenv.SoftHSM(t)
	uri := st.URIWithPINFile(t)
	_, pinPath, _ := strings.Cut(uri, "pin-source=file:")
	dir := filepath.Dir(pinPath)
	before, _ := os.Stat(pinPath)
	r := runCLI(t, nil, "", "init", "--yes", "--hsm", uri, "--domain", "example.com", "--upstream", "127.0.0.1:25", "--dir", dir, "--data-dir", filepath.Join(dir, "data"))
	if r.code != exitOK {
		t.Fatalf("init: exit %d\n%s", r.code, r.stderr)
	}
	if after, _ := os.Stat(pinPath); !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("init rewrote the PIN file it was pointed at")
	}
	if r := runCLI(t, nil, "", "config", "check", "--config", filepath.Join(dir, "dkimgw.yaml")); r.code != exitOK {
		t.Fatalf("config check after init: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestInitInteractive answers init's questions on stdin.
func TestInitInteractive(t *testing.T) {
	st := testenv.SoftHSM(t)
	dir := t.TempDir()
	capture := filepath.Join(dir, "capture")
	r := runCLI(t, map[string]string{hsmEnv: st.URI()}, "example.com\ncapture:"+capture+"\ny\n",
		"init", "--dir", filepath.Join(dir, "etc"), "--data-dir", filepath.Join(dir, "data"))
	if r.code != exitOK {
		t.Fatalf("init: exit %d\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "signing domains") || !strings.Contains(r.stderr, "[y/N]") {
		t.Errorf("init did not ask:\n%s", r.stderr)
	}
	if fi, err := os.Stat(capture); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("capture directory: %v %v; want it created 0700", fi, err)
	}
	if r := runCLI(t, nil, "", "config", "check", "--config", filepath.Join(dir, "etc", "dkimgw.yaml")); r.code != exitOK {
		t.Fatalf("config check after init: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// A "no" changes nothing.
	other := filepath.Join(dir, "other")
	if r := runCLI(t, map[string]string{hsmEnv: st.URI()}, "example.net\n127.0.0.1:25\nn\n", "init", "--dir", other); r.code != exitUsage {
		t.Errorf("init answered no: exit %d, want %d", r.code, exitUsage)
	}
	if _, err := os.Stat(other); !os.IsNotExist(err) {
		t.Errorf("init answered no created %s", other)
	}
}

// TestInitBadInput checks that bad input is refused with a clear error
// before anything is written or generated.
func TestInitBadInput(t *testing.T) {
	st := testenv.SoftHSM(t)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no domain", []string{"--upstream", "127.0.0.1:25"}, "at least one --domain"},
		{"bad domain", []string{"--domain", "exa mple.com", "--upstream", "127.0.0.1:25"}, "not a valid domain"},
		{"top-level domain", []string{"--domain", "com", "--upstream", "127.0.0.1:25"}, "top-level domain"},
		{"no upstream", []string{"--domain", "example.com"}, "give --upstream"},
		{"upstream without port", []string{"--domain", "example.com", "--upstream", "mx.example.com"}, `--upstream "mx.example.com": not host:port`},
		{"upstream bad port", []string{"--domain", "example.com", "--upstream", "mx.example.com:smtp"}, "not a port number"},
		{"relative capture", []string{"--domain", "example.com", "--upstream", "capture:out"}, "absolute directory"},
		{"bad listen", []string{"--domain", "example.com", "--upstream", "127.0.0.1:25", "--listen", "10025"}, "--listen"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "etc")
			args := append([]string{"init", "--yes", "--hsm", st.URI(), "--dir", dir, "--data-dir", dir + "-data"}, tt.args...)
			r := runCLI(t, nil, "", args...)
			if r.code != exitUsage || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("exit %d, stderr %q; want %d and %q", r.code, r.stderr, exitUsage, tt.want)
			}
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Errorf("%s was created", dir)
			}
		})
	}
	// Nothing was generated either.
	if r := runCLI(t, map[string]string{hsmEnv: st.URI()}, "", "keys", "list", "--json"); strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("keys in the token after refused inits: %s", r.stdout)
	}
}
