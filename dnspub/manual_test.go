package dnspub_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/testenv"
	"github.com/miekg/dns"
)

// checkZone loads SOA, NS and the fragment as zone with named-checkzone,
// and returns the TXT records of the zone it dumps, by name.
func checkZone(t *testing.T, zone, fragment string) map[string][]string {
	t.Helper()
	testenv.Require(t, "named-checkzone")
	dir := t.TempDir()
	in, out := filepath.Join(dir, "zone.db"), filepath.Join(dir, "dump.db")
	base := fmt.Sprintf("$TTL 3600\n%[1]s IN SOA ns1.%[1]s hostmaster.%[1]s 1 3600 600 86400 300\n%[1]s IN NS ns1.%[1]s\nns1.%[1]s IN A 127.0.0.1\n", zone)
	if err := os.WriteFile(in, []byte(base+fragment), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("named-checkzone", "-D", "-o", out, zone, in)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("named-checkzone rejects the fragment: %v\n%s\nfragment:\n%s", err, b, fragment)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	txt := map[string][]string{}
	zp := dns.NewZoneParser(f, zone, out)
	for rr, ok := zp.Next(); ok; rr, ok = zp.Next() {
		if x, ok := rr.(*dns.TXT); ok {
			var v strings.Builder
			for _, s := range x.Txt {
				v.WriteString(unescape(s))
			}
			txt[x.Hdr.Name] = append(txt[x.Hdr.Name], v.String())
		}
	}
	if err := zp.Err(); err != nil {
		t.Fatal(err)
	}
	return txt
}

// unescape decodes the presentation form miekg/dns keeps TXT strings in
// (\X and \DDD), independently of the package under test.
func unescape(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			if i+3 < len(s) && strings.IndexByte("0123456789", s[i+1]) >= 0 {
				var n int
				fmt.Sscanf(s[i+1:i+4], "%03d", &n)
				b = append(b, byte(n))
				i += 3
				continue
			}
			i++
		}
		b = append(b, s[i])
	}
	return string(b)
}

// nsupdate feeds script to nsupdate(1) with the server's first key.
func nsupdate(t *testing.T, s *testenv.DNSServer, script string) {
	t.Helper()
	testenv.Require(t, "nsupdate")
	k := s.Keys[0]
	cmd := exec.Command("nsupdate", "-v", "-y", k.Algorithm+":"+k.Name+":"+k.Secret)
	cmd.Stdin = strings.NewReader(script)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nsupdate: %v\n%s\nscript:\n%s", err, b, script)
	}
}

func pendingIs(t *testing.T, m *dnspub.Manual, zone string, add, remove []dnspub.Record) *dnspub.Changes {
	t.Helper()
	ch, err := m.Pending(zone)
	if err != nil {
		t.Fatal(err)
	}
	norm := func(rs []dnspub.Record) []dnspub.Record {
		out := slices.Clone(rs)
		for i := range out {
			if out[i].TTL == 0 {
				out[i].TTL = dnspub.DefaultTTL
			}
		}
		return out
	}
	if !slices.Equal(ch.Add, norm(add)) || !slices.Equal(ch.Remove, norm(remove)) {
		t.Fatalf("pending add %v remove %v, want add %v remove %v", ch.Add, ch.Remove, norm(add), norm(remove))
	}
	return ch
}

// TestManualFlow plays the DNS admin: it loads what the Manual publisher
// renders with named-checkzone and nsupdate, and the checker tells the
// publisher when each change is done.
func TestManualFlow(t *testing.T) {
	for _, s := range testenv.DNSServers(t, testenv.DNSOptions{}) {
		t.Run(s.Impl, func(t *testing.T) {
			ctx := t.Context()
			dir := t.TempDir()
			m, err := dnspub.NewManual(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			c := newChecker(t, s)
			r1 := dnspub.Record{Name: "m1._domainkey", TTL: 300 * time.Second, Value: keyRecord(t, rsa2048SPKI)}
			r2 := dnspub.Record{Name: "m2._domainkey", TTL: 300 * time.Second, Value: `v=DKIM1; n="a \"quoted\" note\\"; p=` + strings.Repeat("y", 260)}

			longer := r1
			longer.TTL = time.Hour
			for _, recs := range [][]dnspub.Record{{r1, r2}, {r1, r2}, {longer}} { // repeats are no-ops
				if _, err := m.AppendRecords(ctx, s.Zone, recs); err != nil {
					t.Fatal(err)
				}
			}
			ch := pendingIs(t, m, s.Zone, []dnspub.Record{r1, r2}, nil)
			loaded := checkZone(t, s.Zone, ch.ZoneFragment())
			for _, r := range []dnspub.Record{r1, r2} {
				if got := loaded[r.Name+"."+s.Zone]; !slices.Equal(got, []string{r.Value}) {
					t.Errorf("named-checkzone loaded %s as %q, want %q", r.Name, got, r.Value)
				}
			}

			// Nothing is done until DNS shows it.
			if ch, err := m.Settle(ctx, s.Zone, c); err != nil || len(ch.Add) != 2 {
				t.Fatalf("settle before the admin acted: %+v, %v", ch, err)
			}
			nsupdate(t, s, ch.NsupdateScript(s.Addr))
			wantVisible(t, c, s.Zone, r1)
			wantVisible(t, c, s.Zone, r2)
			if ch, err := m.Settle(ctx, s.Zone, c); err != nil || !ch.Empty() {
				t.Fatalf("settle after nsupdate: %+v, %v", ch, err)
			}

			// The state is on disk.
			m, err = dnspub.NewManual(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			got, err := m.GetRecords(ctx, s.Zone)
			if err != nil || !slices.Equal(got, []dnspub.Record{r1, r2}) {
				t.Fatalf("records after reopening: %v, %v", got, err)
			}

			// Replace r1's value; withdraw r2.
			r1b := dnspub.Record{Name: r1.Name, TTL: r1.TTL, Value: keyRecord(t, rsa2048SPKI)}
			if _, err := m.SetRecords(ctx, s.Zone, []dnspub.Record{r1b}); err != nil {
				t.Fatal(err)
			}
			if _, err := m.DeleteRecords(ctx, s.Zone, []dnspub.Record{r2}); err != nil {
				t.Fatal(err)
			}
			if _, err := m.AppendRecords(ctx, s.Zone, []dnspub.Record{r1}); !errors.Is(err, dnspub.ErrConflict) {
				t.Fatalf("append of the old value where a new one is pending: %v, want ErrConflict", err)
			}
			ch = pendingIs(t, m, s.Zone, []dnspub.Record{r1b}, []dnspub.Record{r1, r2})
			loaded = checkZone(t, s.Zone, ch.ZoneFragment())
			if got := loaded[r1.Name+"."+s.Zone]; !slices.Equal(got, []string{r1b.Value}) {
				t.Errorf("named-checkzone loaded %q, want only the new value", got)
			}
			if len(loaded[r2.Name+"."+s.Zone]) != 0 {
				t.Errorf("the fragment still adds the withdrawn record")
			}
			script := ch.NsupdateScript(s.Addr)
			nsupdate(t, s, script)
			nsupdate(t, s, script) // an admin who runs it twice does no harm
			wantVisible(t, c, s.Zone, r1b)
			rep, err := c.Check(ctx, s.Zone, r2)
			if err != nil || !rep.Gone() {
				t.Fatalf("r2 not gone: %v\n%s", err, rep)
			}
			if ch, err := m.Settle(ctx, s.Zone, c); err != nil || !ch.Empty() {
				t.Fatalf("settle after the second nsupdate: %+v, %v", ch, err)
			}

			files, _ := filepath.Glob(filepath.Join(dir, "*", "*"))
			for _, f := range files {
				if !strings.HasSuffix(f, ".zone") || strings.HasPrefix(filepath.Base(f), ".") {
					t.Errorf("stray file %s", f)
				}
			}
			zones, err := m.Zones()
			if err != nil || !slices.Equal(zones, []string{s.Zone}) {
				t.Errorf("zones %v, %v", zones, err)
			}
		})
	}
}

func TestManualRejects(t *testing.T) {
	m, err := dnspub.NewManual(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.AppendRecords(t.Context(), "example.com", []dnspub.Record{{Name: "s1._domainkey.example.org.", Value: "v=DKIM1; p="}}); err == nil || !strings.Contains(err.Error(), "not in zone") {
		t.Errorf("a record outside the zone: %v", err)
	}
	if _, err := m.AppendRecords(t.Context(), "a/b", []dnspub.Record{{Name: "s1._domainkey", Value: "v=DKIM1; p="}}); err == nil {
		t.Errorf("zone a/b accepted")
	}
	if _, err := dnspub.NewManual("", nil); err == nil {
		t.Error("no directory accepted")
	}
}
