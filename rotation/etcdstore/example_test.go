package etcdstore_test

import (
	"context"
	"log"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
)

// Every gateway runs this; only the leader's reconciler acts, and its
// loop stops when the leadership ends (another gateway takes over within
// the lease TTL). Every gateway watches, to switch its signing keys.
func ExampleElection_Lead() {
	ctx := context.Background()
	store, err := etcdstore.Open(etcdstore.Options{
		Endpoints: []string{"https://etcd1:2379", "https://etcd2:2379", "https://etcd3:2379"},
		CAFile:    "/etc/dkimgw/etcd-ca.pem",
		Name:      "gw1",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	rec, err := rotation.New(rotation.Options{Store: store /* , Keys, Publishers, Checker, Policies */})
	if err != nil {
		log.Fatal(err)
	}
	go store.NewElection().Lead(ctx, func(ctx context.Context) { rec.Run(ctx, time.Minute) })
	for ev := range store.Watch(ctx) {
		if ev.Err != nil {
			continue // keep signing with the keys of the last view
		}
		// Apply ev.Keys (all of them when ev.Full) and switch to the
		// active ones; report ev.Revision.
	}
}
