package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
)

// series is one scrape: each series as `name{labels}` to its value.
type series map[string]float64

// scrape reads the runner's /metrics with the token ("" for none).
func scrape(t testing.TB, port int, token string) (series, int) {
	t.Helper()
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/metrics", port), nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return nil, 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	out := series{}
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			out[l[:i]] = v
		}
	}
	return out, resp.StatusCode
}

// find is the value of the series named name whose labels include each of
// labels (`key="value"`), and whether there is one.
func (s series) find(name string, labels ...string) (float64, bool) {
	for k, v := range s {
		if k != name && !strings.HasPrefix(k, name+"{") {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(k, l)
		}
		if all {
			return v, true
		}
	}
	return 0, false
}

// The runner's metrics, scraped as Prometheus would: a scrape without the
// token (or with another) is refused; with it, every series is labelled
// with the VM and reads what is true of it: running under TCG, QEMU's CPU
// and memory, vCPU 0's time, the guest agent not connected (the test
// guest has none), and the disk's write bytes rise by the 64 MiB the guest
// writes. The runner's CPU per scrape is logged.
func TestMetrics(t *testing.T) {
	v := newVM(t)
	port := freePort(t)
	token := "e2e-metrics-token-0123456789"
	tokenFile := filepath.Join(v.store, "metrics-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	os.Chown(tokenFile, runnerUID, runnerUID)
	v.run([]string{"-p", fmt.Sprintf("127.0.0.1:%d:%d", port, port)},
		append(kernelEnv("swarmvm.fill=64 swarmvm.fillafter=15"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M",
			fmt.Sprintf("METRICS_PORT=%d", port), "METRICS_TOKEN_FILE=/var/lib/poc-qemu/metrics-token")...)
	v.waitFor("the guest's wait before its writes", 180*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILL-IN") })
	if _, code := scrape(t, port, ""); code != http.StatusUnauthorized {
		t.Errorf("a scrape without the token: HTTP %d, want 401", code)
	}
	if _, code := scrape(t, port, "e2e-metrics-token-wrong-0000"); code != http.StatusUnauthorized {
		t.Errorf("a scrape with another token: HTTP %d, want 401", code)
	}
	before, code := scrape(t, port, token)
	if code != http.StatusOK {
		t.Fatalf("scrape: HTTP %d", code)
	}
	vm := `vm="` + v.name + `"`
	w0, ok := before.find("swarmvm_vm_storage_write_traffic_bytes_total", vm, `drive="disk0"`)
	if !ok {
		t.Fatalf("no write bytes for disk0 in:\n%v", before)
	}
	for _, c := range []struct {
		name   string
		labels []string
		ok     func(float64) bool
	}{
		{"swarmvm_vm_info", []string{vm, `accel="tcg"`}, func(x float64) bool { return x == 1 }},
		{"swarmvm_vm_running", []string{vm}, func(x float64) bool { return x == 1 }},
		{"swarmvm_vm_vcpus", []string{vm}, func(x float64) bool { return x == 1 }},
		{"swarmvm_vm_memory_domain_bytes", []string{vm}, func(x float64) bool { return x == 256<<20 }},
		{"swarmvm_vm_memory_resident_bytes", []string{vm}, func(x float64) bool { return x > 32<<20 }},
		{"swarmvm_vm_cpu_user_usage_seconds_total", []string{vm}, func(x float64) bool { return x > 0 }},
		{"swarmvm_vm_vcpu_seconds_total", []string{vm, `id="0"`}, func(x float64) bool { return x > 0 }},
		{"swarmvm_vm_vcpu_delay_seconds_total", []string{vm, `id="0"`}, func(x float64) bool { return x >= 0 }},
		{"swarmvm_vm_agent_connected", []string{vm}, func(x float64) bool { return x == 0 }},
		{"swarmvm_vm_uptime_seconds", []string{vm}, func(x float64) bool { return x > 0 }},
	} {
		if x, ok := before.find(c.name, c.labels...); !ok || !c.ok(x) {
			t.Errorf("%s%v: %v (present %v)", c.name, c.labels, x, ok)
		}
	}
	v.waitFor("the guest's 64 MiB", 180*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-FILLED 64MiB") })
	after, _ := scrape(t, port, token)
	w1, _ := after.find("swarmvm_vm_storage_write_traffic_bytes_total", vm, `drive="disk0"`)
	if w1-w0 < 64<<20 {
		t.Errorf("disk0's write bytes rose by %.0f, want at least 64 MiB", w1-w0)
	}
	runner, _ := v.qemuPID()
	cpu := func() float64 {
		st, err := procfs.ReadStat(runner)
		if err != nil {
			t.Fatal(err)
		}
		return float64(st.UTime+st.STime) / procfs.ClockTicks
	}
	const n = 50
	c0 := cpu()
	for range n {
		scrape(t, port, token)
	}
	t.Logf("write bytes %.0f → %.0f; the runner's CPU per scrape (%d, at the clock tick's resolution): %.2f ms", w0, w1, n, (cpu()-c0)*1000/n)
	if x, ok := after.find("swarmvm_vm_starts_total", vm); !ok || x != 1 {
		t.Errorf("starts_total %v (present %v), want 1 on a new VM", x, ok)
	}

	// Across runs: the runner killed without a word, its container
	// started again: the record counts two starts and one unrecorded end;
	// then a clean stop is recorded as ok.
	if out, err := exec.Command("docker", "kill", "-s", "KILL", v.name).CombinedOutput(); err != nil {
		t.Fatalf("docker kill: %v %s", err, out)
	}
	v.waitExit(30 * time.Second)
	if out, err := exec.Command("docker", "start", v.name).CombinedOutput(); err != nil {
		t.Fatalf("docker start: %v %s", err, out)
	}
	var again series
	v.waitFor("the second run's metrics", 120*time.Second, func() bool {
		var code int
		again, code = scrape(t, port, token)
		x, _ := again.find("swarmvm_vm_starts_total", vm)
		return code == http.StatusOK && x == 2
	})
	if x, ok := again.find("swarmvm_vm_exits_total", vm, `reason="unrecorded"`); !ok || x != 1 {
		t.Errorf("exits_total{reason=unrecorded} %v (present %v), want 1 after a SIGKILL:\n%v", x, ok, again)
	}
	contains(t, "runner log", v.logs(), "the VM's last run ended without recording how")
	if code, _ := v.stop(60 * time.Second); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	rec, err := os.ReadFile(filepath.Join(v.store, "logs", v.name+".runs.json"))
	if err != nil || !strings.Contains(string(rec), `"starts":2,"exits":{"ok":1,"unrecorded":1},"running":false`) {
		t.Errorf("the record after a kill, a start and a clean stop: %s (%v)", rec, err)
	}
}

// A real Prometheus (Debian's) finds a VM deployed with --metrics-port
// through dockerswarm_sd_configs (role tasks), configured as
// deploy/prometheus/prometheus.yml says, and scrapes it: the VM's disk write bytes, queried
// from Prometheus, rise by the 64 MiB the guest writes 40 s after boot.
func TestPrometheusScrapesSwarmVM(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("prometheus is not installed (scripts/test.sh installs Debian's)")
	}
	name := fmt.Sprintf("e2e-prom-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	metricsPort, webPort := freePort(t), freePort(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "prometheus.yml")
	example, err := os.ReadFile("../../deploy/prometheus/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	// the example as it is, polled faster
	c := strings.NewReplacer("scrape_interval: 15s", "scrape_interval: 2s", "refresh_interval: 30s", "refresh_interval: 2s").Replace(string(example))
	if c == string(example) {
		t.Fatal("deploy/prometheus/prometheus.yml no longer has the intervals this test shortens")
	}
	os.WriteFile(conf, []byte(c), 0o644)
	copyFile(t, "../../deploy/prometheus/swarmvm-alerts.yml", filepath.Join(dir, "swarmvm-alerts.yml")) // its rule_files
	cmd := exec.Command(prom, "--config.file="+conf, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", webPort))
	logf, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Logf("prometheus log:\n%s", tail(string(b), 4000))
		}
	})
	query := func(q string) (float64, bool) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", webPort, url.QueryEscape(q)))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var r struct {
			Data struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || len(r.Data.Result) != 1 {
			return 0, false
		}
		s, _ := r.Data.Result[0].Value[1].(string)
		x, err := strconv.ParseFloat(s, 64)
		return x, err == nil
	}
	args := e.vmArgs(name, "tcg", "--metrics-port", strconv.Itoa(metricsPort),
		"--env", "KERNEL_CMDLINE=console=ttyS0 quiet swarmvm.fill=64 swarmvm.fillafter=40")
	if out, code := e.swarmvm(append([]string{"deploy", "--wait", "120s"}, args...)...); code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	serial := filepath.Join(e.storage, "logs", name+".serial.log")
	written := `swarmvm_vm_storage_write_traffic_bytes_total{vm="` + name + `",drive="disk0"}`
	var w0 float64
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		x, ok := query(written)
		b, _ := os.ReadFile(serial)
		if strings.Contains(string(b), "SWARMVM-GUEST-FILLED") {
			t.Fatalf("the guest wrote its 64 MiB before Prometheus had scraped the VM (last answer %v %v)", x, ok)
		}
		if ok {
			w0 = x
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus has no %s within 90 s", written)
		}
	}
	if up, ok := query(`up{job="swarmvm"}`); !ok || up != 1 {
		t.Errorf(`up{job="swarmvm"}: %v (%v)`, up, ok)
	}
	var w1 float64
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(2 * time.Second) {
		if x, ok := query(written); ok && x-w0 >= 64<<20 {
			w1 = x
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(serial)
			t.Fatalf("the write bytes Prometheus has did not rise by 64 MiB within 3 minutes of its first scrape (from %.0f); serial log:\n%s", w0, tail(string(b), 2000))
		}
	}
	t.Logf("Prometheus: %s %.0f → %.0f", written, w0, w1)
	// ... and it loaded the example's alert rules, and evaluates them.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/rules", webPort))
	if err != nil {
		t.Fatal(err)
	}
	rules, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"SwarmVMBackupTooOld", "SwarmVMBackupFailing", "SwarmVMGuestFilesystemFull", "SwarmVMNotRunning"} {
		if !strings.Contains(string(rules), `"name":"`+name+`"`) {
			t.Errorf("Prometheus has no rule %s:\n%s", name, rules)
		}
	}
	if strings.Contains(string(rules), `"health":"err"`) {
		t.Errorf("a rule fails to evaluate:\n%s", rules)
	}
}

// BenchmarkMetricsScrape: the runner's CPU for a scrape of its metrics
// (the goal: 5 ms at most), beside what the same runner spends idle over
// as long, in one run; and that the scrapes never paused the guest (the
// runner logs every STOP QEMU reports).
func BenchmarkMetricsScrape(b *testing.B) {
	require(b)
	v := newVM(b)
	port := freePort(b)
	v.run([]string{"-p", fmt.Sprintf("127.0.0.1:%d:%d", port, port)},
		append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", fmt.Sprintf("METRICS_PORT=%d", port))...)
	v.waitFor("boot marker", 180*time.Second, func() bool { return strings.Contains(v.serial(), marker) })
	runner, _ := v.qemuPID()
	cpu := func() float64 {
		st, err := procfs.ReadStat(runner)
		if err != nil {
			b.Fatal(err)
		}
		return float64(st.UTime+st.STime) / procfs.ClockTicks
	}
	const n = 400
	if s, code := scrape(b, port, ""); code != http.StatusOK || len(s) < 10 {
		b.Fatalf("scrape: HTTP %d, %d series", code, len(s))
	}
	c0, t0 := cpu(), time.Now()
	for range n * b.N {
		scrape(b, port, "")
	}
	busy, wall := cpu()-c0, time.Since(t0)
	c1 := cpu()
	time.Sleep(wall)
	idle := cpu() - c1
	each := busy * 1000 / float64(n*b.N)
	fmt.Printf("metrics: %d scrapes in %.1f s, the runner's CPU %.2f ms each (goal 5 ms); the same runner idle over as long: %.0f ms (%.2f ms a second)\n",
		n*b.N, wall.Seconds(), each, idle*1000, idle*1000/wall.Seconds())
	b.ReportMetric(each, "runner-ms/scrape")
	if strings.Contains(v.logs(), "event=STOP") {
		b.Errorf("the guest was paused during the scrapes:\n%s", v.logs())
	}
}
