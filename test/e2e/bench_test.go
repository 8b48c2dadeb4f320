package e2e

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// download fetches the guest's 32 MiB /blob with curl (run by prefix, e.g.
// in the LAN's namespace) and returns bytes per second as curl measured.
func download(b *testing.B, prefix []string, url string) float64 {
	b.Helper()
	args := append(prefix, "curl", "-s", "-o", "/dev/null", "--max-time", "120", "-w", "%{size_download} %{speed_download}", url)
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		b.Fatalf("%v: %v %s", args, err, out)
	}
	f := strings.Fields(string(out))
	size, _ := strconv.ParseFloat(f[0], 64)
	speed, _ := strconv.ParseFloat(f[1], 64)
	if size != 32<<20 {
		b.Fatalf("downloaded %v bytes, want %d", size, 32<<20)
	}
	return speed
}

// BenchmarkNetThroughput measures guest→host throughput under TCG for
// user-mode networking (through the published port on loopback) and for
// bridge mode (from the LAN namespace, through the broker's TAP), and
// prints the ratio. Run: SWARMVM_E2E=1 go test ./test/e2e -run '^$'
// -bench NetThroughput -benchtime 3x
func BenchmarkNetThroughput(b *testing.B) {
	speeds := map[string]float64{}
	for _, mode := range []string{"user", "bridge"} {
		b.Run(mode, func(b *testing.B) {
			prefix, url := startBenchVM(b, mode)
			b.SetBytes(32 << 20)
			b.ResetTimer()
			var sum float64
			for i := 0; i < b.N; i++ {
				sum += download(b, prefix, url)
			}
			speeds[mode] = sum / float64(b.N)
			b.ReportMetric(speeds[mode]/1e6, "curl-MB/s")
		})
	}
	if speeds["user"] > 0 && speeds["bridge"] > 0 {
		fmt.Printf("guest→host under TCG: user %.1f MB/s, bridge %.1f MB/s, bridge/user = %.2f\n",
			speeds["user"]/1e6, speeds["bridge"]/1e6, speeds["bridge"]/speeds["user"])
	}
}

// startBenchVM boots the test guest in the given mode and returns how to
// reach its HTTP server.
func startBenchVM(b *testing.B, mode string) ([]string, string) {
	tb := testing.TB(b)
	v := newVM(tb)
	extra := []string{}
	env := append(kernelEnv(""), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M")
	var prefix []string
	url := "http://127.0.0.1:18081/blob"
	if mode == "user" {
		extra = append(extra, "-p", "127.0.0.1:18081:18081")
		env = append(env, "PORTS=18081:80")
	} else {
		l := newLAN(tb)
		dir, _ := l.broker()
		extra = append(extra, "-v", dir+":/run/swarmvm")
		env = append(kernelEnv("swarmvm.ip="+lanGuest+"/24"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M",
			"NET_MODE=bridge", "NET_BRIDGE="+lanBridge)
		prefix = []string{"ip", "netns", "exec", l.ns}
		url = "http://" + lanGuest + "/blob"
	}
	v.run(extra, env...)
	deadline := time.Now().Add(120 * time.Second)
	for !strings.Contains(v.serial(), "SWARMVM-GUEST-NET") {
		if time.Now().After(deadline) {
			tb.Fatalf("guest network not up in %s mode", mode)
		}
		time.Sleep(250 * time.Millisecond)
	}
	// The first request also waits for httpd.
	for i := 0; i < 30; i++ {
		args := append(append([]string{}, prefix...), "curl", "-s", "--max-time", "2", strings.TrimSuffix(url, "blob"))
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err == nil && strings.Contains(string(out), "SWARMVM") {
			return prefix, url
		}
		time.Sleep(time.Second)
	}
	tb.Fatal(fmt.Sprintf("guest HTTP not answering in %s mode", mode))
	return nil, ""
}
