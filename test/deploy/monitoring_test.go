package deploy

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// exported are the series the runner serves (internal/runner/metrics.go),
// read from its source: a dashboard or a scrape configuration that names
// another is wrong.
func exported(t *testing.T) []string {
	t.Helper()
	src, err := os.ReadFile("../../internal/runner/metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile(`"(swarmvm_vm_[a-z_]+)"`).FindAllSubmatch(src, -1) {
		names = append(names, string(m[1]))
	}
	if len(names) < 10 {
		t.Fatalf("found %d series in metrics.go: %v", len(names), names)
	}
	return names
}

// Every query of the Grafana dashboard names only series the runner
// serves, and every panel has a query.
func TestDashboardSeries(t *testing.T) {
	names := exported(t)
	b, err := os.ReadFile("../../deploy/grafana/swarmvm-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Query any `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	series := regexp.MustCompile(`swarmvm_[a-z_]+`)
	check := func(where, expr string) {
		for _, s := range series.FindAllString(expr, -1) {
			if !slices.Contains(names, s) {
				t.Errorf("%s asks for %s, which the runner does not serve", where, s)
			}
		}
	}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			check("panel "+p.Title, q.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(string); ok {
			check("variable", q)
		}
	}
}

// The example scrape configuration is one Prometheus accepts (promtool,
// from Debian's prometheus, which scripts/test.sh installs).
func TestPrometheusExample(t *testing.T) {
	out, err := exec.Command("promtool", "check", "config", "../../deploy/prometheus/prometheus.yml").CombinedOutput()
	if err != nil {
		t.Fatalf("promtool: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "SUCCESS: 4 rules found") {
		t.Errorf("promtool found not the 4 alert rules:\n%s", out)
	}
	// Every series the rules ask for is one the runner serves.
	names := exported(t)
	rules, err := os.ReadFile("../../deploy/prometheus/swarmvm-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range regexp.MustCompile(`swarmvm_[a-z_]+`).FindAllString(string(rules), -1) {
		if !slices.Contains(names, s) {
			t.Errorf("swarmvm-alerts.yml asks for %s, which the runner does not serve", s)
		}
	}
}
