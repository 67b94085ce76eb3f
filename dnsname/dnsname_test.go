package dnsname_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/dnsname"
	"github.com/dkimgw/dkimgw/testenv"
)

func TestNameTable(t *testing.T) {
	for _, c := range testenv.NameCases(t) {
		t.Run(c.Kind+"/"+c.Name, func(t *testing.T) {
			domain, selector := c.Key()
			d, s, err := dnsname.Key(domain, selector)
			if !c.Valid() {
				var ne *dnsname.Error
				if !errors.As(err, &ne) {
					t.Fatalf("Key(%q, %q) = %q, %q, %v; want a *dnsname.Error", domain, selector, d, s, err)
				}
				if !strings.HasPrefix(err.Error(), "dnsname: ") || strings.Count(err.Error(), "dnsname:") != 1 {
					t.Errorf("error %q: want one dnsname: prefix", err)
				}
				return
			}
			wd, ws := c.WantKey()
			if err != nil || d != wd || s != ws {
				t.Fatalf("Key(%q, %q) = %q, %q, %v; want %q, %q", domain, selector, d, s, err, wd, ws)
			}
			// The normal form is a fixed point.
			if d2, s2, err := dnsname.Key(d, s); err != nil || d2 != d || s2 != s {
				t.Errorf("Key of the normal form = %q, %q, %v", d2, s2, err)
			}
		})
	}
}

func TestHostAllowsOneLabel(t *testing.T) {
	if h, err := dnsname.Host("LocalHost."); err != nil || h != "localhost" {
		t.Errorf("Host(LocalHost.) = %q, %v", h, err)
	}
	if _, err := dnsname.Domain("localhost"); err == nil {
		t.Error("Domain(localhost): a single label was accepted as a signing domain")
	}
	if _, err := dnsname.Host("my_host.example"); err == nil {
		t.Error("Host(my_host.example) accepted an underscore")
	}
}

func TestErrorSaysWhatToDo(t *testing.T) {
	_, err := dnsname.Selector("s_2026")
	if err == nil || !strings.Contains(err.Error(), `"_"`) || !strings.Contains(err.Error(), "letters, digits and hyphens") {
		t.Errorf("Selector(s_2026) error = %v; want it to name the underscore and the allowed characters", err)
	}
}
