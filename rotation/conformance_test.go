package rotation_test

import (
	"testing"

	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/storetest"
)

// TestBoltContract runs the state store contract against the embedded
// store: two Bolts on one file, as two processes would open it.
func TestBoltContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (rotation.Store, rotation.Store) {
		dir := t.TempDir()
		a, err := rotation.OpenBolt(dir)
		if err != nil {
			t.Fatal(err)
		}
		b, err := rotation.OpenBolt(dir)
		if err != nil {
			t.Fatal(err)
		}
		return a, b
	})
}
