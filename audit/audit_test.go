package audit_test

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/testenv"
)

func TestMain(m *testing.M) {
	if os.Getenv("AUDIT_TEST_APPEND") != "" {
		os.Exit(appendChild())
	}
	testenv.Main(m)
}

// auditKey is a real audit key in a fresh SoftHSM token.
func auditKey(t *testing.T) *hsm.Key {
	t.Helper()
	st := testenv.SoftHSM(t)
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tok.Close() })
	if _, err := tok.AuditKey(t.Context()); err == nil {
		t.Fatal("a fresh token has an audit key")
	}
	key, err := tok.GenerateAuditKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := key.Public().(ed25519.PublicKey); !ok {
		t.Errorf("SoftHSM has Ed25519, but the audit key is %T", key.Public())
	}
	info := key.Info()
	if info.Extractable || !info.Sensitive || !info.Local || info.CanDecrypt {
		t.Errorf("audit key attributes: %+v", info)
	}
	if keys, _ := tok.Keys(t.Context()); len(keys) != 0 {
		t.Errorf("the audit key is listed as a DKIM key: %+v", keys)
	}
	if _, err := tok.GenerateAuditKey(t.Context()); err == nil {
		t.Error("a second audit key was generated")
	}
	again, err := tok.AuditKey(t.Context())
	if err != nil || !again.Public().(ed25519.PublicKey).Equal(key.Public()) {
		t.Fatalf("AuditKey: %v", err)
	}
	return key
}

// writeLog writes 5 records, a checkpoint, 3 records and a checkpoint.
func writeLog(t *testing.T, path string, key audit.Sealer) {
	t.Helper()
	l, err := audit.Open(path, audit.Options{Actor: "tester", Host: "h1", Sealer: key})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for i := range 8 {
		if err := l.Record(ctx, audit.Event{Event: audit.EventKeyGenerated, Domain: "example.com", Selector: fmt.Sprintf("s%d", i), KeyID: "00ff"}); err != nil {
			t.Fatal(err)
		}
		if i == 4 {
			if ok, err := l.Checkpoint(ctx); !ok || err != nil {
				t.Fatalf("checkpoint: %v %v", ok, err)
			}
			if ok, err := l.Checkpoint(ctx); ok || err != nil {
				t.Fatalf("a second checkpoint with nothing new: %v %v", ok, err)
			}
		}
	}
	if ok, err := l.Checkpoint(ctx); !ok || err != nil {
		t.Fatalf("checkpoint: %v %v", ok, err)
	}
}

func lines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func verify(t *testing.T, text string, pub crypto.PublicKey) audit.Result {
	t.Helper()
	res, err := audit.Verify(strings.NewReader(text), pub)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// rechain rewrites the chain of ls after an edit, as an attacker with
// write access would, re-signing checkpoints with forger (an attacker's
// own key: the token's cannot be used). With claim, the forged
// checkpoints name the token key's id.
func rechain(t *testing.T, ls []string, forger ed25519.PrivateKey, claim string) []string {
	t.Helper()
	prev := strings.Repeat("0", 64)
	out := make([]string, len(ls))
	for i, l := range ls {
		var r audit.Record
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		r.Seq, r.Prev = uint64(i+1), prev
		if r.Event == audit.EventCheckpoint {
			r.Sig = base64.StdEncoding.EncodeToString(ed25519.Sign(forger, audit.CheckpointDigest(r.Seq, r.Prev)))
			r.KeyID, _ = audit.KeyID(forger.Public())
			if claim != "" {
				r.KeyID = claim
			}
		}
		b, _ := json.Marshal(r)
		out[i] = string(b)
		prev = audit.LineHash(b)
	}
	return out
}

func TestChainDetectsTampering(t *testing.T) {
	key := auditKey(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLog(t, path, key)
	ls := lines(t, path)
	if len(ls) != 10 {
		t.Fatalf("%d lines, want 10:\n%s", len(ls), strings.Join(ls, "\n"))
	}
	good := verify(t, strings.Join(ls, "\n")+"\n", key.Public())
	if good.Broken != nil || good.Checkpoints != 2 || good.Unsealed != 0 || good.Records != 10 {
		t.Fatalf("intact log: %+v", good)
	}

	_, forger, _ := ed25519.GenerateKey(rand.Reader)
	tokenID, err := audit.KeyID(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	edit := func(i int, from, to string) []string {
		out := append([]string(nil), ls...)
		if !strings.Contains(out[i], from) {
			t.Fatalf("line %d lacks %q", i+1, from)
		}
		out[i] = strings.Replace(out[i], from, to, 1)
		return out
	}
	del := func(i int) []string { return append(append([]string(nil), ls[:i]...), ls[i+1:]...) }
	swap := func(i, j int) []string {
		out := append([]string(nil), ls...)
		out[i], out[j] = out[j], out[i]
		return out
	}
	for _, tc := range []struct {
		name     string
		lines    []string
		wantLine int
		wantWhy  string
	}{
		{"deleted line", del(2), 3, "chain broken"},
		{"changed line", edit(1, `"selector":"s1"`, `"selector":"evil"`), 3, "chain broken"},
		{"changed last line of the chain", edit(8, `"selector":"s7"`, `"selector":"evil"`), 10, "chain broken"},
		{"reordered lines", swap(3, 4), 4, "chain broken"},
		{"rewritten log, forged checkpoints", rechain(t, edit(1, `"selector":"s1"`, `"selector":"evil"`), forger, ""), 6, "not by the audit key"},
		{"rewritten log, forged checkpoints naming the audit key", rechain(t, edit(1, `"selector":"s1"`, `"selector":"evil"`), forger, tokenID), 6, "signature does not verify"},
		{"rewritten log, checkpoint signature copied", rechainKeepSig(t, edit(1, `"selector":"s1"`, `"selector":"evil"`)), 6, "signature does not verify"},
		{"torn line", append(append([]string(nil), ls[:9]...), ls[9][:20]), 10, "not a record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := verify(t, strings.Join(tc.lines, "\n")+"\n", key.Public())
			if res.Broken == nil {
				t.Fatalf("not detected: %+v", res)
			}
			if res.Broken.Line != tc.wantLine || !strings.Contains(res.Broken.Reason, tc.wantWhy) {
				t.Errorf("broken at %v, want line %d with %q", res.Broken, tc.wantLine, tc.wantWhy)
			}
		})
	}

	// Records after the last checkpoint are reported as unsealed, not
	// broken.
	l, err := audit.Open(path, audit.Options{Actor: "tester"})
	if err != nil {
		t.Fatal(err)
	}
	if err = l.Record(t.Context(), audit.Event{Event: audit.EventConfigLoaded}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Checkpoint(t.Context()); err != audit.ErrNoSealer {
		t.Errorf("checkpoint without a key: %v", err)
	}
	b, _ := os.ReadFile(path)
	res := verify(t, string(b), key.Public())
	if res.Broken != nil || res.Unsealed != 1 || res.Sealed != 10 {
		t.Errorf("one unsealed record: %+v", res)
	}
	// Another key's public key does not verify the checkpoints.
	if res := verify(t, string(b), forger.Public()); res.Broken == nil || res.Broken.Line != 6 {
		t.Errorf("verified with another key: %+v", res)
	}
}

// rechainKeepSig rewrites the chain but keeps the token's checkpoint
// signatures (and key id): they no longer match the heads.
func rechainKeepSig(t *testing.T, ls []string) []string {
	t.Helper()
	prev := strings.Repeat("0", 64)
	out := make([]string, len(ls))
	for i, l := range ls {
		var r audit.Record
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		r.Prev = prev
		b, _ := json.Marshal(r)
		out[i] = string(b)
		prev = audit.LineHash(b)
	}
	return out
}

// TestConcurrentAppends appends from two processes and this one at once:
// the chain stays linear (every record chains to the one before).
func TestConcurrentAppends(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	const perWriter = 40
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for w := range 2 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "AUDIT_TEST_APPEND="+path, "AUDIT_TEST_N="+strconv.Itoa(perWriter), "AUDIT_TEST_ACTOR=child"+strconv.Itoa(w))
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("child %d: %v\n%s", w, err, out)
			}
		})
	}
	wg.Go(func() {
		l, err := audit.Open(path, audit.Options{Actor: "parent"})
		if err != nil {
			errs <- err
			return
		}
		for i := range perWriter {
			if err := l.Record(t.Context(), audit.Event{Event: "test", Details: map[string]any{"i": i}}); err != nil {
				errs <- err
				return
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ls := lines(t, path)
	if len(ls) != 3*perWriter {
		t.Fatalf("%d records, want %d", len(ls), 3*perWriter)
	}
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	res := verify(t, strings.Join(ls, "\n")+"\n", k.Public())
	if res.Broken != nil {
		t.Fatalf("chain of concurrent appends broken: %v", res.Broken)
	}
	actors := map[string]int{}
	for _, l := range ls {
		var r audit.Record
		json.Unmarshal([]byte(l), &r)
		actors[r.Actor]++
	}
	if actors["child0"] != perWriter || actors["child1"] != perWriter || actors["parent"] != perWriter {
		t.Errorf("records by actor: %v", actors)
	}
}

func appendChild() int {
	n, _ := strconv.Atoi(os.Getenv("AUDIT_TEST_N"))
	l, err := audit.Open(os.Getenv("AUDIT_TEST_APPEND"), audit.Options{Actor: os.Getenv("AUDIT_TEST_ACTOR")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for i := range n {
		if err := l.Record(context.Background(), audit.Event{Event: "test", Details: map[string]any{"i": i}}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return 0
}

// slowSealer blocks its first signature until release is closed.
type slowSealer struct {
	k       ed25519.PrivateKey
	started chan struct{}
	release chan struct{}
	once    sync.Once
}

func (s *slowSealer) Public() crypto.PublicKey { return s.k.Public() }
func (s *slowSealer) SignContext(ctx context.Context, d []byte, o crypto.SignerOpts) ([]byte, error) {
	first := false
	s.once.Do(func() { first = true })
	if first {
		close(s.started)
		select {
		case <-s.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.k.Sign(rand.Reader, d, o)
}

// TestCheckpointDoesNotBlockRecords: a record is written while the token
// signs a checkpoint; the checkpoint then seals the new head.
func TestCheckpointDoesNotBlockRecords(t *testing.T) {
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	s := &slowSealer{k: k, started: make(chan struct{}), release: make(chan struct{})}
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{Actor: "a", Sealer: s})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Record(t.Context(), audit.Event{Event: "one"}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		ok, err := l.Checkpoint(t.Context())
		if err == nil && !ok {
			err = fmt.Errorf("no checkpoint written")
		}
		done <- err
	}()
	<-s.started
	recorded := make(chan error, 1)
	go func() { recorded <- l.Record(t.Context(), audit.Event{Event: "two"}) }()
	select {
	case err := <-recorded:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a record waited for the checkpoint's signature")
	}
	close(s.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ls := lines(t, path)
	res := verify(t, strings.Join(ls, "\n")+"\n", k.Public())
	if len(ls) != 3 || res.Broken != nil || res.Checkpoints != 1 || res.Unsealed != 0 {
		t.Fatalf("log after a concurrent record: %+v\n%s", res, strings.Join(ls, "\n"))
	}
}
