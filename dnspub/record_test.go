package dnspub

import (
	"strings"
	"testing"
)

func TestAbsName(t *testing.T) {
	cases := []struct{ name, want, err string }{
		{"s1._domainkey", "s1._domainkey.example.com.", ""},
		{"S1._DomainKey", "s1._domainkey.example.com.", ""},
		{"s1._domainkey.example.com.", "s1._domainkey.example.com.", ""},
		{"s1._domainkey.example.com", "s1._domainkey.example.com.", ""},
		{"a.b._domainkey", "a.b._domainkey.example.com.", ""},
		{"@", "example.com.", ""},
		{"", "example.com.", ""},
		{"example.com", "example.com.", ""},
		{"notexample.com", "notexample.com.example.com.", ""},
		{"s1._domainkey.example.org.", "", "not in zone"},
		{"a..b", "", "not a domain name"},
	}
	for _, tc := range cases {
		got, err := absName(tc.name, "example.com.")
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("absName(%q) = %q, %v; want error %q", tc.name, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("absName(%q) = %q, %v; want %q", tc.name, got, err, tc.want)
		}
	}
}

// FuzzTXTEscape: any value survives escapeTXT and unescapeTXT, and the
// escaped form is what miekg/dns packs back to the raw bytes.
func FuzzTXTEscape(f *testing.F) {
	for _, s := range []string{"", "v=DKIM1; p=", `a"b\c`, "\x00\xff\n", `\065`, strings.Repeat("x", 600)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if len(s) > 8000 { // a DKIM record is under 1 KB; keep the packet small
			t.Skip()
		}
		if got := unescapeTXT(escapeTXT(s)); got != s {
			t.Fatalf("round trip %q -> %q", s, got)
		}
		rr := txtRR("x.example.com.", Record{Value: s})
		buf := make([]byte, 65535)
		n, err := packRR(rr, buf)
		if err != nil {
			t.Fatalf("pack %q: %v", s, err)
		}
		back, err := unpackRR(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := value(back); v != s {
			t.Fatalf("wire round trip %q -> %q", s, v)
		}
	})
}
