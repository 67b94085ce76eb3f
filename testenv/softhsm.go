package testenv

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// SoftHSMModule is where Debian's libsofthsm2 installs the PKCS#11 module.
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// softhsmEnv is the environment variable SoftHSM reads its configuration
// path from — once, at C_Initialize.
const softhsmEnv = "SOFTHSM2_CONF"

var (
	tokenDir    string // set by Main
	tokenSerial atomic.Int64
	// initMu serialises softhsm2-util --init-token and --delete-token: two
	// at once both pick the same free slot, or list a token while it is
	// being deleted, and one fails.
	initMu sync.Mutex
)

// Main runs a test binary with a SoftHSM configuration of its own: a
// fresh token directory, removed when the tests end. Call it from
// TestMain in every package that uses SoftHSM:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// SoftHSM reads its configuration once per process, at C_Initialize, so
// it has to be in place before any test loads the module; tokens that
// tests create later are found by the hsm package, which re-initialises
// the module when a URI names a token it does not see yet.
func Main(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "dkimgw-softhsm-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv: create SoftHSM directory:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	tokenDir = filepath.Join(dir, "tokens")
	conf := filepath.Join(dir, "softhsm2.conf")
	content := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokenDir)
	if err := os.Mkdir(tokenDir, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	if err := os.WriteFile(conf, []byte(content), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	// Set for the whole process and inherited by the commands tests run
	// (softhsm2-util, pkcs11-tool, the dkimgw binary).
	os.Setenv(softhsmEnv, conf)
	return m.Run()
}

// SoftHSMToken is a SoftHSM token created for one test.
type SoftHSMToken struct {
	Label  string
	PIN    string
	SOPIN  string
	Module string
}

// SoftHSM creates a SoftHSM token for the calling test, with its own
// label and random PINs, and deletes it when the test ends. The package's
// TestMain must call Main.
func SoftHSM(t testing.TB) *SoftHSMToken {
	t.Helper()
	return softHSM(t, "")
}

// SoftHSMLabeled is SoftHSM with a label the test chooses, for
// configurations written for people (the README's names its token); the
// label must be unique in the package.
func SoftHSMLabeled(t testing.TB, label string) *SoftHSMToken {
	t.Helper()
	return softHSM(t, label)
}

func softHSM(t testing.TB, label string) *SoftHSMToken {
	t.Helper()
	Require(t, "softhsm2-util", SoftHSMModule)
	if tokenDir == "" || os.Getenv(softhsmEnv) == "" {
		t.Fatal("testenv.SoftHSM: this package's TestMain must call testenv.Main(m)")
	}
	var tok *SoftHSMToken
	// softhsm2-util now and then fails right after initialising a token
	// ("Could not get info about the token in slot N") while this process
	// uses the same token directory; a new label on a second try works
	// (a chosen label is tried again once what the failure left is deleted).
	for attempt := 1; ; attempt++ {
		l := label
		if l == "" {
			l = fmt.Sprintf("t%d-%s", tokenSerial.Add(1), randomHex(4))
		} else if attempt > 1 {
			initMu.Lock()
			_ = exec.Command("softhsm2-util", "--delete-token", "--token", l).Run()
			initMu.Unlock()
		}
		tok = &SoftHSMToken{
			Label:  l,
			PIN:    randomHex(6),
			SOPIN:  randomHex(6),
			Module: SoftHSMModule,
		}
		initMu.Lock()
		out, err := exec.Command("softhsm2-util", "--init-token", "--free",
			"--label", tok.Label, "--pin", tok.PIN, "--so-pin", tok.SOPIN).CombinedOutput()
		initMu.Unlock()
		if err == nil {
			break
		}
		if attempt == 3 {
			t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
		}
		t.Logf("softhsm2-util --init-token (attempt %d): %v: %s", attempt, err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() {
		initMu.Lock()
		out, err := exec.Command("softhsm2-util", "--delete-token", "--token", tok.Label).CombinedOutput()
		initMu.Unlock()
		// A test that deleted the token's files itself leaves nothing to
		// delete; anything else is worth seeing.
		if err != nil && tok.Dir() != "" {
			t.Logf("softhsm2-util --delete-token %s: %v\n%s", tok.Label, err, out)
		}
	})
	return tok
}

// URI addresses the token with its PIN inline (pin-value): tests only.
func (tok *SoftHSMToken) URI() string {
	return fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-value=%s", url.PathEscape(tok.Label), tok.Module, url.PathEscape(tok.PIN))
}

// URIWithPINFile writes the PIN to a 0600 file in a temp directory of the
// test and returns a URI whose pin-source points at it, as in production.
func (tok *SoftHSMToken) URIWithPINFile(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(path, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", url.PathEscape(tok.Label), tok.Module, path)
}

// Dir is the token's directory inside SoftHSM's token store, or "" if it
// is gone. Deleting it simulates a token that vanished.
func (tok *SoftHSMToken) Dir() string {
	entries, err := os.ReadDir(tokenDir)
	if err != nil {
		return ""
	}
	for _, e := range entries {
		dir := filepath.Join(tokenDir, e.Name())
		data, err := os.ReadFile(filepath.Join(dir, "token.object"))
		if err == nil && bytes.Contains(data, []byte(tok.Label)) {
			return dir
		}
	}
	return ""
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
