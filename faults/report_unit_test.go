package faults

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestReportKeepsSoakSection: the fault suite and the soak write one
// file, docs/reliability.md, each its own part: neither may wipe out the
// other's.
func TestReportKeepsSoakSection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reliability.md")
	t.Setenv(reportEnv, path)
	saved := reportRows
	t.Cleanup(func() { reportMu.Lock(); reportRows = saved; reportMu.Unlock() })
	reportRows = nil

	soak := []byte(soakBegin + "\n## Soak\n\nseries of the last soak\n" + soakEnd + "\n")
	if err := os.WriteFile(path, append([]byte("# old table\n\n"), soak...), 0o644); err != nil {
		t.Fatal(err)
	}
	sc := scenario{name: "x", title: "scenario x", about: "about x."}
	report(t, sc, result{sent: 5, accepted: 5, delivered: 5, passed: true}, "")
	report(t, scenario{name: "y", title: "scenario y", about: "about y."}, result{sent: 3, passed: true}, "")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, soak) {
		t.Errorf("the fault suite's report dropped the soak's section:\n%s", got)
	}
	if bytes.Contains(got, []byte("# old table")) || !bytes.Contains(got, []byte("| scenario x |")) || !bytes.Contains(got, []byte("| scenario y |")) {
		t.Errorf("the fault table was not rewritten:\n%s", got)
	}
	if strings.Index(string(got), "| scenario y |") > strings.Index(string(got), soakBegin) {
		t.Errorf("the soak's section is not after the fault table:\n%s", got)
	}

	// The soak replaces its own section and keeps the table.
	table := bytes.TrimSuffix(got, soak)
	next := []byte(soakBegin + "\n## Soak\n\na newer soak\n" + soakEnd + "\n")
	out := withSoakSection(got, next)
	if !bytes.HasPrefix(out, table) || !bytes.HasSuffix(out, next) || bytes.Contains(out, []byte("series of the last soak")) {
		t.Errorf("the soak's section was not replaced in place:\n%s", out)
	}
	// A file without a section gets one at the end; no file, the section
	// alone.
	if out := withSoakSection([]byte("# table\n"), next); string(out) != "# table\n\n"+string(next) {
		t.Errorf("section appended: %q", out)
	}
	if out := withSoakSection(nil, next); !bytes.Equal(out, next) {
		t.Errorf("section alone: %q", out)
	}
}

// TestSoakFlatRule: the soak's rule passes a series that warms up and
// then stays level, and fails one that keeps growing or is too short to
// judge.
func TestSoakFlatRule(t *testing.T) {
	g := series{name: "goroutines", value: func(s sample) float64 { return s.goroutines }, factor: 1.2, slack: 10}
	mk := func(vals ...float64) []sample {
		out := make([]sample, len(vals))
		for i, v := range vals {
			out[i] = sample{goroutines: v}
		}
		return out
	}
	for _, tc := range []struct {
		name string
		vals []float64
		flat bool
	}{
		{"level", []float64{40, 41, 40, 42, 41, 40, 41, 42, 40}, true},
		{"warm-up then level", []float64{8, 40, 60, 58, 61, 59, 60, 62, 60}, true},
		{"noise within the slack", []float64{40, 42, 41, 45, 50, 44, 55, 52, 57}, true},
		{"a leak", []float64{40, 45, 50, 55, 60, 65, 70, 75, 80}, false},
		{"a jump late", []float64{40, 40, 40, 40, 40, 40, 40, 40, 90}, false},
		{"too short", []float64{40, 40}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := judge(g, mk(tc.vals...))
			if v.flat != tc.flat {
				t.Errorf("judge(%v) = flat %v (first %.0f, last %.0f, limit %.0f), want %v", tc.vals, v.flat, v.firstMax, v.lastMax, v.limit, tc.flat)
			}
		})
	}
}

// TestSoakBoundRule: a pool's series may grow to its bound, not past it.
func TestSoakBoundRule(t *testing.T) {
	pool := series{name: "pool", value: func(s sample) float64 { return s.sessions }, bound: 8}
	for _, tc := range []struct {
		vals []float64
		flat bool
	}{
		{[]float64{2, 2, 2, 4, 5, 5, 8, 8, 8}, true},
		{[]float64{2, 2, 9, 2, 2, 2, 2, 2, 2}, false},
	} {
		samples := make([]sample, len(tc.vals))
		for i, v := range tc.vals {
			samples[i] = sample{sessions: v}
		}
		if v := judge(pool, samples); v.flat != tc.flat {
			t.Errorf("judge(%v) = flat %v (largest %.0f, limit %.0f), want %v", tc.vals, v.flat, v.lastMax, v.limit, tc.flat)
		}
	}
}
