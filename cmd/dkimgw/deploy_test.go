package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"

	"github.com/dkimgw/dkimgw/testenv"
)

const (
	alertsDir   = "../../deploy/prometheus"
	dashboard   = "../../deploy/grafana/dkimgw.json"
	readmePath  = "../../README.md"
	opsDoc      = "../../docs/operations.md"
	gatewaysDoc = "../../docs/several-gateways.md"
)

// TestAlertRules checks the shipped alerting rules with promtool, and
// runs their unit tests.
func TestAlertRules(t *testing.T) {
	promtool := testenv.Require(t, "promtool")[0]
	for _, args := range [][]string{
		{"check", "rules", "dkimgw-alerts.yml"},
		{"test", "rules", "dkimgw-alerts_test.yml"},
	} {
		cmd := exec.CommandContext(t.Context(), promtool, args...)
		cmd.Dir = alertsDir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// exportedMetrics are the names of the series dkimgw's own collectors
// export (histograms with their _bucket, _sum and _count).
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	m := newMetrics(metricsSources{})
	ch := make(chan *prometheus.Desc, 100)
	for _, c := range m.own {
		c.Describe(ch)
	}
	close(ch)
	re := regexp.MustCompile(`fqName: "([^"]+)"`)
	names := map[string]bool{}
	for d := range ch {
		mm := re.FindStringSubmatch(d.String())
		if mm == nil {
			t.Fatalf("cannot read the name of %s", d)
		}
		names[mm[1]] = true
		if mm[1] == "dkimgw_token_sign_duration_seconds" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[mm[1]+s] = true
			}
		}
	}
	return names
}

var metricName = regexp.MustCompile(`\b(dkimgw|go|process)_[a-zA-Z0-9_]*`)

// checkExpr fails when expr names a dkimgw metric dkimgw does not export,
// or names none.
func checkExpr(t *testing.T, where, expr string, names map[string]bool) {
	t.Helper()
	found := metricName.FindAllString(expr, -1)
	if len(found) == 0 {
		t.Errorf("%s: %q names no dkimgw metric", where, expr)
	}
	for _, n := range found {
		if strings.HasPrefix(n, "dkimgw_") && !names[n] {
			t.Errorf("%s: %q names %s, which dkimgw does not export", where, expr, n)
		}
	}
}

// TestDashboardAndRulesNameExportedMetrics: every PromQL expression of
// the Grafana dashboard and of the alerting rules names only metrics
// dkimgw exports, and the dashboard is valid JSON.
func TestDashboardAndRulesNameExportedMetrics(t *testing.T) {
	names := exportedMetrics(t)
	data, err := os.ReadFile(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	var dash any
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s is not valid JSON: %v", dashboard, err)
	}
	n := 0
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				if s, ok := c.(string); ok && k == "expr" {
					n++
					checkExpr(t, dashboard+": "+path, s, names)
				}
				walk(path+"."+k, c)
			}
		case []any:
			for _, c := range v {
				walk(path+"[]", c)
			}
		}
	}
	walk("", dash)
	if n < 10 {
		t.Errorf("the dashboard has %d expressions; want at least 10", n)
	}

	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	data, err = os.ReadFile(filepath.Join(alertsDir, "dkimgw-alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &rules); err != nil {
		t.Fatal(err)
	}
	var alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			checkExpr(t, "alert "+r.Alert, r.Expr, names)
		}
	}
	for _, want := range []string{"DkimgwKeyOlderThanPolicy", "DkimgwDNSDrift", "DkimgwTokenErrors", "DkimgwTokenReinitializations", "DkimgwTempfailRate", "DkimgwNothingSigned"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("the rules have no alert %s", want)
		}
	}
}

// TestMetricsDocumented: docs/operations.md describes every metric
// dkimgw exports (those of several gateways sharing etcd may be in the
// guide docs/several-gateways.md instead).
func TestMetricsDocumented(t *testing.T) {
	readme, err := os.ReadFile(opsDoc)
	if err != nil {
		t.Fatal(err)
	}
	guide, err := os.ReadFile(gatewaysDoc)
	if err != nil {
		t.Fatal(err)
	}
	readme = append(readme, guide...)
	for n := range exportedMetrics(t) {
		if strings.HasSuffix(n, "_bucket") || strings.HasSuffix(n, "_sum") || strings.HasSuffix(n, "_count") {
			continue
		}
		if !strings.Contains(string(readme), "`"+n+"`") {
			t.Errorf("neither docs/operations.md nor docs/several-gateways.md describes %s (as `%s`)", n, n)
		}
	}
}
