package faults

// The dkimgw binary as a child process: built once per test binary,
// configured per scenario, started, signalled, killed and restarted on
// the same address.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// buildDkimgw builds dkimgw with the race detector (a race provoked by a
// fault fails its scenario) into dir.
func buildDkimgw(t *testing.T, dir string) string {
	t.Helper()
	return buildDkimgwWith(t, dir, "-race")
}

// buildDkimgwWith builds dkimgw with these go build flags into dir.
func buildDkimgwWith(t *testing.T, dir string, flags ...string) string {
	t.Helper()
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build dkimgw: %v", err)
	}
	bin := filepath.Join(dir, "dkimgw")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, goCmd, append(append([]string{"build"}, flags...), "-o", bin, "../cmd/dkimgw")...).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// gwConfig is a scenario's gateway configuration.
type gwConfig struct {
	uri, upstream, listen string
	upstreamTimeout       time.Duration
	grace                 time.Duration
	// domains is the domains block's body (indented two spaces); ""
	// signs example.com with the fixed selectors rsa1 and ed1.
	domains string
	// extra is appended to the configuration as it is (dns:, rotation:,
	// data_dir: of a rotating domain).
	extra string
}

func (c gwConfig) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "hsm:\n  uri: %q\n", c.uri)
	fmt.Fprintf(&b, "smtp:\n  listen: %q\n  hostname: dkimgw.test\n  max_connections: 2000\n  max_connections_per_ip: 2000\n", c.listen)
	fmt.Fprintf(&b, "upstream:\n  address: %q\n  timeout: %s\n  connect_timeout: %s\n", c.upstream, c.upstreamTimeout, c.upstreamTimeout)
	b.WriteString("clients:\n  - name: load\n    networks: [\"127.0.0.1/32\"]\n    domains: [example.com]\n")
	b.WriteString("domains:\n")
	if c.domains != "" {
		b.WriteString(c.domains)
	} else {
		b.WriteString("  example.com:\n    selectors: [rsa1, ed1]\n")
	}
	b.WriteString("log:\n  format: json\n  level: info\n")
	fmt.Fprintf(&b, "shutdown_grace: %s\n", c.grace)
	// Gateways of parallel scenarios must not share the default port.
	b.WriteString("admin:\n  listen: \"127.0.0.1:0\"\n")
	b.WriteString(c.extra)
	return b.String()
}

// freeAddr returns a 127.0.0.1 address that was free a moment ago: the
// gateway listens there across restarts.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// gateway runs `dkimgw serve` processes, one at a time, on one config.
type gateway struct {
	t      *testing.T
	bin    string
	config string
	env    []string
	// wrap is a command line the binary runs under (setpriv), or nil.
	wrap []string

	mu    sync.Mutex
	procs []*proc
}

// proc is one `dkimgw serve` process.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}

	mu       sync.Mutex
	lines    []string
	serving  chan struct{}
	exitCode int
}

func newGateway(t *testing.T, bin string, cfg gwConfig, env []string, wrap []string) *gateway {
	t.Helper()
	gw := &gateway{t: t, bin: bin, config: filepath.Join(t.TempDir(), "dkimgw.yaml"), env: env, wrap: wrap}
	// The audit log beside the configuration, not in /var/lib/dkimgw.
	text := cfg.yaml() + fmt.Sprintf("audit: {path: %q}\n", filepath.Join(filepath.Dir(gw.config), "audit.log"))
	if err := os.WriteFile(gw.config, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, p := range gw.all() {
			if !p.exited() {
				_ = p.cmd.Process.Kill()
				select {
				case <-p.done:
				case <-time.After(10 * time.Second):
					t.Errorf("dkimgw serve (pid %d) did not exit after SIGKILL", p.cmd.Process.Pid)
				}
			}
		}
		gw.checkLogs()
	})
	return gw
}

// start runs a new process and waits until it serves.
func (gw *gateway) start() *proc {
	t := gw.t
	t.Helper()
	argv := append(append([]string{}, gw.wrap...), gw.bin, "serve", "--config", gw.config)
	p := &proc{done: make(chan struct{}), serving: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Env = append(os.Environ(), gw.env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = pw, pw
	err = p.cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		t.Fatalf("start dkimgw serve: %v", err)
	}
	gw.mu.Lock()
	gw.procs = append(gw.procs, p)
	gw.mu.Unlock()
	go func() {
		p.readLog(pr)
		pr.Close()
		_ = p.cmd.Wait()
		p.mu.Lock()
		p.exitCode = p.cmd.ProcessState.ExitCode()
		p.mu.Unlock()
		close(p.done)
	}()
	select {
	case <-p.serving:
	case <-p.done:
		t.Fatalf("dkimgw serve exited (status %d) before serving:\n%s", p.status(), p.logText())
	case <-time.After(90 * time.Second):
		t.Fatalf("dkimgw serve did not serve within 90s:\n%s", p.logText())
	}
	return p
}

func (p *proc) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		p.mu.Lock()
		p.lines = append(p.lines, line)
		p.mu.Unlock()
		if strings.Contains(line, `"msg":"dkimgw serving"`) {
			close(p.serving)
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

func (p *proc) logText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// logged returns the JSON log lines whose msg is msg.
func (p *proc) logged(msg string) []map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []map[string]any
	for _, l := range p.lines {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

func (p *proc) status() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitCode
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil && !p.exited() {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// waitExit waits for the process to exit and returns its status.
func (p *proc) waitExit(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.status()
	case <-time.After(timeout):
		t.Fatalf("dkimgw serve (pid %d) still running %v after it was told to stop", p.cmd.Process.Pid, timeout)
		return 0
	}
}

func (gw *gateway) all() []*proc {
	gw.mu.Lock()
	defer gw.mu.Unlock()
	return append([]*proc(nil), gw.procs...)
}

// checkLogs fails the test on a data race or a panic in any process, and
// prints the logs of a failed test (their tails: a long run logs a line
// per transaction).
func (gw *gateway) checkLogs() {
	for i, p := range gw.all() {
		text := p.logText()
		if strings.Contains(text, "DATA RACE") {
			gw.t.Errorf("the race detector reported a data race in dkimgw serve (process %d)", i)
		}
		if strings.Contains(text, "panic:") || strings.Contains(text, "fatal error:") {
			gw.t.Errorf("dkimgw serve (process %d) panicked", i)
		}
		if gw.t.Failed() {
			lines := strings.Split(text, "\n")
			keep := lines
			if len(keep) > 200 {
				// Not the transaction lines: the ones that say what went wrong.
				keep = nil
				for _, l := range lines {
					if !strings.Contains(l, `"msg":"transaction"`) || strings.Contains(l, `"level":"ERROR"`) {
						keep = append(keep, l)
					}
				}
				if len(keep) > 300 {
					keep = keep[len(keep)-300:]
				}
			}
			gw.t.Logf("dkimgw serve log (process %d, %d lines, %d shown):\n%s", i, len(lines), len(keep), strings.Join(keep, "\n"))
		}
	}
}
