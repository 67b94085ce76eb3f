package etcdstore_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestOpenRefusesBadOptions: options that cannot work are refused before
// any connection, each with what to change.
func TestOpenRefusesBadOptions(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ep := []string{"https://127.0.0.1:2379"}
	for _, tt := range []struct {
		name string
		opts etcdstore.Options
		want string
	}{
		{"no endpoints", etcdstore.Options{}, "no endpoints"},
		{"no scheme", etcdstore.Options{Endpoints: []string{"127.0.0.1:2379"}}, "http:// or https://"},
		{"cert without key", etcdstore.Options{Endpoints: ep, CertFile: "c.pem"}, "tls.cert and tls.key go together"},
		{"user without password", etcdstore.Options{Endpoints: ep, Username: "gw"}, "needs a password"},
		{"TLS files with http", etcdstore.Options{Endpoints: []string{"http://127.0.0.1:2379"}, CAFile: notPEM}, "use https:// endpoints"},
		{"CA file missing", etcdstore.Options{Endpoints: ep, CAFile: filepath.Join(dir, "nope.pem")}, "read tls.ca"},
		{"CA file not PEM", etcdstore.Options{Endpoints: ep, CAFile: notPEM}, "holds no PEM certificate"},
		{"client cert missing", etcdstore.Options{Endpoints: ep, CertFile: filepath.Join(dir, "c.pem"), KeyFile: filepath.Join(dir, "k.pem")}, "load tls.cert"},
		{"TTL too short", etcdstore.Options{Endpoints: ep, TTL: time.Second}, "too short"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := etcdstore.Open(tt.opts)
			if err == nil {
				s.Close()
				t.Fatalf("Open(%+v) succeeded", tt.opts)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "etcdstore: ") || strings.Count(err.Error(), "etcdstore:") != 1 {
				t.Fatalf("Open: %q, want one prefix and %q", err, tt.want)
			}
		})
	}
}

// TestUnreachable: an endpoint where nothing listens fails Check within
// the call timeout with a temporary error that names the endpoint and
// says the connection was refused (gRPC alone says only "deadline
// exceeded").
func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := open(t, []string{"http://" + addr}, "", func(o *etcdstore.Options) { o.CallTimeout = time.Second })
	start := time.Now()
	err = s.Check(t.Context())
	var ue *etcdstore.UnavailableError
	if !errors.As(err, &ue) || !ue.Temporary() || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Check of %s: %v, want an UnavailableError naming it and why", addr, err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Check took %v with a call timeout of 1s", took)
	}
}

// TestAuth: with etcd's authentication on, a wrong password is refused
// with a message about the credentials; a user whose role covers another
// prefix is told which permission it lacks; the right user on its own
// prefix works: Check, the store, the lock and the election.
func TestAuth(t *testing.T) {
	c := testenv.StartEtcd(t)
	testenv.Require(t, "etcdctl")
	etcdctl(t, c, "user", "add", "root", "--new-user-password=rootpw")
	etcdctl(t, c, "user", "add", "gw", "--new-user-password=gwpw")
	etcdctl(t, c, "role", "add", "gw-role")
	etcdctl(t, c, "role", "grant-permission", "gw-role", "readwrite", "--prefix=true", "/gw/")
	etcdctl(t, c, "user", "grant-role", "gw", "gw-role")
	etcdctl(t, c, "user", "add", "ro", "--new-user-password=ropw")
	etcdctl(t, c, "role", "add", "ro-role")
	etcdctl(t, c, "role", "grant-permission", "ro-role", "read", "--prefix=true", "/gw/")
	etcdctl(t, c, "user", "grant-role", "ro", "ro-role")
	etcdctl(t, c, "auth", "enable")
	user := func(name, pw, prefix string) func(*etcdstore.Options) {
		return func(o *etcdstore.Options) { o.Username, o.Password, o.Prefix = name, pw, prefix }
	}

	_, err := etcdstore.Open(etcdstore.Options{Endpoints: c.Endpoints(), Username: "gw", Password: "wrong", TTL: testTTL})
	if err == nil || !strings.Contains(err.Error(), `credentials of user "gw"`) || strings.Contains(err.Error(), "wrong") {
		t.Fatalf("wrong password: %v, want a message about the credentials (without the password)", err)
	}

	other := open(t, c.Endpoints(), "", user("gw", "gwpw", "/other/"))
	err = other.Check(t.Context())
	if err == nil || !strings.Contains(err.Error(), `user "gw" may not read and write the keys under "/other/"`) {
		t.Fatalf("Check on a prefix without permission: %v", err)
	}
	if _, err := other.Keys(t.Context(), "example.com"); err == nil || !strings.Contains(err.Error(), "grant-permission") {
		t.Fatalf("Keys on a prefix without permission: %v", err)
	}

	// Read permission is not enough, and Check finds that out without
	// writing: etcd checks every operation of a transaction, taken or not.
	ro := open(t, c.Endpoints(), "", user("ro", "ropw", "/gw/"))
	if err := ro.Check(t.Context()); err == nil || !strings.Contains(err.Error(), `user "ro" may not read and write`) {
		t.Fatalf("Check as a read-only user: %v", err)
	}

	s := open(t, c.Endpoints(), "", user("gw", "gwpw", "/gw/"))
	if err := s.Check(t.Context()); err != nil {
		t.Fatalf("Check with the right user and prefix: %v", err)
	}
	if err := step(t.Context(), s, 5*time.Second); err != nil {
		t.Fatalf("a pass as gw: %v", err)
	}
	if err := s.Update(t.Context(), rotation.Change{Key: rotation.Key{Domain: "example.com", Selector: "s2", State: rotation.StateActive}}); err != nil {
		t.Fatalf("an activation as gw: %v", err)
	}
	el := s.NewElection()
	if err := el.Campaign(t.Context()); err != nil {
		t.Fatalf("campaign as gw: %v", err)
	}
	if err := el.Resign(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// TestTLS: a cluster that serves TLS and requires client certificates.
// With its CA and a client certificate the store works; with another CA,
// or without a client certificate, Check says TLS failed and what to
// check.
func TestTLS(t *testing.T) {
	c := testenv.StartEtcdWith(t, testenv.EtcdOptions{TLS: true})
	f := c.TLS
	good := open(t, c.Endpoints(), "", func(o *etcdstore.Options) {
		o.CAFile, o.CertFile, o.KeyFile = f.CAFile, f.CertFile, f.KeyFile
	})
	if err := good.Check(t.Context()); err != nil {
		t.Fatalf("Check with the cluster's CA and a client certificate: %v", err)
	}
	if err := step(t.Context(), good, 5*time.Second); err != nil {
		t.Fatalf("a pass over TLS: %v", err)
	}
	for name, mod := range map[string]func(*etcdstore.Options){
		"another CA": func(o *etcdstore.Options) {
			o.CAFile, o.CertFile, o.KeyFile = f.OtherCAFile, f.CertFile, f.KeyFile
		},
		"no client certificate": func(o *etcdstore.Options) { o.CAFile = f.CAFile },
	} {
		t.Run(name, func(t *testing.T) {
			s := open(t, c.Endpoints(), "", mod, func(o *etcdstore.Options) { o.CallTimeout = 2 * time.Second })
			err := s.Check(t.Context())
			t.Logf("Check: %v", err)
			if err == nil || !strings.Contains(err.Error(), "TLS with etcd") || !strings.Contains(err.Error(), "tls.ca") {
				t.Fatalf("Check: %v, want a TLS failure that says what to check", err)
			}
		})
	}
}
