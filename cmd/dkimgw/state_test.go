package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/testenv"
)

// etcdConfig writes a configuration whose rotating domain keeps its
// state in etcd at endpoints under prefix (state is any extra state
// keys, e.g. "tls: {...}"), and returns its path. The publisher is
// manual and DNS is never asked by the commands these tests run.
func etcdConfig(t *testing.T, uri string, endpoints []string, prefix, extra string) string {
	t.Helper()
	dir := t.TempDir()
	eps := make([]string, len(endpoints))
	for i, ep := range endpoints {
		eps[i] = fmt.Sprintf("%q", ep)
	}
	text := fmt.Sprintf(`hsm: {uri: %q}
upstream: {address: "127.0.0.1:25"}
clients:
  - name: mta
    networks: ["127.0.0.1/32"]
    domains: [example.com]
domains:
  example.com:
    rotation: {algorithms: [ed25519], publisher: pub}
dns:
  publishers:
    pub: {type: manual}
  check_servers: ["127.0.0.1:53"]
data_dir: %q
state:
  type: etcd
  endpoints: [%s]
  prefix: %q
  dial_timeout: 2s
  lease_ttl: 3s
%s`, uri, filepath.Join(dir, "data"), strings.Join(eps, ", "), prefix, extra)
	path := filepath.Join(dir, "dkimgw.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

var migT0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

// migrationKeys are the records of a single gateway's state: a
// tombstone, the active key, its published successor, and a domain
// that no longer rotates.
func migrationKeys() []rotation.Key {
	return []rotation.Key{
		{Domain: "example.com", Selector: "ed20261001", Algorithm: rotation.Ed25519, State: rotation.StateDestroyed, Created: true, Since: migT0, CreatedAt: migT0.Add(-60 * 24 * time.Hour)},
		{Domain: "example.com", Selector: "ed20261101", Algorithm: rotation.Ed25519, State: rotation.StateActive, Created: true, Record: "v=DKIM1; k=ed25519; p=AAAA", Since: migT0, CreatedAt: migT0.Add(-30 * 24 * time.Hour), ActivatedAt: migT0},
		{Domain: "example.com", Selector: "ed20261201", Algorithm: rotation.Ed25519, State: rotation.StatePublished, Created: true, Record: "v=DKIM1; k=ed25519; p=BBBB", Since: migT0, CreatedAt: migT0, Note: "waiting for DNS"},
		{Domain: "old.example", Selector: "rsa1", Algorithm: rotation.RSA2048, State: rotation.StateActive, Since: migT0, CreatedAt: migT0},
	}
}

// storeDump is every record of s without revisions (each store numbers
// its own), as JSON, for comparing two stores.
func storeDump(t *testing.T, s *stateStore) string {
	t.Helper()
	ds, err := s.Domains(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var all []rotation.Key
	for _, d := range ds {
		keys, err := s.Keys(t.Context(), d)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			k.Rev = 0
			all = append(all, k)
		}
	}
	b, err := json.MarshalIndent(all, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func openEtcdForTest(t *testing.T, endpoints []string, prefix string) *stateStore {
	t.Helper()
	s, err := etcdstore.Open(etcdstore.Options{Endpoints: endpoints, Prefix: prefix, TTL: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &stateStore{Store: s, etcd: s}
}

func openBoltForTest(t *testing.T, dir string) *stateStore {
	t.Helper()
	b, err := rotation.OpenBolt(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &stateStore{Store: b, bolt: b}
}

// TestStateMigrate moves a single gateway's bbolt state into etcd and
// back, record for record, refusing a destination with records unless
// --force, and reads it with rotate status once it is in etcd.
func TestStateMigrate(t *testing.T) {
	c := testenv.StartEtcd(t)
	st := testenv.SoftHSM(t)
	cfg := etcdConfig(t, st.URIWithPINFile(t), c.Endpoints(), "/migrate/", "")

	src := t.TempDir()
	b := openBoltForTest(t, src)
	for _, k := range migrationKeys() {
		if err := b.Update(t.Context(), rotation.Change{Key: k}); err != nil {
			t.Fatal(err)
		}
	}
	want := storeDump(t, b)

	r := runCLI(t, nil, "", "state", "migrate", "--config", cfg, "--from", "bbolt:"+src, "--to", "etcd")
	if r.code != exitOK || !strings.Contains(r.stdout, "copied 4 records") {
		t.Fatalf("migrate to etcd: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	e := openEtcdForTest(t, c.Endpoints(), "/migrate/")
	if got := storeDump(t, e); got != want {
		t.Fatalf("etcd after migrate:\n%s\nwant:\n%s", got, want)
	}

	// What serve and rotate read is now etcd.
	r = runCLI(t, nil, "", "rotate", "status", "--config", cfg)
	if r.code != exitOK || !strings.Contains(r.stdout, "ed20261101") || !strings.Contains(r.stdout, "active") {
		t.Fatalf("rotate status on etcd: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}

	r = runCLI(t, nil, "", "state", "migrate", "--config", cfg, "--from", "bbolt:"+filepath.Join(src, rotation.BoltFile), "--to", "etcd")
	if r.code != exitCantCreate || !strings.Contains(r.stderr, "already has records") {
		t.Fatalf("migrate into a store with records: exit %d (want %d)\nstderr: %s", r.code, exitCantCreate, r.stderr)
	}
	r = runCLI(t, nil, "", "state", "migrate", "--config", cfg, "--from", "bbolt:"+src, "--to", "etcd", "--force")
	if r.code != exitOK {
		t.Fatalf("migrate --force: exit %d\nstderr: %s", r.code, r.stderr)
	}
	if got := storeDump(t, e); got != want {
		t.Fatalf("etcd after migrate --force:\n%s\nwant:\n%s", got, want)
	}

	back := t.TempDir()
	r = runCLI(t, nil, "", "state", "migrate", "--config", cfg, "--from", "etcd", "--to", "bbolt:"+back)
	if r.code != exitOK || !strings.Contains(r.stdout, "copied 4 records") {
		t.Fatalf("migrate to bbolt: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if got := storeDump(t, openBoltForTest(t, back)); got != want {
		t.Fatalf("bbolt after migrate back:\n%s\nwant:\n%s", got, want)
	}
	r = runCLI(t, nil, "", "state", "migrate", "--config", cfg, "--from", "etcd", "--to", "bbolt:"+back)
	if r.code != exitCantCreate {
		t.Fatalf("migrate back into a store with records: exit %d (want %d)\nstderr: %s", r.code, exitCantCreate, r.stderr)
	}
}

// TestStateMigrateRefusals: bad arguments, a missing source, a
// configuration without etcd, and etcd out of reach.
func TestStateMigrateRefusals(t *testing.T) {
	st := testenv.SoftHSM(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	cfg := etcdConfig(t, st.URIWithPINFile(t), []string{dead}, "/x/", "")
	src := t.TempDir()
	b := openBoltForTest(t, src)
	if err := b.Update(t.Context(), rotation.Change{Key: migrationKeys()[1]}); err != nil {
		t.Fatal(err)
	}
	bboltCfg := filepath.Join(t.TempDir(), "bbolt.yaml")
	text, _ := os.ReadFile(cfg)
	plain, _, _ := strings.Cut(string(text), "state:")
	if err := os.WriteFile(bboltCfg, []byte(plain), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no direction", []string{"--config", cfg}, exitUsage, "want --from bbolt:PATH --to etcd"},
		{"bbolt to bbolt", []string{"--config", cfg, "--from", "bbolt:" + src, "--to", "bbolt:/tmp/x"}, exitUsage, "want --from"},
		{"missing source", []string{"--config", cfg, "--from", "bbolt:" + filepath.Join(src, "nothing"), "--to", "etcd"}, exitNoInput, "source"},
		{"no etcd section", []string{"--config", bboltCfg, "--from", "bbolt:" + src, "--to", "etcd"}, exitConfig, "state.type is \"bbolt\""},
		{"etcd down", []string{"--config", cfg, "--from", "bbolt:" + src, "--to", "etcd"}, exitTempFail, "did not answer"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, nil, "", append([]string{"state", "migrate"}, tt.args...)...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.want) {
				t.Fatalf("exit %d (want %d)\nstderr: %s\nwant it to contain %q", r.code, tt.code, r.stderr, tt.want)
			}
		})
	}
	// The source is untouched by the refusals.
	if keys, err := b.Keys(t.Context(), "example.com"); err != nil || len(keys) != 1 || keys[0].Rev != 1 {
		t.Errorf("source after refusals: %+v, %v", keys, err)
	}
}

// TestEtcdStateChecks: config check connects to etcd and says what is
// wrong (unreachable: 75; TLS: 78), rotate status says the store is
// unreachable (75), and a password file others can read is refused.
func TestEtcdStateChecks(t *testing.T) {
	c := testenv.StartEtcdWith(t, testenv.EtcdOptions{TLS: true})
	st := testenv.SoftHSM(t)
	uri := st.URIWithPINFile(t)
	tlsKeys := fmt.Sprintf("  tls: {ca: %q, cert: %q, key: %q}\n", c.TLS.CAFile, c.TLS.CertFile, c.TLS.KeyFile)

	good := etcdConfig(t, uri, c.Endpoints(), "/checks/", tlsKeys)
	r := runCLI(t, nil, "", "config", "check", "--config", good)
	if r.code != exitOK || !strings.Contains(r.stdout, "state: etcd") || !strings.Contains(r.stdout, ": ok") {
		t.Fatalf("config check, etcd with TLS: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}

	wrongCA := etcdConfig(t, uri, c.Endpoints(), "/checks/", fmt.Sprintf("  tls: {ca: %q, cert: %q, key: %q}\n", c.TLS.OtherCAFile, c.TLS.CertFile, c.TLS.KeyFile))
	r = runCLI(t, nil, "", "config", "check", "--config", wrongCA)
	if r.code != exitConfig || !strings.Contains(r.stderr, "TLS") {
		t.Fatalf("config check, wrong CA: exit %d (want %d)\nstderr: %s", r.code, exitConfig, r.stderr)
	}

	pw := filepath.Join(t.TempDir(), "etcd-password")
	if err := os.WriteFile(pw, []byte("secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	open := etcdConfig(t, uri, c.Endpoints(), "/checks/", tlsKeys+fmt.Sprintf("  username: dkimgw\n  password_file: %q\n", pw))
	r = runCLI(t, nil, "", "config", "check", "--config", open)
	if r.code != exitConfig || !strings.Contains(r.stderr, "readable by group or others") || strings.Contains(r.stderr, "secret") {
		t.Fatalf("config check, password file mode 644: exit %d (want %d)\nstderr: %s", r.code, exitConfig, r.stderr)
	}

	c.StopAll()
	r = runCLI(t, nil, "", "config", "check", "--config", good)
	if r.code != exitTempFail {
		t.Fatalf("config check, etcd down: exit %d (want %d)\nstderr: %s", r.code, exitTempFail, r.stderr)
	}
	r = runCLI(t, nil, "", "rotate", "status", "--config", good)
	if r.code != exitTempFail || !strings.Contains(r.stderr, "is unreachable") {
		t.Fatalf("rotate status, etcd down: exit %d (want %d)\nstderr: %s", r.code, exitTempFail, r.stderr)
	}
}

// TestActiveIn: the keyring's keys from a watched view are the active
// records only, in creation order, and a rotating domain without one
// gets an empty list (its mail then gets 451).
func TestActiveIn(t *testing.T) {
	view := map[string]map[string]rotation.Key{
		"example.com": {
			"ed2":  {Selector: "ed2", Algorithm: rotation.Ed25519, State: rotation.StateActive, CreatedAt: migT0.Add(time.Hour)},
			"rsa1": {Selector: "rsa1", Algorithm: rotation.RSA2048, State: rotation.StateActive, CreatedAt: migT0},
			"ed1":  {Selector: "ed1", Algorithm: rotation.Ed25519, State: rotation.StateRetired, CreatedAt: migT0},
			"ed3":  {Selector: "ed3", Algorithm: rotation.Ed25519, State: rotation.StateVisible, CreatedAt: migT0.Add(2 * time.Hour)},
		},
		"not-rotating.example": {"x": {Selector: "x", State: rotation.StateActive}},
	}
	pols := map[string]rotation.Policy{"example.com": {}, "example.org": {}}
	got := activeIn(view, pols)
	want := map[string][]rotation.ActiveKey{
		"example.com": {{Selector: "rsa1", Algorithm: rotation.RSA2048}, {Selector: "ed2", Algorithm: rotation.Ed25519}},
		"example.org": {},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || got["example.org"] == nil {
		t.Errorf("activeIn = %v, want %v", got, want)
	}
}

// TestComposeMultiConfig: the compose profile's two gateways load with
// the etcd state section as documented.
func TestComposeMultiConfig(t *testing.T) {
	cfg, err := policy.Load(filepath.Join(repoRoot, "deploy", "compose", "dkimgw-multi.yaml"))
	if err != nil {
		t.Fatalf("deploy/compose/dkimgw-multi.yaml: %v", err)
	}
	if cfg.State.Type != policy.StateEtcd || len(cfg.State.Endpoints) == 0 {
		t.Errorf("deploy/compose/dkimgw-multi.yaml: state %+v, want etcd with endpoints", cfg.State)
	}
	if err := checkRotation(cfg); err != nil {
		t.Errorf("deploy/compose/dkimgw-multi.yaml: rotation: %v", err)
	}
}
