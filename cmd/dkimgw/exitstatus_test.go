package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// statusCase provokes one exit status of one command with the real
// binary: run with args, the environment plus env, and stdin; want is a
// substring of what it prints (stdout and stderr together).
type statusCase struct {
	args  []string
	env   map[string]string
	stdin string
	want  string
	// serveUntilReady runs serve until it logs that it serves, then
	// sends SIGTERM.
	serveUntilReady bool
	// parallel runs the case beside the other parallel ones once the
	// walk is done: cases that wait out etcd's 5 s call timeout, and
	// depend on nothing the walk changes.
	parallel bool
}

// docRow is one row of docs/cli.md's exit-status table.
type docRow struct {
	command string
	status  int
}

func (r docRow) String() string { return fmt.Sprintf("%s %d", r.command, r.status) }

var docRowRe = regexp.MustCompile("^\\| `([a-z -]+)` \\| (\\d+) \\| .+ \\|$")

// readStatusTable parses the exit-status table of docs/cli.md.
func readStatusTable(t *testing.T) []docRow {
	t.Helper()
	data, err := os.ReadFile("../../docs/cli.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(data), "\n## Exit statuses\n")
	if !ok {
		t.Fatal("docs/cli.md has no \"## Exit statuses\" section")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var rows []docRow
	for line := range strings.SplitSeq(section, "\n") {
		m := docRowRe.FindStringSubmatch(line)
		if m == nil {
			if strings.HasPrefix(line, "| `") {
				t.Errorf("docs/cli.md: exit-status row not understood: %s", line)
			}
			continue
		}
		n, _ := strconv.Atoi(m[2])
		rows = append(rows, docRow{m[1], n})
	}
	if len(rows) < 20 {
		t.Fatalf("docs/cli.md: only %d exit-status rows found", len(rows))
	}
	return rows
}

// TestDocumentedExitStatuses provokes every exit status docs/cli.md
// documents, command by command, with the real binary, and fails on a
// documented status no case provokes and on a case the table lacks: the
// documentation and the code cannot drift apart.
func TestDocumentedExitStatuses(t *testing.T) {
	rows := readStatusTable(t)
	tool := testenv.Require(t, "pkcs11-tool")[0]
	bin := buildBinary(t, t.TempDir())
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}

	// The token: a usable RSA key "rsa", a key to destroy, and a key
	// dkimgw refuses (RSA-1024, made with pkcs11-tool).
	st := testenv.SoftHSM(t)
	uri := st.URIWithPINFile(t)
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, sel := range []string{"rsa", "victim"} {
		if _, err := tok.GenerateKey(t.Context(), "example.com", sel, hsm.RSA2048); err != nil {
			t.Fatal(err)
		}
	}
	tok.Close()
	// The second, alone in a rotating domain, is adopted by rotate's
	// pass, which then refuses it.
	for _, weak := range []struct{ label, id string }{{"weak._domainkey.example.com", "0a0b"}, {"weak._domainkey.weakrot.example.com", "0a0c"}} {
		if out, err := exec.Command(tool, "--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN,
			"--keypairgen", "--key-type", "rsa:1024", "--label", weak.label, "--id", weak.id).CombinedOutput(); err != nil {
			t.Fatalf("pkcs11-tool --keypairgen: %v\n%s", err, out)
		}
	}
	// A second token with the audit key, for export-key and verify-log.
	st2 := testenv.SoftHSM(t)
	tok2, err := hsm.Open(t.Context(), st2.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tok2.GenerateAuditKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	tok2.Close()
	// A third token that nothing gives an audit key (serve, run on the
	// first one, generates one there).
	st3 := testenv.SoftHSM(t)

	wrongPIN := strings.Replace(st.URI(), st.PIN, "x"+st.PIN, 1)
	noToken := "pkcs11:token=no-such-token?module-path=" + st.Module + "&pin-value=1"
	badPINFile := write("open-pin", st.PIN+"\n", 0o600)
	os.Chmod(badPINFile, 0o644)
	worldReadablePIN := "pkcs11:token=" + st.Label + "?module-path=" + st.Module + "&pin-source=file:" + badPINFile
	wrongPINFile := "pkcs11:token=" + st.Label + "?module-path=" + st.Module + "&pin-source=file:" + write("wrong-pin", "x"+st.PIN+"\n", 0o600)
	env := map[string]string{hsmEnv: uri}
	// The same token behind the PKCS#11 fault shim, failing every
	// C_OpenSession with CKR_DEVICE_ERROR: a device that is unwell at
	// start (an HSM rebooting), which may answer later.
	fault := testenv.NewPKCS11Fault(t)
	fault.Set(t, testenv.PKCS11FaultSpec{Error: testenv.CKRDeviceError, ErrorOps: []string{"C_OpenSession"}})
	deviceErrorEnv := map[string]string{hsmEnv: fault.URI(st.URI())}
	for _, kv := range fault.Env() {
		k, v, _ := strings.Cut(kv, "=")
		deviceErrorEnv[k] = v
	}

	capture := filepath.Join(dir, "capture")
	os.Mkdir(capture, 0o700)
	config := func(name, uri, extra string) string {
		data := filepath.Join(dir, name+"-data")
		os.Mkdir(data, 0o700)
		return write(name+".yaml", fmt.Sprintf(`hsm: {uri: %q}
smtp: {listen: "127.0.0.1:0"}
upstream: {address: "capture:%s"}
clients: [{name: local, networks: ["127.0.0.0/8"], domains: [example.com]}]
data_dir: %q
admin: {listen: ""}
%s`, uri, capture, data, extra), 0o600)
	}
	good := config("good", uri, "domains: {example.com: {selectors: [rsa]}}\n")
	// hsm.uri left out: serve and config check take $DKIMGW_HSM.
	noURI := write("no-uri.yaml", regexp.MustCompile(`(?m)^hsm: .*\n`).ReplaceAllString(mustRead(t, good), ""), 0o600)
	missingKey := config("missing-key", uri, "domains: {example.com: {selectors: [nokey]}}\n")
	weakKey := config("weak-key", uri, "domains: {example.com: {selectors: [weak]}}\n")
	wrongPINConf := config("wrong-pin", wrongPINFile, "domains: {example.com: {selectors: [rsa]}}\n")
	noTokenConf := config("no-token", noToken, "domains: {example.com: {selectors: [rsa]}}\n")
	openPINConf := config("open-pin", worldReadablePIN, "domains: {example.com: {selectors: [rsa]}}\n")
	unknownKey := config("unknown-key", uri, "domains: {example.com: {selectors: [rsa]}}\nshutdown_grase: 1s\n")
	badAudit := config("bad-audit", uri, "domains: {example.com: {selectors: [rsa]}}\naudit: {path: "+filepath.Join(badPINFile, "audit.log")+"}\n")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	portInUse := write("port-in-use.yaml", strings.Replace(mustRead(t, good), `"127.0.0.1:0"`, `"`+busy.Addr().String()+`"`, 1), 0o600)
	const rotatingDomains = `domains:
  example.com: {selectors: [rsa]}
  rot.example.com: {rotation: {publisher: byhand}}
dns:
  publishers: {byhand: {type: manual}}
  check_servers: ["127.0.0.1:1"]
  timeout: 1s
`
	rotating := config("rotating", uri, rotatingDomains)
	// The same on a fresh state, where dns check has nothing to ask.
	rotatingFresh := config("rotating-fresh", uri, rotatingDomains)
	rotatingWeak := config("rotating-weak", uri, `domains:
  example.com: {selectors: [rsa]}
  weakrot.example.com: {rotation: {algorithms: [rsa-2048], publisher: byhand}}
dns:
  publishers: {byhand: {type: manual}}
  check_servers: ["127.0.0.1:1"]
  timeout: 1s
`)
	// Its state plans rsa-2048 key "weak", as a pass interrupted between
	// planning and recording the generated key leaves it: the next pass
	// finds the token's key under that selector, RSA-1024.
	weakState, err := rotation.OpenBolt(filepath.Join(dir, "rotating-weak-data"))
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := weakState.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := weakState.Update(t.Context(), rotation.Change{Key: rotation.Key{
		Domain: "weakrot.example.com", Selector: "weak", Algorithm: rotation.Algorithm("rsa-2048"),
		State: rotation.StatePlanned, CreatedAt: time.Now(), Since: time.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	// A step fails: the DNS server refuses the update, because its
	// update-policy grants the TSIG key only names under _domainkey of
	// the zone's apex, and this domain is below the apex. The first pass
	// only generates the key (exit 0, here); the walk's pass is the
	// second, whose publish step fails; the next would retry.
	bind := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 1})
	refusing := config("rotating-step-fails", uri, fmt.Sprintf(`domains:
  example.com: {selectors: [rsa]}
  sub.%[1]s: {rotation: {algorithms: [ed25519], publisher: bind, zone: %[1]q}}
dns:
  publishers:
    bind: {type: rfc2136, server: %[2]q, zone: %[1]q, tsig: {name: %[3]q, algorithm: %[4]s, secret_file: %[5]q}}
  check_servers: [%[2]q]
  timeout: 2s
`, strings.TrimSuffix(bind.Zone, "."), bind.Addr, bind.Keys[0].Name, bind.Keys[0].Algorithm, bind.KeyFile(t, bind.Keys[0])))
	if code, out := runStatusCase(t, bin, statusCase{args: []string{"rotate", "--config", refusing}}); code != 0 || !strings.Contains(out, "generated the key") {
		t.Fatalf("the first pass of rotating-step-fails: exit %d, want 0 and the key generated:\n%s", code, out)
	}
	rotatingWrongPIN := strings.Replace(mustRead(t, rotating), uri, wrongPINFile, 1)
	rotatingWrongPINConf := write("rotating-wrong-pin.yaml", rotatingWrongPIN, 0o600)
	// The audit review of a token with nothing wrong in it: only a
	// rotating domain, no key yet, so no DNS to ask.
	cleanAudit := write("clean-audit.yaml", fmt.Sprintf(`hsm: {uri: %q}
upstream: {address: "capture:%s"}
clients: [{name: local, networks: ["127.0.0.0/8"], domains: [rot.example.com]}]
data_dir: %q
admin: {listen: ""}
domains:
  rot.example.com: {rotation: {publisher: byhand}}
dns:
  publishers: {byhand: {type: manual}}
  check_servers: ["127.0.0.1:1"]
  timeout: 1s
`, st3.URI(), capture, filepath.Join(dir, "clean-audit-data")), 0o600)
	os.Mkdir(filepath.Join(dir, "clean-audit-data"), 0o700)

	// An audit log: records from keys generate, sealed by nobody
	// (verify-log with the token's key checks the chain), and a copy
	// with one record changed.
	auditLog := filepath.Join(dir, "audit.log")
	if out, err := exec.Command(bin, "keys", "generate", "--hsm", st2.URI(), "--domain", "example.com", "--selector", "logged", "--audit-log", auditLog).CombinedOutput(); err != nil {
		t.Fatalf("keys generate for the audit log: %v\n%s", err, out)
	}
	brokenLog := write("broken.log", strings.Replace(mustRead(t, auditLog), `"logged"`, `"forged"`, 1), 0o600)
	initExists := filepath.Join(dir, "init-exists")
	write("init-exists/dkimgw.yaml", "# kept\n", 0o600)
	initArgs := func(dir string, uri string) []string {
		return []string{"init", "--yes", "--hsm", uri, "--domain", "example.com", "--upstream", "127.0.0.1:10026",
			"--dir", filepath.Join(dir), "--data-dir", dir + "-data"}
	}
	msg := "From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"

	// The milter: configurations with milter.listen, and a regular file
	// where a socket should be.
	const milterListen = "milter: {listen: \"inet:127.0.0.1:0\"}\n"
	milterGood := config("milter", uri, "domains: {example.com: {selectors: [rsa]}}\n"+milterListen)
	milterMissingKey := config("milter-missing-key", uri, "domains: {example.com: {selectors: [nokey]}}\n"+milterListen)
	milterWrongPIN := config("milter-wrong-pin", wrongPINFile, "domains: {example.com: {selectors: [rsa]}}\n"+milterListen)
	milterBusy := config("milter-busy", uri, "domains: {example.com: {selectors: [rsa]}}\nmilter: {listen: \"inet:"+busy.Addr().String()+"\"}\n")
	milterNotSocket := config("milter-not-socket", uri, "domains: {example.com: {selectors: [rsa]}}\nmilter: {listen: \"unix:"+badPINFile+"\"}\n")
	milterBadAudit := config("milter-bad-audit", uri, "domains: {example.com: {selectors: [rsa]}}\naudit: {path: "+filepath.Join(badPINFile, "audit.log")+"}\n"+milterListen)
	keyTable := write("opendkim/KeyTable", "k1 example.com:mail:/etc/opendkim/keys/mail.private\n", 0o600)
	signingTable := write("opendkim/SigningTable", "*@example.com k1\n", 0o600)
	unknownName := write("opendkim/SigningTable.unknown", "*@example.com k2\n", 0o600)
	percentOnly := write("opendkim/SigningTable.percent", "* k1\n", 0o600)
	importArgs := func(extra ...string) []string {
		return append([]string{"milter", "import-opendkim", "--keytable", keyTable, "--signingtable", "refile:" + signingTable}, extra...)
	}

	// state migrate and rotate status against etcd: a running cluster
	// with an empty prefix and a prefix with records, and an endpoint
	// nothing answers on.
	etcd := testenv.StartEtcd(t)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadEndpoint := "http://" + dead.Addr().String()
	dead.Close()
	edKey := func(sel string) rotation.Key {
		return rotation.Key{Domain: "example.com", Selector: sel, Algorithm: rotation.Ed25519, State: rotation.StateActive,
			Created: true, Record: "v=DKIM1; k=ed25519; p=AAAA", Since: migT0, CreatedAt: migT0, ActivatedAt: migT0}
	}
	full := openEtcdForTest(t, etcd.Endpoints(), "/walk-full/")
	if err := full.Update(t.Context(), rotation.Change{Key: edKey("ed-etcd")}); err != nil {
		t.Fatal(err)
	}
	// A bbolt state to copy, and one whose active key conflicts with
	// the one in etcd.
	boltSrc, boltConflict := filepath.Join(dir, "bolt-src"), filepath.Join(dir, "bolt-conflict")
	for d, sel := range map[string]string{boltSrc: "ed-bolt", boltConflict: "ed-other"} {
		b := openBoltForTest(t, d)
		if err := b.Update(t.Context(), rotation.Change{Key: edKey(sel)}); err != nil {
			t.Fatal(err)
		}
		b.Close()
	}
	etcdEmpty := etcdConfig(t, uri, etcd.Endpoints(), "/walk-empty/", "")
	etcdFull := etcdConfig(t, uri, etcd.Endpoints(), "/walk-full/", "")
	etcdDead := etcdConfig(t, uri, []string{deadEndpoint}, "/walk/", "")
	const timeout1ns = "1ns"

	cases := map[string][]statusCase{
		"init 0":  {{args: initArgs(filepath.Join(dir, "init-ok"), st.URI()), want: "Publish these DNS records"}},
		"init 64": {{args: []string{"init", "--yes", "--hsm", uri, "--upstream", "127.0.0.1:25"}, want: "at least one --domain"}},
		"init 73": {{args: initArgs(initExists, st.URI()), want: "give --force"}},
		"init 75": {{args: append(initArgs(filepath.Join(dir, "init-timeout"), st.URI()), "--timeout", timeout1ns)}},
		"init 77": {{args: initArgs(filepath.Join(dir, "init-pin"), wrongPIN), want: "PIN incorrect"}},
		"init 78": {{args: initArgs(filepath.Join(dir, "init-token"), noToken), want: "SOFTHSM2_CONF"}},

		"keys generate 0":  {{args: []string{"keys", "generate", "--domain", "example.com", "--selector", "new", "--audit-log", filepath.Join(dir, "gen.log")}, env: env, want: "IN TXT"}},
		"keys generate 64": {{args: []string{"keys", "generate", "--domain", "example.com", "--selector", "s", "--algorithm", "rsa-1024"}, env: env, want: "below 2048"}},
		"keys generate 73": {{args: []string{"keys", "generate", "--domain", "example.com", "--selector", "rsa", "--audit-log", filepath.Join(dir, "gen.log")}, env: env, want: "already exists"}},
		"keys generate 75": {{args: []string{"keys", "generate", "--domain", "example.com", "--selector", "t", "--timeout", timeout1ns, "--audit-log", filepath.Join(dir, "gen.log")}, env: env}},
		"keys generate 77": {{args: []string{"keys", "generate", "--hsm", wrongPIN, "--domain", "example.com", "--selector", "t", "--audit-log", filepath.Join(dir, "gen.log")}, want: "PIN incorrect"}},
		"keys generate 78": {{args: []string{"keys", "generate", "--hsm", worldReadablePIN, "--domain", "example.com", "--selector", "t", "--audit-log", filepath.Join(dir, "gen.log")}, want: "chmod 600"}},

		"keys list 0":  {{args: []string{"keys", "list"}, env: env, want: "weak._domainkey.example.com is not usable"}},
		"keys list 64": {{args: []string{"keys", "list", "extra"}, env: env, want: "unexpected argument"}},
		"keys list 75": {{args: []string{"keys", "list", "--timeout", timeout1ns}, env: env}, {args: []string{"keys", "list"}, env: deviceErrorEnv, want: "CKR_DEVICE_ERROR"}},
		"keys list 77": {{args: []string{"keys", "list", "--hsm", wrongPIN}, want: "PIN incorrect"}},
		"keys list 78": {{args: []string{"keys", "list", "--hsm", noToken}, want: "SOFTHSM2_CONF"}},

		"keys dns 0":  {{args: []string{"keys", "dns", "--domain", "example.com", "--selector", "rsa"}, env: env, want: "IN TXT"}},
		"keys dns 64": {{args: []string{"keys", "dns", "--domain", "example.com"}, env: env, want: "--selector"}},
		"keys dns 69": {
			{args: []string{"keys", "dns", "--domain", "example.com", "--selector", "nokey"}, env: env, want: "not found"},
			{args: []string{"keys", "dns", "--domain", "example.com", "--selector", "weak"}, env: env, want: "too weak"},
		},
		"keys dns 75": {{args: []string{"keys", "dns", "--domain", "example.com", "--selector", "rsa", "--timeout", timeout1ns}, env: env}},
		"keys dns 77": {{args: []string{"keys", "dns", "--hsm", wrongPIN, "--domain", "example.com", "--selector", "rsa"}, want: "PIN incorrect"}},
		"keys dns 78": {{args: []string{"keys", "dns", "--hsm", noToken, "--domain", "example.com", "--selector", "rsa"}, want: "SOFTHSM2_CONF"}},

		"keys destroy 0":  {{args: []string{"keys", "destroy", "--domain", "example.com", "--selector", "victim", "--yes", "--audit-log", filepath.Join(dir, "gen.log")}, env: env, want: "destroyed"}},
		"keys destroy 64": {{args: []string{"keys", "destroy", "--domain", "example.com", "--selector", "rsa"}, env: env, want: "--yes"}},
		"keys destroy 69": {{args: []string{"keys", "destroy", "--domain", "example.com", "--selector", "nokey", "--yes", "--audit-log", filepath.Join(dir, "gen.log")}, env: env, want: "not found"}},
		"keys destroy 75": {{args: []string{"keys", "destroy", "--domain", "example.com", "--selector", "rsa", "--yes", "--timeout", timeout1ns, "--audit-log", filepath.Join(dir, "gen.log")}, env: env}},
		"keys destroy 77": {{args: []string{"keys", "destroy", "--hsm", wrongPIN, "--domain", "example.com", "--selector", "rsa", "--yes", "--audit-log", filepath.Join(dir, "gen.log")}, want: "PIN incorrect"}},
		"keys destroy 78": {{args: []string{"keys", "destroy", "--hsm", noToken, "--domain", "example.com", "--selector", "rsa", "--yes", "--audit-log", filepath.Join(dir, "gen.log")}, want: "SOFTHSM2_CONF"}},

		"sign 0": {{args: []string{"sign", "--domain", "example.com", "--selector", "rsa", "--expire", "7d"}, env: env, stdin: msg, want: "DKIM-Signature:"}},
		"sign 64": {
			{args: []string{"sign", "--domain", "example.com", "--selector", "rsa", "--selector", "rsa"}, env: env, stdin: msg, want: "given twice"},
			{args: []string{"sign", "--domain", "example.com", "--selector", "rsa", "--expire", "soon"}, env: env, stdin: msg, want: "--expire 7d"},
		},
		"sign 65": {{args: []string{"sign", "--domain", "example.com", "--selector", "rsa"}, env: env, stdin: "Subject: no from\r\n\r\nbody\r\n", want: "From"}},
		"sign 69": {
			{args: []string{"sign", "--domain", "example.com", "--selector", "nokey"}, env: env, stdin: msg, want: "not found"},
			{args: []string{"sign", "--domain", "example.com", "--selector", "weak"}, env: env, stdin: msg, want: "too weak"},
		},
		"sign 75": {{args: []string{"sign", "--domain", "example.com", "--selector", "rsa", "--timeout", timeout1ns}, env: env, stdin: msg}},
		"sign 77": {{args: []string{"sign", "--hsm", wrongPIN, "--domain", "example.com", "--selector", "rsa"}, stdin: msg, want: "PIN incorrect"}},
		"sign 78": {
			{args: []string{"sign", "--hsm", noToken, "--domain", "example.com", "--selector", "rsa"}, stdin: msg, want: "SOFTHSM2_CONF"},
			{args: []string{"sign", "--hsm", worldReadablePIN, "--domain", "example.com", "--selector", "rsa"}, stdin: msg, want: "chmod 600"},
			{args: []string{"sign", "--hsm", "pkcs11:token=x?module-path=" + st.Module + "&pin-source=env:NO_SUCH_PIN", "--domain", "example.com", "--selector", "rsa"}, stdin: msg, want: "env:NO_SUCH_PIN"},
		},

		"serve 0": {
			{args: []string{"serve", "--config", good}, serveUntilReady: true, want: "stopped"},
			{args: []string{"serve", "--config", noURI}, env: env, serveUntilReady: true, want: "stopped"},
		},
		"serve 64": {{args: []string{"serve", "--config", good, "extra"}, want: "unexpected argument"}},
		"serve 69": {{args: []string{"serve", "--config", missingKey}, want: "not found"}, {args: []string{"serve", "--config", weakKey}, want: "too weak"}},
		"serve 71": {{args: []string{"serve", "--config", portInUse}, want: "address already in use"}},
		"serve 73": {{args: []string{"serve", "--config", badAudit}, want: "audit.path"}},
		"serve 77": {{args: []string{"serve", "--config", wrongPINConf}, want: "PIN incorrect"}},
		"serve 78": {
			{args: []string{"serve", "--config", unknownKey}, want: "did you mean shutdown_grace?"},
			{args: []string{"serve", "--config", noTokenConf}, want: "SOFTHSM2_CONF"},
			{args: []string{"serve", "--config", openPINConf}, want: "chmod 600"},
		},

		"milter 0":  {{args: []string{"milter", "--config", milterGood}, serveUntilReady: true, want: "stopped"}},
		"milter 64": {{args: []string{"milter", "--config", milterGood, "extra"}, want: "unexpected argument"}},
		"milter 69": {{args: []string{"milter", "--config", milterMissingKey}, want: "not found"}},
		"milter 71": {
			{args: []string{"milter", "--config", milterBusy}, want: "address already in use"},
			{args: []string{"milter", "--config", milterNotSocket}, want: "is not a socket"},
		},
		"milter 73": {{args: []string{"milter", "--config", milterBadAudit}, want: "audit.path"}},
		"milter 77": {{args: []string{"milter", "--config", milterWrongPIN}, want: "PIN incorrect"}},
		"milter 78": {
			{args: []string{"milter", "--config", good}, want: "milter.listen is required"},
			{args: []string{"milter", "--config", unknownKey}, want: "did you mean shutdown_grace?"},
		},

		"milter import-opendkim 0":  {{args: importArgs(), want: "mail-hsm"}, {args: importArgs("--out", filepath.Join(dir, "imported.yaml")), want: "configuration written"}},
		"milter import-opendkim 64": {{args: []string{"milter", "import-opendkim", "--keytable", keyTable}, want: "--signingtable are required"}},
		"milter import-opendkim 65": {
			{args: []string{"milter", "import-opendkim", "--keytable", keyTable, "--signingtable", unknownName}, want: "is not in the KeyTable"},
			{args: []string{"milter", "import-opendkim", "--keytable", keyTable, "--signingtable", percentOnly}, want: "could be converted"},
		},
		"milter import-opendkim 66": {{args: []string{"milter", "import-opendkim", "--keytable", filepath.Join(dir, "none"), "--signingtable", signingTable}, want: "no such file"}},
		"milter import-opendkim 73": {{args: importArgs("--out", filepath.Join(badPINFile, "out.yaml")), want: "not a directory"}},

		"config check 0":  {{args: []string{"config", "check", "--config", good}, want: "OK"}, {args: []string{"config", "check", "--config", noURI}, env: env, want: "OK"}},
		"config check 64": {{args: []string{"config", "check", "--config", good, "extra"}, want: "unexpected argument"}},
		"config check 69": {{args: []string{"config", "check", "--config", missingKey}, want: "not found"}, {args: []string{"config", "check", "--config", weakKey}, want: "too weak"}},
		"config check 75": {{args: []string{"config", "check", "--config", good, "--timeout", timeout1ns}}},
		"config check 77": {{args: []string{"config", "check", "--config", wrongPINConf}, want: "PIN incorrect"}},
		"config check 78": {
			{args: []string{"config", "check", "--config", unknownKey}, want: "did you mean shutdown_grace?"},
			{args: []string{"config", "check", "--config", noTokenConf}, want: "SOFTHSM2_CONF"},
			{args: []string{"config", "check", "--config", openPINConf}, want: "chmod 600"},
		},

		"rotate 0":         {{args: []string{"rotate", "--config", rotating, "--dry-run"}}, {args: []string{"rotate", "--config", rotating}, want: "generated the key"}},
		"rotate 1":         {{args: []string{"rotate", "--config", refusing}, want: "REFUSED"}},
		"rotate 64":        {{args: []string{"rotate", "--config", rotating, "--emergency"}, want: "--emergency needs --domain"}},
		"rotate 69":        {{args: []string{"rotate", "--config", rotatingWeak}, want: "too weak"}},
		"rotate 75":        {{args: []string{"rotate", "--config", rotating, "--timeout", timeout1ns}}},
		"rotate 77":        {{args: []string{"rotate", "--config", rotatingWrongPINConf}, want: "PIN incorrect"}},
		"rotate 78":        {{args: []string{"rotate", "--config", good}, want: "no domain has a rotation policy"}},
		"rotate status 0":  {{args: []string{"rotate", "status", "--config", rotating}}},
		"rotate status 75": {{args: []string{"rotate", "status", "--config", etcdDead}, want: "unreachable", parallel: true}},

		"state migrate 0":  {{args: []string{"state", "migrate", "--config", etcdEmpty, "--from", "bbolt:" + boltSrc, "--to", "etcd"}, want: "copied 1 records"}},
		"state migrate 1":  {{args: []string{"state", "migrate", "--config", etcdFull, "--from", "etcd", "--to", "bbolt:" + boltConflict, "--force"}, want: "two active"}},
		"state migrate 64": {{args: []string{"state", "migrate", "--config", etcdEmpty, "--from", "bbolt:" + boltSrc, "--to", "bbolt:" + boltConflict}, want: "want --from"}},
		"state migrate 66": {{args: []string{"state", "migrate", "--config", etcdEmpty, "--from", "bbolt:" + filepath.Join(dir, "none"), "--to", "etcd"}, want: "source"}},
		"state migrate 73": {
			{args: []string{"state", "migrate", "--config", etcdFull, "--from", "bbolt:" + boltSrc, "--to", "etcd"}, want: "already has records"},
			{args: []string{"state", "migrate", "--config", etcdFull, "--from", "etcd", "--to", "bbolt:" + boltSrc}, want: "already has records"},
		},
		"state migrate 75": {{args: []string{"state", "migrate", "--config", etcdDead, "--from", "bbolt:" + boltSrc, "--to", "etcd"}, want: "did not answer", parallel: true}},
		"state migrate 78": {
			{args: []string{"state", "migrate", "--config", rotating, "--from", "bbolt:" + boltSrc, "--to", "etcd"}, want: "state.type is \"bbolt\""},
			{args: []string{"state", "migrate", "--config", unknownKey, "--from", "bbolt:" + boltSrc, "--to", "etcd"}, want: "did you mean"},
		},

		"dns pending 0":  {{args: []string{"dns", "pending", "--config", rotating}}},
		"dns pending 64": {{args: []string{"dns", "pending", "--config", rotating, "--format", "bind"}, want: "--format"}},
		"dns pending 78": {{args: []string{"dns", "pending", "--config", unknownKey}, want: "did you mean"}},
		"dns check 0":    {{args: []string{"dns", "check", "--config", rotatingFresh}, want: "0 records checked"}},
		"dns check 1":    {{args: []string{"dns", "check", "--config", rotating}, want: "MISMATCH"}}, // after rotate 0 generated a key
		"dns check 64":   {{args: []string{"dns", "check", "--config", rotating, "extra"}, want: "unexpected argument"}},
		"dns check 75":   {{args: []string{"dns", "check", "--config", rotating, "--timeout", timeout1ns}}},
		"dns check 77":   {{args: []string{"dns", "check", "--config", rotatingWrongPINConf}, want: "PIN incorrect"}},
		"dns check 78":   {{args: []string{"dns", "check", "--config", unknownKey}, want: "did you mean"}},

		"audit 0":  {{args: []string{"audit", "--config", cleanAudit}, want: "KEY"}},
		"audit 1":  {{args: []string{"audit", "--config", rotatingFresh}, want: "ERROR: weak._domainkey.example.com"}},
		"audit 64": {{args: []string{"audit", "--config", cleanAudit, "extra"}, want: "unexpected argument"}},
		"audit 75": {{args: []string{"audit", "--config", cleanAudit, "--timeout", timeout1ns}}},
		"audit 77": {{args: []string{"audit", "--config", rotatingWrongPINConf}, want: "PIN incorrect"}},
		"audit 78": {{args: []string{"audit", "--config", unknownKey}, want: "did you mean"}},

		"audit verify-log 0":  {{args: []string{"audit", "verify-log", "--path", auditLog, "--hsm", st2.URI()}, want: "verify"}},
		"audit verify-log 65": {{args: []string{"audit", "verify-log", "--path", brokenLog, "--hsm", st2.URI()}, want: "BROKEN"}},
		"audit verify-log 66": {{args: []string{"audit", "verify-log", "--path", filepath.Join(dir, "none.log"), "--hsm", st2.URI()}, want: "no such file"}},
		"audit verify-log 69": {{args: []string{"audit", "verify-log", "--path", auditLog, "--hsm", st3.URI()}, want: hsm.AuditKeyLabel}},
		"audit verify-log 75": {{args: []string{"audit", "verify-log", "--path", auditLog, "--hsm", st2.URI(), "--timeout", timeout1ns}}},
		"audit verify-log 77": {{args: []string{"audit", "verify-log", "--path", auditLog, "--hsm", strings.Replace(st2.URI(), st2.PIN, "x"+st2.PIN, 1)}, want: "PIN incorrect"}},
		"audit export-key 0":  {{args: []string{"audit", "export-key", "--hsm", st2.URI()}, want: "BEGIN PUBLIC KEY"}},
		"audit export-key 69": {{args: []string{"audit", "export-key", "--hsm", st3.URI()}, want: hsm.AuditKeyLabel}},

		"version 0":  {{args: []string{"version"}, want: "go: go1."}, {args: []string{"--version"}, want: "commit: "}},
		"version 64": {{args: []string{"version", "extra"}, want: "unexpected argument"}},
		"help 0":     {{args: []string{"help"}, want: "--version"}, {args: []string{"help", "init"}, want: "usage: dkimgw init"}},
	}

	documented := map[string]bool{}
	for _, r := range rows {
		documented[r.String()] = true
		if len(cases[r.String()]) == 0 {
			t.Errorf("docs/cli.md documents %q, and no case provokes it", r)
		}
	}
	for key := range cases {
		if !documented[key] {
			t.Errorf("a case provokes %q, which docs/cli.md does not document", key)
		}
	}
	for _, r := range rows {
		for i, tc := range cases[r.String()] {
			t.Run(fmt.Sprintf("%s/%d", strings.ReplaceAll(r.String(), " ", "_"), i), func(t *testing.T) {
				if tc.parallel {
					t.Parallel()
				}
				code, out := runStatusCase(t, bin, tc)
				if code != r.status || !strings.Contains(out, tc.want) {
					t.Errorf("dkimgw %s: exit %d, want %d and output with %q:\n%s", strings.Join(tc.args, " "), code, r.status, tc.want, out)
				}
			})
		}
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// runStatusCase runs the binary for one case and returns its exit status
// and its output, stdout then stderr.
func runStatusCase(t *testing.T, bin string, tc statusCase) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, tc.args...)
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, hsmEnv+"=") })
	// The race detector waits 1s at exit for late reports by default;
	// a tenth of that keeps the walk fast and still reports them.
	cmd.Env = append(cmd.Env, "GORACE=atexit_sleep_ms=100")
	for k, v := range tc.env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(tc.stdin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	if !tc.serveUntilReady {
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		if err != nil && cmd.ProcessState == nil {
			t.Fatalf("run dkimgw: %v", err)
		}
		return cmd.ProcessState.ExitCode(), stdout.String() + stderr.String()
	}
	pr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	sc := bufio.NewScanner(pr)
	serving := false
	for sc.Scan() {
		log.WriteString(sc.Text() + "\n")
		if !serving && (strings.Contains(sc.Text(), `msg="dkimgw serving"`) || strings.Contains(sc.Text(), `msg="dkimgw milter serving"`)) {
			serving = true
			_ = cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	_ = cmd.Wait()
	if !serving {
		t.Errorf("serve never logged that it serves")
	}
	return cmd.ProcessState.ExitCode(), stdout.String() + log.String()
}

// TestHelpNamesDocumentedStatuses checks that each command's --help
// names, in its exit-status paragraph, every status docs/cli.md
// documents for it.
func TestHelpNamesDocumentedStatuses(t *testing.T) {
	for _, r := range readStatusTable(t) {
		if r.command == "help" || r.command == "version" {
			continue // no --help of their own
		}
		words := strings.Fields(r.command)
		res := runCLI(t, nil, "", append(words, "--help")...)
		_, statuses, ok := strings.Cut(res.stdout, "Exit status")
		if !ok && len(words) == 2 {
			// A subcommand's statuses are in its command's help.
			res = runCLI(t, nil, "", words[0], "--help")
			_, statuses, ok = strings.Cut(res.stdout, "Exit status")
		}
		if res.code != exitOK || !ok {
			t.Errorf("%s --help: exit %d, no exit-status paragraph", r.command, res.code)
			continue
		}
		switch r.command {
		case "audit":
			statuses, _, _ = strings.Cut(statuses, "Exit status of verify-log")
		case "audit verify-log", "audit export-key":
			_, statuses, _ = strings.Cut(res.stdout, "Exit status of "+words[1])
		}
		if !regexp.MustCompile(`\b` + strconv.Itoa(r.status) + `\b`).MatchString(statuses) {
			t.Errorf("%s --help does not name exit status %d, which docs/cli.md documents", r.command, r.status)
		}
	}
}
