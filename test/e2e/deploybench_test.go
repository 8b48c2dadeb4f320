package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// BenchmarkDeployMany deploys one VM from a definition, then ten, and
// prints both times and their ratio: the VMs of a definition are created
// one after another and waited for together, so ten should take little
// more than one (the goal: within 1.5x). Each deploy ends when every VM
// runs and is audited. The VMs are QEMU under TCG with an empty disk (the
// firmware finds nothing to boot and waits, idle): what is measured is
// the deploy, not ten guests booting by emulation on two cores, which
// alone takes the CPU for many seconds (a deploy of ten booting guests
// took 17.7 s against 11.1 s for one, 1.60x). Each reserves a tenth of a
// CPU: ten VMs reserving one each would not fit this two-core node; and
// each is given 2 s for ACPI (a firmware waiting for a boot disk does
// not answer the button) so that removing them does not take minutes.
func BenchmarkDeployMany(b *testing.B) {
	e := newSwarmEnv(b)
	e.label(true)
	for i := 0; i < b.N; i++ {
		one := e.deployMany(b, 1)
		ten := e.deployMany(b, 10)
		b.ReportMetric(one.Seconds(), "one-s")
		b.ReportMetric(ten.Seconds(), "ten-s")
		fmt.Printf("deploy from one definition, idle TCG VMs, each until running and audited: 1 VM %.1f s, 10 VMs %.1f s (%.2fx the time of one; goal 1.5x)\n",
			one.Seconds(), ten.Seconds(), ten.Seconds()/one.Seconds())
	}
}

// deployMany deploys n VMs from one definition, times the deploy, and
// removes them.
func (e *swarmEnv) deployMany(b *testing.B, n int) time.Duration {
	var def strings.Builder
	fmt.Fprintf(&def, "image: %s\nstorage: %s\nbroker_dir: %s\nvms:\n", image, e.storage, e.brokerDir)
	var names []string
	for i := range n {
		name := fmt.Sprintf("bench-many-%d-%d-%d", n, i, time.Now().UnixNano()%100000)
		names = append(names, name)
		fmt.Fprintf(&def, "  - name: %s\n    node: %s\n    accel: tcg\n    memory: 256M\n    reserve_cpus: 0.1\n    disk_size: 1G\n    boot_mode: bios\n    shutdown_timeout: 2s\n", name, e.node)
	}
	file := filepath.Join(b.TempDir(), "vms.yaml")
	if err := os.WriteFile(file, []byte(def.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.swarmvm(append([]string{"rm"}, names...)...) })
	began := time.Now()
	out, code := e.swarmvm("deploy", "--wait", "5m", "-f", file)
	took := time.Since(began)
	if code != 0 {
		b.Fatalf("deploy of %d VMs: exit %d\n%s", n, code, out)
	}
	for _, name := range names {
		if !strings.Contains(out, name+": accelerator: TCG, asked for by name") {
			b.Fatalf("deploy did not verify %s:\n%s", name, out)
		}
	}
	if rm, code := e.swarmvm(append([]string{"rm"}, names...)...); code != 0 {
		b.Fatalf("rm: exit %d\n%s", code, rm)
	}
	return took
}
