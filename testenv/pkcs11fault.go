package testenv

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

//go:embed p11fault/p11fault.c
var p11faultSource []byte

// PKCS11Fault is a PKCS#11 module placed in front of SoftHSM that forwards
// every call and injects the failures a real token shows (device errors,
// lost sessions, calls that hang), steered through a control file. A
// process uses it by naming Path as module-path in its token URI and by
// having Env in its environment; the hsm code path then runs against
// real failures of a real module. Source: testenv/p11fault/p11fault.c.
type PKCS11Fault struct {
	Path     string // the shim's shared library
	control  string
	log      string
	sessions string

	mu       sync.Mutex
	closeSeq int
}

// PKCS11FaultSpec is the fault in force; the zero value injects nothing.
type PKCS11FaultSpec struct {
	// Error is the CKR to return (e.g. 0x30 CKR_DEVICE_ERROR) from the
	// calls named in ErrorOps (PKCS#11 names; "all" for every call the
	// shim forwards; empty: C_Sign).
	Error    uint
	ErrorOps []string
	// Hang delays the calls in HangOps (empty: C_Sign) before they reach
	// SoftHSM.
	Hang    time.Duration
	HangOps []string
}

// PKCS#11 return values the fault scenarios inject.
const (
	CKRDeviceError          = 0x30
	CKRDeviceRemoved        = 0x32
	CKRSessionHandleInvalid = 0xB3
)

// NewPKCS11Fault builds the shim with the C compiler into the calling
// test's temp directory (a fraction of a second) and gives the test a
// control file of its own.
func NewPKCS11Fault(t testing.TB) *PKCS11Fault {
	t.Helper()
	Require(t, "cc", SoftHSMModule)
	dir := t.TempDir()
	lib, err := buildPKCS11Fault(dir)
	if err != nil {
		t.Fatalf("testenv: build the PKCS#11 fault shim: %v", err)
	}
	f := &PKCS11Fault{Path: lib, control: filepath.Join(dir, "control"), log: filepath.Join(dir, "injected.log"), sessions: filepath.Join(dir, "sessions")}
	f.Set(t, PKCS11FaultSpec{})
	return f
}

// buildPKCS11Fault compiles the shim into dir against miekg/pkcs11's copy
// of the PKCS#11 headers (a dependency of the module, so always there).
func buildPKCS11Fault(dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		return "", fmt.Errorf("find the PKCS#11 headers (go list -m github.com/miekg/pkcs11): %w", err)
	}
	inc := strings.TrimSpace(string(out))
	src := filepath.Join(dir, "p11fault.c")
	if err := os.WriteFile(src, p11faultSource, 0o600); err != nil {
		return "", err
	}
	lib := filepath.Join(dir, "libp11fault.so")
	cc := exec.CommandContext(ctx, "cc", "-Wall", "-Werror", "-O2", "-shared", "-fPIC", "-I", inc, "-o", lib, src, "-ldl", "-lpthread")
	if out, err := cc.CombinedOutput(); err != nil {
		return "", fmt.Errorf("cc: %w\n%s", err, out)
	}
	return lib, nil
}

// Env is what the process loading the shim needs in its environment.
func (f *PKCS11Fault) Env() []string {
	return []string{"P11FAULT_MODULE=" + SoftHSMModule, "P11FAULT_CONTROL=" + f.control, "P11FAULT_LOG=" + f.log, "P11FAULT_SESSIONS=" + f.sessions}
}

// Sessions is the number of sessions the process using the shim has open
// in SoftHSM, as the shim counted them opened and closed (a count of its
// own, not the caller's); 0 before the first was opened. With several
// processes on one shim it is the last one's to change it.
func (f *PKCS11Fault) Sessions() (int, error) {
	data, err := os.ReadFile(f.sessions)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("testenv: read the shim's session count: %w", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("testenv: the shim's session count %q: %w", data, err)
	}
	return n, nil
}

// URI is tok's URI with the shim as its module.
func (f *PKCS11Fault) URI(tokURI string) string {
	return strings.Replace(tokURI, "module-path="+SoftHSMModule, "module-path="+f.Path, 1)
}

// Set puts spec in force, for every process using the shim, from their
// next token call on.
func (f *PKCS11Fault) Set(t testing.TB, spec PKCS11FaultSpec) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.write(t, spec)
}

// CloseAllSessions makes the shim close every session of every slot at
// the next token call of each process that uses it, behind the caller's
// back (C_CloseAllSessions): the process is logged out and its handles
// are void.
func (f *PKCS11Fault) CloseAllSessions(t testing.TB) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closeSeq++
	f.write(t, PKCS11FaultSpec{})
}

func (f *PKCS11Fault) write(t testing.TB, spec PKCS11FaultSpec) {
	t.Helper()
	var b strings.Builder
	if spec.Error != 0 {
		fmt.Fprintf(&b, "error=0x%x\n", spec.Error)
		if len(spec.ErrorOps) > 0 {
			fmt.Fprintf(&b, "error_ops=%s\n", strings.Join(spec.ErrorOps, ","))
		}
	}
	if spec.Hang > 0 {
		fmt.Fprintf(&b, "hang_ms=%d\n", spec.Hang.Milliseconds())
		if len(spec.HangOps) > 0 {
			fmt.Fprintf(&b, "hang_ops=%s\n", strings.Join(spec.HangOps, ","))
		}
	}
	fmt.Fprintf(&b, "close_all=%d\n", f.closeSeq)
	// Replaced by rename: the shim notices the new inode at once.
	tmp := f.control + ".new"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, f.control); err != nil {
		t.Fatal(err)
	}
}

// Injected counts the faults the shim has injected so far whose log line
// starts with kind ("error", "hang", "close_all"; "" counts all).
func (f *PKCS11Fault) Injected(kind string) int {
	data, err := os.ReadFile(f.log)
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range bytes.Split(data, []byte("\n")) {
		if len(l) > 0 && bytes.HasPrefix(l, []byte(kind)) {
			n++
		}
	}
	return n
}
