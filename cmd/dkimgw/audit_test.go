package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

// readAudit returns the records of an audit log.
func readAudit(t *testing.T, path string) []audit.Record {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var recs []audit.Record
	for l := range strings.Lines(string(b)) {
		var r audit.Record
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// TestAuditKeyCommandsAndVerifyLog: keys generate and destroy record
// what they did with the Unix user, seal the log with the token's audit
// key, and verify-log checks it with the token and with an exported key.
func TestAuditKeyCommandsAndVerifyLog(t *testing.T) {
	st := testenv.SoftHSM(t)
	logPath := filepath.Join(t.TempDir(), "audit", "audit.log")
	env := map[string]string{hsmEnv: st.URIWithPINFile(t), auditEnv: logPath}
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}

	// Before the audit key exists, records are written but not sealed.
	if r := runCLI(t, env, "", "keys", "generate", "--domain", "example.com", "--selector", "s1", "--algorithm", "ed25519"); r.code != 0 {
		t.Fatalf("keys generate: %d %s", r.code, r.stderr)
	}
	if r := runCLI(t, env, "", "audit", "verify-log", "--path", logPath); r.code != exitUnavailable || !strings.Contains(r.stderr, hsm.AuditKeyLabel) {
		t.Errorf("verify-log without an audit key: exit %d, %s", r.code, r.stderr)
	}
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if _, err := tok.GenerateAuditKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"keys", "generate", "--domain", "example.com", "--selector", "s2"},
		{"keys", "generate", "--domain", "example.com", "--selector", "s2"}, // exists: recorded as failed
		{"keys", "destroy", "--domain", "example.com", "--selector", "s1", "--yes"},
	} {
		runCLI(t, env, "", args...)
	}
	recs := readAudit(t, logPath)
	want := []struct{ event, selector, result string }{
		{audit.EventKeyGenerated, "s1", "ok"},
		{audit.EventKeyGenerated, "s2", "ok"},
		{audit.EventCheckpoint, "", ""},
		{audit.EventKeyGenerated, "s2", "failed"},
		{audit.EventCheckpoint, "", ""},
		{audit.EventKeyDestroyed, "s1", "ok"},
		{audit.EventCheckpoint, "", ""},
	}
	if len(recs) != len(want) {
		t.Fatalf("%d records, want %d: %+v", len(recs), len(want), recs)
	}
	for i, w := range want {
		r := recs[i]
		if r.Event != w.event || r.Selector != w.selector || (w.result != "" && r.Details["result"] != w.result) {
			t.Errorf("record %d = %s %s %v, want %s %s %s", i+1, r.Event, r.Selector, r.Details["result"], w.event, w.selector, w.result)
		}
		if r.Actor != me.Username {
			t.Errorf("record %d actor %q, want the Unix user %q", i+1, r.Actor, me.Username)
		}
		if w.event != audit.EventCheckpoint && w.result == "ok" && r.KeyID == "" {
			t.Errorf("record %d has no key id", i+1)
		}
	}

	// With the token, with an exported key, and without the token.
	r := runCLI(t, env, "", "audit", "verify-log", "--path", logPath)
	if r.code != 0 || !strings.Contains(r.stdout, "7 records, 3 checkpoints") || strings.Contains(r.stdout, "warning") {
		t.Fatalf("verify-log with the token: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = runCLI(t, env, "", "audit", "export-key")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "-----BEGIN PUBLIC KEY-----") {
		t.Fatalf("export-key: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	pemFile := filepath.Join(t.TempDir(), "audit.pem")
	os.WriteFile(pemFile, []byte(r.stdout), 0o644)
	auditor := map[string]string{} // no token access
	if r := runCLI(t, auditor, "", "audit", "verify-log", "--path", logPath, "--pubkey", pemFile); r.code != 0 {
		t.Fatalf("verify-log --pubkey: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// An unsealed record is a warning.
	l, err := audit.Open(logPath, audit.Options{Actor: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Record(t.Context(), audit.Event{Event: "test"}); err != nil {
		t.Fatal(err)
	}
	r = runCLI(t, auditor, "", "audit", "verify-log", "--path", logPath, "--pubkey", pemFile)
	if r.code != 0 || !strings.Contains(r.stdout, "warning: the last 1 records (after line 7) are not sealed") {
		t.Errorf("unsealed record: exit %d\n%s", r.code, r.stdout)
	}

	// A changed line is named.
	b, _ := os.ReadFile(logPath)
	os.WriteFile(logPath, []byte(strings.Replace(string(b), `"selector":"s2"`, `"selector":"s9"`, 1)), 0o600)
	r = runCLI(t, auditor, "", "audit", "verify-log", "--path", logPath, "--pubkey", pemFile)
	if r.code != exitDataErr || !strings.Contains(r.stdout, "BROKEN at line 3") {
		t.Errorf("changed line: exit %d\n%s", r.code, r.stdout)
	}
	if r := runCLI(t, auditor, "", "audit", "verify-log", "--path", logPath+".missing", "--pubkey", pemFile); r.code != exitNoInput {
		t.Errorf("missing log: exit %d, want %d", r.code, exitNoInput)
	}
}

// writeConfig writes a small configuration for token uri whose audit log
// is auditPath.
func writeAuditConfig(t *testing.T, uri, auditPath string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dkimgw.yaml")
	text := fmt.Sprintf(`hsm: {uri: %q}
upstream: {address: "127.0.0.1:10026"}
clients: [{name: campaigns, networks: ["127.0.0.1/32"], domains: [a.example]}]
domains:
  a.example: {selectors: [s1]}
audit: {path: %q}
`, uri, auditPath)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestServeAuditsLoginFailure: serve refused by the token's PIN records
// the login failure before it exits.
func TestServeAuditsLoginFailure(t *testing.T) {
	st := testenv.SoftHSM(t)
	pin := filepath.Join(t.TempDir(), "pin")
	os.WriteFile(pin, []byte("000000\n"), 0o600)
	uri := fmt.Sprintf("pkcs11:token=%s?module-path=%s&pin-source=file:%s", st.Label, st.Module, pin)
	logPath := filepath.Join(t.TempDir(), "audit.log")
	r := runCLI(t, nil, "", "serve", "--config", writeAuditConfig(t, uri, logPath))
	if r.code != 77 {
		t.Fatalf("serve with a wrong PIN: exit %d, want 77\n%s", r.code, r.stderr)
	}
	recs := readAudit(t, logPath)
	if len(recs) != 1 || recs[0].Event != audit.EventLoginFailed || recs[0].Actor != serveActor {
		t.Fatalf("records: %+v", recs)
	}
	if strings.Contains(fmt.Sprint(recs[0].Details), "000000") {
		t.Error("the record holds the PIN")
	}
}

// TestRefusalSummary: messages refused for their From domain are
// recorded as one summary per client and domain, not one per message.
func TestRefusalSummary(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "audit.log")
	cfg, err := policy.Load(writeAuditConfig(t, "pkcs11:token=x", logPath))
	if err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(logPath, audit.Options{Actor: serveActor})
	if err != nil {
		t.Fatal(err)
	}
	sa := &serveAudit{log: l, refused: newRefusalSummary(), logger: slog.New(slog.DiscardHandler)}
	p := sa.policy(cfg)
	client := p.ClientByAddr(netip.MustParseAddr("127.0.0.1"))
	for _, d := range []string{"evil.example", "evil.example", "a.example", "evil.example", "other.example"} {
		p.Sign(client, d)
	}
	sa.refused.flush(t.Context(), l, sa.logger)
	sa.refused.flush(t.Context(), l, sa.logger) // nothing new: nothing written
	recs := readAudit(t, logPath)
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2: %+v", len(recs), recs)
	}
	for i, want := range []struct {
		domain string
		n      float64
	}{{"evil.example", 3}, {"other.example", 1}} {
		r := recs[i]
		if r.Event != audit.EventUnauthorized || r.Domain != want.domain || r.Details["messages"] != want.n || r.Details["client"] != "campaigns" {
			t.Errorf("record %d = %+v, want %s x%v", i+1, r, want.domain, want.n)
		}
	}
}
