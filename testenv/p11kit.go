package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// p11KitClientModules are where distributions install p11-kit's client
// module (Debian's p11-kit-modules: the multiarch directory).
var p11KitClientModules = []string{
	"/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib64/pkcs11/p11-kit-client.so",
	"/usr/lib/pkcs11/p11-kit-client.so",
}

// P11KitClientModule is the path of p11-kit-client.so on this machine: the
// PKCS#11 module a process loads to use a token that a p11-kit server
// serves. It is Debian's amd64 path when none is installed.
func P11KitClientModule() string {
	for _, p := range p11KitClientModules {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return p11KitClientModules[0]
}

// P11KitAddressEnv is the environment variable p11-kit-client.so reads the
// server's address from. It reads it once, in C_GetFunctionList, that is
// when the module is loaded: a process that loaded it keeps the address
// for good.
const P11KitAddressEnv = "P11_KIT_SERVER_ADDRESS"

// p11KitStartTimeout bounds the wait for a started server's socket.
const p11KitStartTimeout = 10 * time.Second

// P11KitServer is a `p11-kit server` in front of a SoftHSM token of its
// own: the token is in another process, reached over a Unix socket, as a
// network HSM is reached through its vendor's client library. The token's
// files and SOFTHSM2_CONF are known to the server process only; a client
// needs the URI and the environment variable (Env).
//
// p11-kit server forks a `p11-kit-remote` per connection, which loads
// SoftHSM and serves that connection alone; all of them are in the
// server's process group, so Kill takes down the token process of every
// client, as a crashed HSM service would.
type P11KitServer struct {
	// Label and PIN are the token's.
	Label, PIN string
	// Socket is the server's Unix socket; Dir the temporary directory
	// holding it, the SoftHSM configuration and the token store.
	Socket, Dir string

	t    testing.TB
	conf string
	log  *LogBuffer

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// StartP11Kit creates a SoftHSM token in a directory of the test's own
// and starts a p11-kit server that serves it on a socket in the same
// directory, returning once the socket accepts connections. The server
// is killed, and the directory removed, when the test ends.
func StartP11Kit(t testing.TB) *P11KitServer {
	t.Helper()
	Require(t, "p11-kit", "softhsm2-util", SoftHSMModule, P11KitClientModule())
	// Not t.TempDir: a Unix socket path must fit in 108 bytes, and test
	// names make TempDir paths long.
	dir, err := os.MkdirTemp("", "dkimgw-p11kit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &P11KitServer{
		Label:  "p11kit-" + randomHex(4),
		PIN:    randomHex(6),
		Socket: filepath.Join(dir, "pkcs11.sock"),
		Dir:    dir,
		t:      t,
		conf:   filepath.Join(dir, "softhsm2.conf"),
		log:    &LogBuffer{},
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	content := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(s.conf, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	init := exec.Command("softhsm2-util", "--init-token", "--free",
		"--label", s.Label, "--pin", s.PIN, "--so-pin", randomHex(6))
	init.Env = s.serverEnv()
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			t.Logf("p11-kit server log:\n%s", s.log.String())
		}
	})
	s.Restart()
	return s
}

// serverEnv is the environment of the server and of softhsm2-util: the
// test binary's, with this token store's SoftHSM configuration.
func (s *P11KitServer) serverEnv() []string {
	env := make([]string, 0, len(os.Environ())+1)
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, softhsmEnv+"=") || strings.HasPrefix(kv, P11KitAddressEnv+"=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, softhsmEnv+"="+s.conf)
}

// Address is the server's address in p11-kit's syntax.
func (s *P11KitServer) Address() string { return "unix:path=" + s.Socket }

// Env is the NAME=VALUE a client process needs in its environment.
func (s *P11KitServer) Env() string { return P11KitAddressEnv + "=" + s.Address() }

// URI addresses the token through p11-kit-client.so, with the PIN inline
// (pin-value): tests only.
func (s *P11KitServer) URI() string {
	return fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-value=%s", url.PathEscape(s.Label), P11KitClientModule(), url.PathEscape(s.PIN))
}

// URIWithPINFile is URI with the PIN in a 0600 file (pin-source), as in
// production.
func (s *P11KitServer) URIWithPINFile(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(path, []byte(s.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", url.PathEscape(s.Label), P11KitClientModule(), path)
}

// DirectURI and DirectEnv address the same token with SoftHSM loaded in
// the calling process, bypassing the server: for a test that prepares
// what the server's clients cannot do themselves (an Ed25519 key, which
// p11-kit's RPC does not carry).
func (s *P11KitServer) DirectURI() string {
	return fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-value=%s", url.PathEscape(s.Label), SoftHSMModule, url.PathEscape(s.PIN))
}

// DirectEnv is the NAME=VALUE that points SoftHSM at the server's token
// store; see DirectURI.
func (s *P11KitServer) DirectEnv() string { return softhsmEnv + "=" + s.conf }

// Restart starts the server (again) on the same socket and token, and
// waits until the socket accepts connections. The server must not run.
func (s *P11KitServer) Restart() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running() {
		s.t.Fatal("testenv: the p11-kit server is still running")
	}
	fmt.Fprintf(s.log, "=== start %s\n", time.Now().UTC().Format(time.RFC3339Nano))
	// -f: in the foreground, so that the process started is the server.
	// The socket is created with mode 0711 (p11-kit's umask 066): only
	// this user can connect.
	cmd := exec.Command("p11-kit", "server", "-f", "-n", s.Socket,
		"--provider", SoftHSMModule, "pkcs11:token="+url.PathEscape(s.Label))
	cmd.Env = s.serverEnv()
	cmd.Stdout, cmd.Stderr = s.log, s.log
	// Its own process group, which its p11-kit-remote children inherit:
	// Kill reaches them too. SIGKILL when the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("testenv: start p11-kit server: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited
	if err := waitUnixSocket(s.Socket, exited, p11KitStartTimeout); err != nil {
		s.t.Fatalf("testenv: p11-kit server: %v\n%s", err, s.log.String())
	}
}

// waitUnixSocket waits until path accepts a connection, the process
// exits, or timeout passes. The server removes a stale socket file before
// it binds, so a file alone proves nothing: only a connection does.
func waitUnixSocket(path string, exited <-chan struct{}, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			// The server forks a p11-kit-remote for this connection,
			// which sees EOF and exits.
			conn.Close()
			return nil
		}
		select {
		case <-exited:
			return errors.New("exited before its socket accepted connections")
		case <-ctx.Done():
			return fmt.Errorf("socket %s accepts no connection after %v: %w", path, timeout, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Kill kills the server and every p11-kit-remote it forked (the token
// processes of its clients) with SIGKILL, and waits for the server. The
// socket file stays, refusing connections, as after a crash.
func (s *P11KitServer) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.t.Errorf("testenv: p11-kit server (pid %d) did not exit after SIGKILL", s.cmd.Process.Pid)
	}
	s.cmd = nil
}

// Running reports whether the server process is alive.
func (s *P11KitServer) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.running()
}

func (s *P11KitServer) running() bool {
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// Log is what the server has printed, across restarts.
func (s *P11KitServer) Log() string { return s.log.String() }
