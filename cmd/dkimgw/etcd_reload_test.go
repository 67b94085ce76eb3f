package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/dkimgw/dkimgw/rotation/etcdstore"
	"github.com/dkimgw/dkimgw/testenv"
)

// candidacy is one key under the election's prefix: who it is, and the
// key itself (a new candidacy is a new key, on a new lease).
type candidacy struct {
	key string
	pid int
}

// candidacies lists the election's keys, first (the leader) first.
func candidacies(t *testing.T, cli *clientv3.Client, prefix string) []candidacy {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
	if err != nil {
		t.Fatalf("read the election: %v", err)
	}
	var out []candidacy
	for _, kv := range resp.Kvs {
		var p etcdstore.Participant
		if err := json.Unmarshal(kv.Value, &p); err != nil {
			t.Fatalf("%s: %v", kv.Key, err)
		}
		out = append(out, candidacy{key: string(kv.Key), pid: p.PID})
	}
	return out
}

// TestEtcdReloadKeepsCandidacy: two gateways on one etcd. A SIGHUP of the
// leader that leaves the state settings alone keeps its candidacy (the
// same key, so the same lease) and its leadership, with the other gateway
// still in line; one that changes them resigns the old candidacy before
// campaigning anew, so the other gateway leads and the reloaded one is
// in line once, never twice.
func TestEtcdReloadKeepsCandidacy(t *testing.T) {
	testenv.Require(t, "etcd")
	bin := buildBinary(t, t.TempDir())
	st := testenv.SoftHSM(t)
	etcd := testenv.StartEtcd(t)
	sink := testenv.NewSMTPSink(t)
	uri := st.URIWithPINFile(t)
	dataDirs := []string{t.TempDir(), t.TempDir()}
	config := func(i int, ttl string) gwConfig {
		return gwConfig{
			uri: uri, upstream: sink.Addr(),
			clientDomains: []string{"example.com"},
			rotating:      map[string]string{"example.com": "{algorithms: [ed25519], publisher: pub}"},
			extra: fmt.Sprintf(`dns:
  publishers:
    pub: {type: manual}
  check_servers: ["127.0.0.1:53"]
rotation:
  check_every: 500ms
data_dir: %q
%s`, dataDirs[i], etcdState(etcd, "/reload/", ttl)),
		}
	}
	gws := []*gateway{startGateway(t, bin, config(0, "3s")), startGateway(t, bin, config(1, "3s"))}
	pidOf := map[int]int{}
	for i, gw := range gws {
		pidOf[gw.cmd.Process.Pid] = i
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	const prefix = "/reload/leader/"

	// Both in line, one key each.
	var before []candidacy
	deadline := time.Now().Add(30 * time.Second)
	for {
		before = candidacies(t, cli, prefix)
		if len(before) == 2 && before[0].pid != before[1].pid {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("two gateways in the election within 30s: %+v", before)
		}
		time.Sleep(100 * time.Millisecond)
	}
	leader := pidOf[before[0].pid]
	other := 1 - leader
	t.Logf("gateway %d leads: %+v", leader, before)

	t.Run("same settings", func(t *testing.T) {
		gw := gws[leader]
		gw.t = t
		mark := gw.mark()
		gw.signal(syscall.SIGHUP)
		reloaded(gw, mark)
		// Watch the election past the lease's TTL: a resignation, a second
		// candidacy or an abandoned lease would show within it.
		end := time.Now().Add(4 * time.Second)
		for time.Now().Before(end) {
			if now := candidacies(t, cli, prefix); !slices.Equal(now, before) {
				t.Fatalf("the election changed with a reload that kept the state settings: %+v, was %+v", now, before)
			}
			time.Sleep(50 * time.Millisecond)
		}
		for _, l := range gw.logLines(mark) {
			switch l.str("msg") {
			case "resigning", "leading":
				t.Errorf("gateway %d logged %s", leader, l.raw)
			}
		}
	})

	t.Run("changed settings", func(t *testing.T) {
		gw := gws[leader]
		gw.t = t
		mark := gw.mark()
		gw.writeConfig(config(leader, "4s"))
		gw.signal(syscall.SIGHUP)
		reloaded(gw, mark)
		// The old candidacy was resigned (not left to expire) and the
		// other gateway leads; the reloaded one is in line once.
		var now []candidacy
		deadline := time.Now().Add(20 * time.Second)
		for {
			now = candidacies(t, cli, prefix)
			if len(now) > 2 || (len(now) == 2 && now[0].pid == now[1].pid) {
				t.Fatalf("the reloaded gateway is in line twice: %+v", now)
			}
			if len(now) == 2 && pidOf[now[0].pid] == other && now[0].key == before[1].key {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after a reload that changed lease_ttl: %+v, want gateway %d leading with its old key %s and gateway %d in line", now, other, before[1].key, leader)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if slices.ContainsFunc(now, func(c candidacy) bool { return c.key == before[0].key }) {
			t.Errorf("the old candidacy %s is still there", before[0].key)
		}
		gw.waitLog(mark, 5*time.Second, "resigning", func(l logLine) bool { return l.str("msg") == "resigning" })
	})
}

// reloaded waits for gw to reload its configuration after mark, failing
// if it refuses.
func reloaded(gw *gateway, mark int) {
	gw.t.Helper()
	l := gw.waitLog(mark, 30*time.Second, "configuration reloaded", func(l logLine) bool {
		return l.str("msg") == "configuration reloaded" || l.str("msg") == "reload refused, the old configuration keeps serving"
	})
	if l.str("msg") != "configuration reloaded" {
		gw.t.Fatalf("reload refused: %s", l.raw)
	}
}
