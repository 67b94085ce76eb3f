package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// EtcdCluster is a three-member etcd cluster (Debian's etcd-server) of
// one test, on loopback ports, each member a process of its own in its
// own process group with its own data directory. Members can be killed
// and restarted to test what a store does when etcd loses a member, its
// leader, or its quorum.
type EtcdCluster struct {
	Members []*EtcdMember
	// TLS is set when the cluster was started with EtcdOptions.TLS.
	TLS *EtcdTLS

	token string
	t     testing.TB
}

// EtcdOptions configure StartEtcdWith. The zero value is StartEtcd's
// cluster: plain http.
type EtcdOptions struct {
	// TLS serves the client URLs over https with a certificate of a CA
	// made for the test, and requires a client certificate of that CA.
	// (The members talk to each other over plain http: loopback.)
	TLS bool
}

// EtcdTLS are the PEM files of a TLS cluster.
type EtcdTLS struct {
	CAFile             string // the CA that signed the members' and the client's certificates
	CertFile, KeyFile  string // a client certificate the members accept
	OtherCAFile        string // an unrelated CA: verifying the members with it fails
	serverCert, srvKey string
}

// EtcdMember is one etcd process of a cluster.
type EtcdMember struct {
	Name      string // m0, m1, m2
	ClientURL string // http://127.0.0.1:port
	PeerURL   string
	Dir       string // its data directory, kept across restarts

	cluster string // the --initial-cluster value

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	log    *LogBuffer
	token  string
	tls    *EtcdTLS
}

// etcdStartTimeout bounds a cluster's start: three members elect a
// leader in about a second; the margin is for a loaded machine.
const etcdStartTimeout = 30 * time.Second

// StartEtcd starts a three-member etcd cluster for the test and kills it
// when the test ends.
func StartEtcd(t testing.TB) *EtcdCluster {
	t.Helper()
	return StartEtcdWith(t, EtcdOptions{})
}

// StartEtcdWith starts a three-member cluster configured by opts.
func StartEtcdWith(t testing.TB, opts EtcdOptions) *EtcdCluster {
	t.Helper()
	Require(t, "etcd")
	var tlsFiles *EtcdTLS
	if opts.TLS {
		var err error
		if tlsFiles, err = writeEtcdTLS(t.TempDir()); err != nil {
			t.Fatalf("testenv: etcd TLS files: %v", err)
		}
	}
	// Ports are free when chosen and may be taken before a member binds
	// them; a member that cannot bind exits, and the cluster is started
	// again on new ports.
	var last error
	for range 3 {
		c, err := tryStartEtcd(t, tlsFiles)
		if err == nil {
			t.Cleanup(func() {
				if t.Failed() {
					for _, m := range c.Members {
						t.Logf("testenv: etcd %s log (%s):\n%s", m.Name, m.Dir, tail(m.log.String(), 4000))
					}
				}
				c.StopAll()
			})
			return c
		}
		last = err
	}
	t.Fatalf("testenv: etcd: %v", last)
	return nil
}

func tryStartEtcd(t testing.TB, tlsFiles *EtcdTLS) (*EtcdCluster, error) {
	c := &EtcdCluster{token: "testenv-" + randomHex(8), t: t, TLS: tlsFiles}
	scheme := "http://"
	if tlsFiles != nil {
		scheme = "https://"
	}
	var initial []string
	for i := range 3 {
		cp, err := freePort()
		if err != nil {
			return nil, err
		}
		pp, err := freePort()
		if err != nil {
			return nil, err
		}
		m := &EtcdMember{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: scheme + net.JoinHostPort("127.0.0.1", cp),
			PeerURL:   "http://" + net.JoinHostPort("127.0.0.1", pp),
			Dir:       filepath.Join(t.TempDir(), "data"),
			token:     c.token,
			tls:       tlsFiles,
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.cluster = strings.Join(initial, ",")
		if err := m.start(); err != nil {
			c.StopAll()
			return nil, err
		}
	}
	if err := c.waitReady(etcdStartTimeout, c.Members...); err != nil {
		c.StopAll()
		return nil, err
	}
	return c, nil
}

func (m *EtcdMember) start() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	args := []string{
		"--name", m.Name,
		"--data-dir", m.Dir,
		"--listen-client-urls", m.ClientURL,
		"--advertise-client-urls", m.ClientURL,
		"--listen-peer-urls", m.PeerURL,
		"--initial-advertise-peer-urls", m.PeerURL,
		"--initial-cluster", m.cluster,
		// A token of this cluster's own: a stale member of a killed run
		// on a reused port cannot join it.
		"--initial-cluster-token", m.token,
		// Ignored by a member that restarts on its data directory.
		"--initial-cluster-state", "new",
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
	}
	if m.tls != nil {
		args = append(args, "--cert-file", m.tls.serverCert, "--key-file", m.tls.srvKey,
			"--trusted-ca-file", m.tls.CAFile, "--client-cert-auth")
	}
	if m.log == nil {
		m.log = &LogBuffer{}
	}
	fmt.Fprintf(m.log, "=== start %s\n", time.Now().UTC().Format(time.RFC3339Nano))
	cmd := exec.Command("etcd", args...)
	cmd.Stdout, cmd.Stderr = m.log, m.log
	// Its own process group, so that a kill reaches whatever it forks,
	// and SIGKILL when the test binary dies, so that a killed run leaves
	// no member behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start etcd %s: %w", m.Name, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	m.cmd, m.exited = cmd, exited
	return nil
}

// Endpoints are the members' client URLs, for a client's configuration.
func (c *EtcdCluster) Endpoints() []string {
	eps := make([]string, len(c.Members))
	for i, m := range c.Members {
		eps[i] = m.ClientURL
	}
	return eps
}

// Kill kills member i with SIGKILL (no clean shutdown) and waits for it.
func (c *EtcdCluster) Kill(i int) {
	c.t.Helper()
	c.Members[i].kill()
}

// Restart starts member i again on its data directory and waits until it
// answers (which needs a quorum: with two members down, restart them
// together with RestartAll).
func (c *EtcdCluster) Restart(i int) {
	c.t.Helper()
	c.restart(c.Members[i])
}

// RestartAll starts every member that is not running and waits until
// each answers.
func (c *EtcdCluster) RestartAll() {
	c.t.Helper()
	var down []*EtcdMember
	for _, m := range c.Members {
		if !m.Running() {
			down = append(down, m)
		}
	}
	c.restart(down...)
}

func (c *EtcdCluster) restart(ms ...*EtcdMember) {
	c.t.Helper()
	for _, m := range ms {
		if m.Running() {
			c.t.Fatalf("testenv: etcd %s is still running", m.Name)
		}
		if err := m.start(); err != nil {
			c.t.Fatalf("testenv: %v", err)
		}
	}
	if err := c.waitReady(etcdStartTimeout, ms...); err != nil {
		c.t.Fatalf("testenv: etcd: %v", err)
	}
}

// StopAll kills every member that runs.
func (c *EtcdCluster) StopAll() {
	for _, m := range c.Members {
		m.kill()
	}
}

// Running reports whether the member's process is alive.
func (m *EtcdMember) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return false
	}
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

func (m *EtcdMember) kill() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil || m.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
	<-m.exited
	m.cmd = nil
}

// Log is what the member has logged, across restarts.
func (m *EtcdMember) Log() string { return m.log.String() }

// Leader returns the index of the member that leads the cluster, asking
// the members that run.
func (c *EtcdCluster) Leader(ctx context.Context) (int, error) {
	cli, err := c.client(c.Endpoints()...)
	if err != nil {
		return -1, err
	}
	defer cli.Close()
	var last error = errors.New("no member answered")
	for _, m := range c.Members {
		if !m.Running() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := cli.Status(cctx, m.ClientURL)
		cancel()
		if err != nil {
			last = err
			continue
		}
		if st.Leader == 0 {
			last = fmt.Errorf("%s knows no leader", m.Name)
			continue
		}
		ml, err := cli.MemberList(ctx)
		if err != nil {
			return -1, err
		}
		for _, mem := range ml.Members {
			if mem.ID != st.Leader {
				continue
			}
			for i, m := range c.Members {
				if mem.Name == m.Name {
					return i, nil
				}
			}
		}
		return -1, fmt.Errorf("leader %x is no member of this cluster", st.Leader)
	}
	return -1, last
}

func (c *EtcdCluster) client(eps ...string) (*clientv3.Client, error) {
	cfg := clientv3.Config{Endpoints: eps, DialTimeout: 2 * time.Second, Logger: zap.NewNop()}
	if c.TLS != nil {
		tc, err := c.TLS.Config()
		if err != nil {
			return nil, err
		}
		cfg.TLS = tc
	}
	return clientv3.New(cfg)
}

// waitReady waits until each of ms answers a linearizable read (which
// needs the cluster's quorum and a leader) through its own endpoint,
// failing early when one exits.
func (c *EtcdCluster) waitReady(timeout time.Duration, ms ...*EtcdMember) error {
	deadline := time.Now().Add(timeout)
	for _, m := range ms {
		cli, err := c.client(m.ClientURL)
		if err != nil {
			return err
		}
		var last error = errors.New("no answer yet")
		for {
			if !m.Running() {
				cli.Close()
				return fmt.Errorf("etcd %s exited before it answered on %s:\n%s", m.Name, m.ClientURL, tail(m.log.String(), 4000))
			}
			if time.Now().After(deadline) {
				cli.Close()
				return fmt.Errorf("etcd %s not ready on %s after %v: %v\n%s", m.Name, m.ClientURL, timeout, last, tail(m.log.String(), 4000))
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := cli.Get(ctx, "testenv-health")
			cancel()
			if err == nil {
				break
			}
			last = err
			time.Sleep(50 * time.Millisecond)
		}
		cli.Close()
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
