package runner

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// METRICS_PORT: the runner serves Prometheus metrics on that port, every
// series labelled with the VM and its node and named after KubeVirt's
// kubevirt_vmi_* where one matches. A scrape reads QEMU's /proc files and
// asks QMP two questions that do not stop the guest (query-cpus-fast,
// query-blockstats), each bounded by metricsQMPWait; its port is bounded
// like the console's (connections at once, from one address, header time).
const (
	metricsQMPWait  = 2 * time.Second
	metricsConns    = 16
	metricsPerIP    = 8
	metricsTokenMax = 4 << 10
)

// metricsServer is the port, bound before QEMU starts (a taken port or an
// unreadable token stops the run before anything exists), and what the
// supervision counts for it.
type metricsServer struct {
	l      net.Listener
	token  []byte // nil: no token asked
	log    *slog.Logger
	events *prometheus.CounterVec
	reg    *prometheus.Registry
	labels prometheus.Labels
}

func openMetrics(cfg config.Config, log *slog.Logger) (*metricsServer, error) {
	if cfg.MetricsPort == 0 {
		return nil, nil
	}
	var token []byte
	if cfg.MetricsTokenFile != "" {
		b, err := readSmall(cfg.MetricsTokenFile, metricsTokenMax)
		if err != nil {
			return nil, exitf(status.ExitConfig, "METRICS_TOKEN_FILE %s: %v — give a file with the token (swarmvm deploy --metrics-token makes it a secret), or unset it", cfg.MetricsTokenFile, err)
		}
		if token = []byte(strings.TrimSpace(string(b))); len(token) < 16 {
			return nil, exitf(status.ExitConfig, "METRICS_TOKEN_FILE %s: the token has %d characters, fewer than 16 — give a longer one", cfg.MetricsTokenFile, len(token))
		}
	}
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", cfg.MetricsPort))
	if err != nil {
		return nil, exitf(status.ExitNet, "METRICS_PORT: cannot listen on %d: %v — choose a port nothing else in the container uses", cfg.MetricsPort, err)
	}
	log = log.With("metrics_port", cfg.MetricsPort, "token", token != nil)
	node := cfg.NodeHostname
	if node == "" {
		node, _ = os.Hostname()
	}
	labels := prometheus.Labels{"vm": cfg.Name, "node": node}
	m := &metricsServer{l: newLimitListener(l, metricsConns, metricsPerIP, log), token: token, log: log, labels: labels, reg: prometheus.NewPedanticRegistry()}
	m.events = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "swarmvm_vm_qmp_events_total", Help: "QMP events QEMU sent, by name.", ConstLabels: labels,
	}, []string{"event"})
	m.reg.MustRegister(m.events)
	return m, nil
}

// event counts one QMP event; a nil server counts nothing.
func (m *metricsServer) event(name string) {
	if m != nil {
		m.events.WithLabelValues(name).Inc()
	}
}

// serve answers scrapes of v until stop is called.
func (m *metricsServer) serve(v *vm) (stop func(by time.Time)) {
	m.reg.MustRegister(&vmCollector{labels: m.labels, cfg: v.cfg, pid: v.pid, qmp: v.qmp, agent: v.agent, started: time.Now(),
		memBytes: float64(v.spec.MemoryMiB << 20), tap: tapCounters(v), runs: v.runs, console: v.console, backups: &v.backups,
		leases: map[string]*fdpass.Lease{"kvm": v.lease, "tap": v.tapOf}})
	h := promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, MaxRequestsInFlight: 4, Timeout: 4 * metricsQMPWait})
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.authorize(h))
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: consoleHeaderWait, IdleTimeout: consoleIdle, MaxHeaderBytes: consoleMaxHeader}
	go func() {
		if err := hs.Serve(m.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.log.Error("metrics stopped", "err", err)
		}
	}()
	m.log.Info("metrics ready on /metrics")
	return func(by time.Time) {
		ctx, cancel := context.WithTimeout(context.Background(), until(by, time.Second))
		defer cancel()
		hs.Shutdown(ctx)
		hs.Close()
	}
}

// authorize asks for the bearer token, when there is one.
func (m *metricsServer) authorize(h http.Handler) http.Handler {
	if m.token == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), m.token) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="swarmvm metrics"`)
			http.Error(w, "a bearer token is needed (METRICS_TOKEN_FILE)", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

func (m *metricsServer) close() {
	if m != nil {
		m.l.Close()
	}
}

// readSmall reads a file of at most max bytes.
func readSmall(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, max+1)
	n, err := f.Read(b)
	if err != nil && n == 0 {
		return nil, err
	}
	if int64(n) > max {
		return nil, fmt.Errorf("larger than %d bytes", max)
	}
	return b[:n], nil
}

// vmCollector reads the VM's figures at each scrape.
type vmCollector struct {
	labels   prometheus.Labels
	cfg      config.Config
	pid      int
	qmp      *qmp.Client
	agent    *guestAgent
	started  time.Time
	memBytes float64
	tap      func(context.Context) (*fdpass.TAPStats, error) // nil without a TAP
	runs     runs
	console  *console.Server          // nil without one
	leases   map[string]*fdpass.Lease // the broker's, by what they hold; nil ones are not the broker's
	backups  *backupStats
}

var (
	vcpuLabels  = []string{"id"}
	driveLabels = []string{"drive"}
)

func (c *vmCollector) desc(name, help string, variable ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, variable, c.labels)
}

// Describe sends nothing: the series depend on the VM (its vCPUs and
// drives), so the collector is unchecked.
func (c *vmCollector) Describe(chan<- *prometheus.Desc) {}

func (c *vmCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, lv...)
	}
	counter := func(d *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, lv...)
	}
	gauge(c.desc("swarmvm_vm_info", "The VM: its accelerator and QEMU's version.", "accel", "qemu_version"), 1, c.cfg.Accel, c.qmp.Version().String())
	gauge(c.desc("swarmvm_vm_uptime_seconds", "Time since the VM was verified running."), time.Since(c.started).Seconds())
	gauge(c.desc("swarmvm_vm_vcpus", "vCPUs the VM was given."), float64(c.cfg.CPUs))
	gauge(c.desc("swarmvm_vm_memory_domain_bytes", "Guest RAM the VM was given."), c.memBytes)
	c.collectRuns(counter, gauge)
	if c.agent != nil {
		gauge(c.desc("swarmvm_vm_agent_connected", "1 when the guest agent answered the runner's last poll."), b2f(c.agent.answering()))
		capacity := c.desc("swarmvm_vm_filesystem_capacity_bytes", "Size of each guest filesystem, from the guest agent.", "mount_point", "file_system_type")
		used := c.desc("swarmvm_vm_filesystem_used_bytes", "Used bytes of each guest filesystem, from the guest agent.", "mount_point", "file_system_type")
		seen := map[string]bool{}
		for _, f := range c.agent.filesystems() {
			if seen[f.Mountpoint] { // bind mounts of one filesystem
				continue
			}
			seen[f.Mountpoint] = true
			gauge(capacity, float64(*f.TotalBytes), f.Mountpoint, f.Type)
			gauge(used, float64(*f.UsedBytes), f.Mountpoint, f.Type)
		}
	}
	if st, err := procfs.ReadStat(c.pid); err == nil {
		counter(c.desc("swarmvm_vm_cpu_user_usage_seconds_total", "QEMU's CPU time in user mode (the guest's, under KVM, counts here)."), float64(st.UTime)/procfs.ClockTicks)
		counter(c.desc("swarmvm_vm_cpu_system_usage_seconds_total", "QEMU's CPU time in kernel mode."), float64(st.STime)/procfs.ClockTicks)
	}
	if st, err := procfs.ReadStatus(c.pid); err == nil {
		gauge(c.desc("swarmvm_vm_memory_resident_bytes", "QEMU's resident memory."), float64(st.KiB("VmRSS")<<10))
	}
	ctx, cancel := context.WithTimeout(context.Background(), metricsQMPWait)
	defer cancel()
	running := 0.0
	if s, err := c.qmp.QueryStatus(ctx); err == nil && s.Status == "running" {
		running = 1
	}
	gauge(c.desc("swarmvm_vm_running", "1 while QEMU's run state is running (0: paused, stopped, panicked)."), running)
	if cpus, err := c.qmp.QueryCPUsFast(ctx); err == nil {
		run := c.desc("swarmvm_vm_vcpu_seconds_total", "Time each vCPU's thread ran on a host CPU.", vcpuLabels...)
		delay := c.desc("swarmvm_vm_vcpu_delay_seconds_total", "Time each vCPU's thread was runnable but waited for a host CPU.", vcpuLabels...)
		for _, cpu := range cpus {
			if ss, err := procfs.ReadSchedstat(c.pid, cpu.ThreadID); err == nil {
				id := strconv.Itoa(cpu.Index)
				counter(run, float64(ss.RunNS)/1e9, id)
				counter(delay, float64(ss.WaitNS)/1e9, id)
			}
		}
	}
	if drives, err := c.qmp.QueryBlockstats(ctx); err == nil {
		for _, d := range []struct {
			name, help string
			of         func(qmp.BlockStats) float64
		}{
			{"swarmvm_vm_storage_read_traffic_bytes_total", "Bytes the guest read from the drive.", func(b qmp.BlockStats) float64 { return float64(b.Stats.RdBytes) }},
			{"swarmvm_vm_storage_write_traffic_bytes_total", "Bytes the guest wrote to the drive.", func(b qmp.BlockStats) float64 { return float64(b.Stats.WrBytes) }},
			{"swarmvm_vm_storage_iops_read_total", "Read operations on the drive.", func(b qmp.BlockStats) float64 { return float64(b.Stats.RdOps) }},
			{"swarmvm_vm_storage_iops_write_total", "Write operations on the drive.", func(b qmp.BlockStats) float64 { return float64(b.Stats.WrOps) }},
			{"swarmvm_vm_storage_flush_requests_total", "Flushes of the drive.", func(b qmp.BlockStats) float64 { return float64(b.Stats.FlushOps) }},
			{"swarmvm_vm_storage_read_times_seconds_total", "Time the drive's reads took, summed.", func(b qmp.BlockStats) float64 { return float64(b.Stats.RdTimeNS) / 1e9 }},
			{"swarmvm_vm_storage_write_times_seconds_total", "Time the drive's writes took, summed.", func(b qmp.BlockStats) float64 { return float64(b.Stats.WrTimeNS) / 1e9 }},
			{"swarmvm_vm_storage_flush_times_seconds_total", "Time the drive's flushes took, summed.", func(b qmp.BlockStats) float64 { return float64(b.Stats.FlushTime) / 1e9 }},
		} {
			desc := c.desc(d.name, d.help, driveLabels...)
			for _, b := range drives {
				if name := driveName(b); name != "" {
					counter(desc, d.of(b), name)
				}
			}
		}
	}
	if c.tap == nil {
		return
	}
	if st, err := c.tap(ctx); err == nil {
		for _, n := range networkSeries {
			counter(c.desc(n.name, n.help, "interface"), float64(n.of(st)), "net0")
		}
	}
}

// collectRuns sends the VM's record across tasks, its console's
// connections and its broker leases.
func (c *vmCollector) collectRuns(counter, gauge func(*prometheus.Desc, float64, ...string)) {
	counter(c.desc("swarmvm_vm_starts_total", "Runs of the VM by its runner, across tasks (logs/NAME.runs.json): a restart adds one."), float64(c.runs.Starts))
	exits := c.desc("swarmvm_vm_exits_total", "Ends of the VM's earlier runs, by reason (the exit code's name; unrecorded: the runner was killed).", "reason")
	for reason, n := range c.runs.Exits {
		counter(exits, float64(n), reason)
	}
	if c.console != nil {
		open, opened, refused := c.console.Counts()
		gauge(c.desc("swarmvm_vm_console_connections", "Consoles (screen and serial) connected now."), float64(open))
		counter(c.desc("swarmvm_vm_console_connections_total", "Consoles connected since the VM started."), float64(opened))
		counter(c.desc("swarmvm_vm_console_refused_total", "Console connections refused (no ticket, a bad or used one, too many open)."), float64(refused))
	}
	if c.backups != nil {
		ok, failed, lastOK, next, took := c.backups.read()
		results := c.desc("swarmvm_vm_backups_total", "Online backups the runner served since it started (scheduled or a job's), by result.", "result")
		counter(results, float64(ok), "ok")
		counter(results, float64(failed), "failed")
		if !lastOK.IsZero() {
			gauge(c.desc("swarmvm_vm_backup_last_success_timestamp_seconds", "The point of the newest backup that succeeded (Unix time): alert when it is too old."), float64(lastOK.Unix()))
			gauge(c.desc("swarmvm_vm_backup_last_duration_seconds", "How long the newest backup that succeeded took, in the runner."), took.Seconds())
		}
		if !next.IsZero() {
			gauge(c.desc("swarmvm_vm_backup_next_timestamp_seconds", "When the next scheduled backup is due (Unix time)."), float64(next.Unix()))
		}
	}
	retries := c.desc("swarmvm_vm_broker_retries_total", "Requests to the broker sent again before it granted the lease (no broker yet, or one restarting).", "lease")
	held := c.desc("swarmvm_vm_broker_lease_held", "1 while the broker's end of the lease is there (0: the broker stopped or restarted; QEMU keeps its descriptors).", "lease")
	for what, l := range c.leases {
		if l != nil {
			counter(retries, float64(l.Attempts-1), what)
			gauge(held, b2f(l.Held()), what)
		}
	}
}

// tapCounters reads the counters of the VM's TAP: in bridge mode the TAP
// is in the host's network namespace and the broker answers through the
// lease; in tap mode it is in the container's, whose /sys the runner reads.
func tapCounters(v *vm) func(context.Context) (*fdpass.TAPStats, error) {
	switch {
	case v.tapOf != nil:
		// A broker that predates the question never answers it: after
		// one unanswered question the runner stops asking.
		var deaf atomic.Bool
		return func(ctx context.Context) (*fdpass.TAPStats, error) {
			if deaf.Load() {
				return nil, errors.New("the broker does not answer lease questions")
			}
			st, err := v.tapOf.Stats(ctx)
			if errors.Is(err, context.DeadlineExceeded) && deaf.CompareAndSwap(false, true) {
				v.log.Warn("the broker did not answer for the TAP's counters: an older broker; no network series until both are updated", "err", err)
			}
			return st, err
		}
	case v.cfg.NetMode == config.NetTAP:
		return func(context.Context) (*fdpass.TAPStats, error) { return sysfsTAPStats("/sys/class/net", v.cfg.TAPName) }
	}
	return nil
}

// sysfsTAPStats reads a network device's counters from sysfs.
func sysfsTAPStats(root, name string) (*fdpass.TAPStats, error) {
	var st fdpass.TAPStats
	for _, c := range []struct {
		file string
		to   *uint64
	}{
		{"rx_bytes", &st.RxBytes}, {"rx_packets", &st.RxPackets}, {"rx_errors", &st.RxErrors}, {"rx_dropped", &st.RxDropped},
		{"tx_bytes", &st.TxBytes}, {"tx_packets", &st.TxPackets}, {"tx_errors", &st.TxErrors}, {"tx_dropped", &st.TxDropped},
	} {
		b, err := os.ReadFile(filepath.Join(root, name, "statistics", c.file))
		if err != nil {
			return nil, err
		}
		if *c.to, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err != nil {
			return nil, fmt.Errorf("%s %s: %v", name, c.file, err)
		}
	}
	return &st, nil
}

// networkSeries are the TAP's counters as the guest sees them: what the
// TAP transmitted, the guest received.
var networkSeries = []struct {
	name, help string
	of         func(*fdpass.TAPStats) uint64
}{
	{"swarmvm_vm_network_receive_bytes_total", "Bytes the guest received on the interface (its TAP's transmitted bytes).", func(s *fdpass.TAPStats) uint64 { return s.TxBytes }},
	{"swarmvm_vm_network_transmit_bytes_total", "Bytes the guest sent on the interface (its TAP's received bytes).", func(s *fdpass.TAPStats) uint64 { return s.RxBytes }},
	{"swarmvm_vm_network_receive_packets_total", "Packets the guest received on the interface.", func(s *fdpass.TAPStats) uint64 { return s.TxPackets }},
	{"swarmvm_vm_network_transmit_packets_total", "Packets the guest sent on the interface.", func(s *fdpass.TAPStats) uint64 { return s.RxPackets }},
	{"swarmvm_vm_network_receive_errors_total", "Errors on the way to the guest (its TAP's transmit errors).", func(s *fdpass.TAPStats) uint64 { return s.TxErrors }},
	{"swarmvm_vm_network_transmit_errors_total", "Errors on the guest's sending (its TAP's receive errors).", func(s *fdpass.TAPStats) uint64 { return s.RxErrors }},
	{"swarmvm_vm_network_receive_packets_dropped_total", "Packets dropped on the way to the guest (its TAP's transmit drops: a guest not reading its queue).", func(s *fdpass.TAPStats) uint64 { return s.TxDropped }},
	{"swarmvm_vm_network_transmit_packets_dropped_total", "Packets the guest sent that the host dropped.", func(s *fdpass.TAPStats) uint64 { return s.RxDropped }},
}

// driveName names a drive as the operator knows it: its id ("disk0"),
// else the device it is attached to; "" for a node of no device.
func driveName(b qmp.BlockStats) string {
	if b.Device != "" {
		return b.Device
	}
	return b.QDev
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
