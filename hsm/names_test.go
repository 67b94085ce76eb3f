package hsm

import (
	"errors"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

// TestNameTable runs the table of good and bad names that dnsname,
// policy and signer are tested against through the token's naming: a
// name the configuration accepts makes a key, one it refuses is
// ErrInvalidName before any token call.
func TestNameTable(t *testing.T) {
	t.Parallel()
	cases := testenv.NameCases(t)
	st := testenv.SoftHSM(t)
	tok, err := Open(t.Context(), st.URI(), Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { tok.Close() })
	closed, err := Open(t.Context(), st.URI(), Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	closed.Close()
	if _, err := closed.GenerateKey(t.Context(), "example.com", "s1", Ed25519); !errors.Is(err, ErrClosed) {
		t.Fatalf("GenerateKey on a closed token = %v, want ErrClosed", err)
	}

	made := map[string]bool{}
	for _, c := range cases {
		domain, selector := c.Key()
		label, _, _, err := keyLabel(domain, selector)
		if !c.Valid() {
			if !errors.Is(err, ErrInvalidName) {
				t.Errorf("keyLabel(%q, %q) = %q, %v; want ErrInvalidName", domain, selector, label, err)
				continue
			}
			if msg := err.Error(); strings.Count(msg, "hsm:") != 1 || strings.Contains(msg, "dnsname:") {
				t.Errorf("error %q: want one package prefix", msg)
			}
			// Refused before the token is touched: a closed token would
			// say ErrClosed otherwise.
			if _, err := closed.GenerateKey(t.Context(), domain, selector, Ed25519); !errors.Is(err, ErrInvalidName) {
				t.Errorf("GenerateKey(%q, %q) on a closed token = %v; want ErrInvalidName", domain, selector, err)
			}
			continue
		}
		wd, ws := c.WantKey()
		if err != nil || label != RecordName(wd, ws) {
			t.Errorf("keyLabel(%q, %q) = %q, %v; want %q", domain, selector, label, err, RecordName(wd, ws))
			continue
		}
		// Names with one normal form share one key: the first makes it,
		// the others find it.
		var k *Key
		if made[label] {
			k, err = tok.Key(t.Context(), domain, selector)
		} else {
			k, err = tok.GenerateKey(t.Context(), domain, selector, Ed25519)
			made[label] = true
		}
		if err != nil {
			t.Errorf("key (%q, %q): %v", domain, selector, err)
			continue
		}
		if info := k.Info(); info.Domain != wd || info.Selector != ws || info.Label != RecordName(wd, ws) {
			t.Errorf("GenerateKey(%q, %q) made %q (domain %q, selector %q); want %q", domain, selector, info.Label, info.Domain, info.Selector, RecordName(wd, ws))
		}
	}
}
