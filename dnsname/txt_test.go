package dnsname

import (
	"strings"
	"testing"
)

func TestSplitTXT(t *testing.T) {
	for _, n := range []int{0, 1, 255, 256, 510, 511, 800} {
		v := strings.Repeat("a", n)
		parts := SplitTXT(v)
		if strings.Join(parts, "") != v {
			t.Errorf("%d bytes: the parts do not join to the value", n)
		}
		if want := max(1, (n+254)/255); len(parts) != want {
			t.Errorf("%d bytes: %d parts, want %d", n, len(parts), want)
		}
		for i, p := range parts {
			if len(p) > MaxCharacterString || (i < len(parts)-1 && len(p) != MaxCharacterString) {
				t.Errorf("%d bytes: part %d has %d bytes", n, i, len(p))
			}
		}
	}
}
