package signer

import (
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

// TestNameTable signs with every identity of the table that dnsname,
// policy and hsm are tested against: d= and s= are written in their
// normal form, and a name the configuration refuses is refused here too.
func TestNameTable(t *testing.T) {
	_, edKey := testKeys(t)
	m := spoolString(t, hdr+"body\r\n", SpoolOptions{})
	for _, c := range testenv.NameCases(t) {
		t.Run(c.Kind+"/"+c.Name, func(t *testing.T) {
			domain, selector := c.Key()
			fields, err := Sign(t.Context(), m, []Identity{{Domain: domain, Selector: selector, Key: edKey}}, Options{})
			if !c.Valid() {
				if err == nil {
					t.Fatalf("Sign with d=%q s=%q succeeded: %q", domain, selector, fields)
				}
				if strings.Count(err.Error(), "signer:") != 1 || strings.Contains(err.Error(), "dnsname:") {
					t.Errorf("error %q: want one package prefix", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			tags := map[string]string{}
			for tag := range strings.SplitSeq(strings.NewReplacer("\r\n", "", " ", "").Replace(strings.TrimPrefix(fields[0], "DKIM-Signature:")), ";") {
				k, v, _ := strings.Cut(tag, "=")
				tags[k] = v
			}
			wd, ws := c.WantKey()
			if tags["d"] != wd || tags["s"] != ws {
				t.Errorf("d=%q s=%q, want d=%q s=%q", tags["d"], tags["s"], wd, ws)
			}
		})
	}
}
