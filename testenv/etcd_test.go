package testenv

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// TestEtcdCluster: three members answer; one killed, the other two keep
// a quorum and write; the killed one comes back with what was written
// while it was down; StopAll leaves nothing running.
func TestEtcdCluster(t *testing.T) {
	c := StartEtcd(t)
	if len(c.Members) != 3 {
		t.Fatalf("%d members", len(c.Members))
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	ml, err := cli.MemberList(ctx)
	if err != nil || len(ml.Members) != 3 {
		t.Fatalf("member list: %v %v", ml, err)
	}
	lead, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Kill(lead)
	if c.Members[lead].Running() {
		t.Fatal("killed member still running")
	}
	// A request in flight when the leader died times out ("request timed
	// out") while the other two elect a new leader: try again, bounded.
	for i := 0; ; i++ {
		pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
		_, err := cli.Put(pctx, "k", "written with two members")
		pcancel()
		if err == nil {
			break
		}
		if i == 10 {
			t.Fatalf("put with two members: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	newLead, err := c.Leader(ctx)
	if err != nil || newLead == lead {
		t.Fatalf("leader after killing %d: %d %v", lead, newLead, err)
	}
	c.Restart(lead)
	// A serializable read answers from the member's own data: it has
	// caught up with what was written while it was down.
	one, err := clientv3.New(clientv3.Config{Endpoints: []string{c.Members[lead].ClientURL}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	var got string
	for range 100 {
		r, err := one.Get(ctx, "k", clientv3.WithSerializable())
		if err == nil && len(r.Kvs) == 1 {
			got = string(r.Kvs[0].Value)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got != "written with two members" {
		t.Fatalf("restarted member reads %q", got)
	}
	c.StopAll()
	for _, m := range c.Members {
		if m.Running() {
			t.Fatalf("%s still running after StopAll", m.Name)
		}
	}
}
