package policy

import (
	"fmt"
	"slices"
	"strconv"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

// TestNameTable validates a configuration for every name of the table
// that dnsname, signer and hsm are tested against: what the
// configuration accepts, the token and the signer must accept too.
func TestNameTable(t *testing.T) {
	for _, c := range testenv.NameCases(t) {
		t.Run(c.Kind+"/"+c.Name, func(t *testing.T) {
			domain, selector := c.Key()
			text := fmt.Sprintf(`
hsm: {uri: "pkcs11:token=dkim"}
upstream: {address: "127.0.0.1:10026"}
clients:
  - name: campaigns
    networks: ["127.0.0.0/8"]
    domains: [%[1]s]
domains:
  %[1]s:
    selectors: [%[2]s]
`, strconv.Quote(domain), strconv.Quote(selector))
			cfg, err := Parse("dkimgw.yaml", []byte(text), testFiles(t))
			if !c.Valid() {
				if err == nil {
					t.Fatalf("configuration with domain %q and selector %q validated; want an error", domain, selector)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			wd, ws := c.WantKey()
			if got, want := cfg.Selectors(), []KeyRef{{Domain: wd, Selector: ws}}; !slices.Equal(got, want) {
				t.Errorf("Selectors() = %v, want %v", got, want)
			}
			if got := cfg.Clients[0].Domains; !slices.Equal(got, []string{wd}) {
				t.Errorf("client domains = %q, want [%q]", got, wd)
			}
		})
	}
}
