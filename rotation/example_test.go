package rotation

import (
	"context"
	"fmt"
	"os"
	"time"
)

// A dry run on a fresh domain: what the first pass would do. In dkimgw,
// Keys is the PKCS#11 token and Publishers and Checker come from dnspub;
// here they are in-memory fakes.
func ExampleReconciler_Pass() {
	dir, _ := os.MkdirTemp("", "rotation-example")
	defer os.RemoveAll(dir)
	store, err := OpenBolt(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	now := func() time.Time { return time.Date(2026, 12, 1, 8, 0, 0, 0, time.UTC) }
	dns := newFakeDNS(&clock{t: now()}, "example.com", nil)
	r, err := New(Options{
		Store: store, Keys: newFakeKeyStore(nil), Checker: dns,
		Publishers: map[string]Publisher{"primary": dns},
		Now:        now,
		Policies: []Policy{{
			Domain:     "example.com",
			Algorithms: []Algorithm{RSA2048, Ed25519},
			Publisher:  "primary",
		}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	rep, err := r.Pass(context.Background(), PassOptions{DryRun: true})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, a := range rep.Actions {
		fmt.Println(a)
	}
	fmt.Println("active:", rep.Active["example.com"])
	// Output:
	// would: example.com rsa20261201 (rsa-2048): no active key: start one [new -> planned]
	// would: example.com ed20261201 (ed25519): no active key: start one [new -> planned]
	// active: []
}
