package testenv_test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// listTokens lists the tokens pkcs11-tool (OpenSC, an independent PKCS#11
// client) sees through p11-kit-client.so with only the server's address
// in its environment: no SoftHSM configuration.
func listTokens(t *testing.T, s *testenv.P11KitServer) string {
	t.Helper()
	testenv.Require(t, "pkcs11-tool")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "pkcs11-tool", "--module", testenv.P11KitClientModule(), "--list-token-slots")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), s.Env()}
	out, _ := cmd.CombinedOutput()
	return string(out)
}

// TestP11KitServer: the token is served to another process through the
// socket, the server's death takes it away (and refuses connections), and
// a restart on the same socket serves it again.
func TestP11KitServer(t *testing.T) {
	s := testenv.StartP11Kit(t)
	if !strings.HasPrefix(s.Env(), "P11_KIT_SERVER_ADDRESS=unix:path=/") || !strings.Contains(s.URI(), "module-path="+testenv.P11KitClientModule()) {
		t.Fatalf("Env %q, URI %q", s.Env(), s.URI())
	}
	if out := listTokens(t, s); !strings.Contains(out, s.Label) {
		t.Fatalf("pkcs11-tool through the p11-kit server does not list token %s:\n%s", s.Label, out)
	}

	s.Kill()
	if s.Running() {
		t.Fatal("the server runs after Kill")
	}
	if conn, err := net.DialTimeout("unix", s.Socket, 2*time.Second); err == nil {
		conn.Close()
		t.Fatal("the socket accepts connections after Kill")
	}
	if out := listTokens(t, s); strings.Contains(out, s.Label) {
		t.Fatalf("pkcs11-tool lists token %s while the server is dead:\n%s", s.Label, out)
	}

	s.Restart()
	if out := listTokens(t, s); !strings.Contains(out, s.Label) {
		t.Fatalf("pkcs11-tool does not list token %s after the restart:\n%s", s.Label, out)
	}
}
