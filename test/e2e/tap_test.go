package e2e

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Tap mode: with exactly CAP_NET_ADMIN added and the TUN device mounted as
// Swarm would (a bind mount), the image's helper makes the TAP in the
// container, the guest answers on it from the container's namespace, and
// QEMU still holds no capability. Without the capability, preflight says
// what is missing.
func TestTapModeInContainer(t *testing.T) {
	v := newVM(t)
	port := freePort(t)
	// No container-level no-new-privileges here: it would disable the
	// helper's file capability (the runner sets no_new_privs on QEMU).
	v.runNoNNP([]string{"--cap-add", "NET_ADMIN", "-v", "/dev/net/tun:/dev/net/tun", "-p", fmt.Sprintf("127.0.0.1:%d:%d", port, port)},
		append(kernelEnv("swarmvm.ip=10.0.3.10/24"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M",
			"NET_MODE=tap", "TUN_DEVICE=/dev/net/tun", fmt.Sprintf("METRICS_PORT=%d", port))...)
	v.waitFor("the guest on the TAP", 120*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-NET 10.0.3.10") })
	contains(t, "runner log", v.logs(), "tap tap0 made in the container (10.0.3.1/24)")
	runner, qemu := v.qemuPID()
	deadline := time.Now().Add(60 * time.Second)
	for {
		// From the container's own network namespace, which the test's
		// dockerd made for it.
		out, err := exec.Command("nsenter", "-t", strconv.Itoa(runner), "-n", "curl", "-s", "--max-time", "3", "http://10.0.3.10/").CombinedOutput()
		if err == nil && strings.Contains(string(out), "SWARMVM-GUEST-HTTP") {
			// The TAP's counters, read from the container's /sys.
			t.Logf("the guest sent %.0f bytes by the metrics", guestSent(t, v, port, len(out)))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer from the guest on the TAP: %v %s", err, out)
		}
		time.Sleep(time.Second)
	}
	st := status(t, qemu)
	if st["CapEff"] != "0000000000000000" || st["CapPrm"] != "0000000000000000" || st["NoNewPrivs"] != "1" || strings.Contains(st["Uid"], "0\t") {
		t.Errorf("QEMU in tap mode: Uid %s CapEff %s CapPrm %s NoNewPrivs %s", st["Uid"], st["CapEff"], st["CapPrm"], st["NoNewPrivs"])
	}
	rst := status(t, runner)
	t.Logf("tap mode: runner CapEff %s CapBnd %s; QEMU CapEff %s CapBnd %s NoNewPrivs %s (the bounding set keeps NET_ADMIN: the less private mode)",
		rst["CapEff"], rst["CapBnd"], st["CapEff"], st["CapBnd"], st["NoNewPrivs"])
	if rst["CapEff"] != "0000000000000000" {
		t.Errorf("the runner itself holds capabilities: %s", rst["CapEff"])
	}
	// The bounding set is exactly NET_ADMIN (bit 12), for the runner and
	// QEMU alike: what the docs say this mode costs, and no more.
	const netAdminOnly = "0000000000001000"
	if rst["CapBnd"] != netAdminOnly || st["CapBnd"] != netAdminOnly {
		t.Errorf("tap mode: CapBnd runner %s, QEMU %s; want %s (NET_ADMIN alone)", rst["CapBnd"], st["CapBnd"], netAdminOnly)
	}
}

func TestTapModeWithoutCapability(t *testing.T) {
	v := newVM(t)
	v.runNoNNP([]string{"-v", "/dev/net/tun:/dev/net/tun"}, "ACCEL=tcg", "DISK_SIZE=1G", "NET_MODE=tap", "TUN_DEVICE=/dev/net/tun")
	if code := v.waitExit(30 * time.Second); code != 8 {
		t.Fatalf("exit %d, want 8 (network unavailable)", code)
	}
	contains(t, "runner log", v.logs(), "NET_MODE=tap needs CAP_NET_ADMIN", "--cap-add NET_ADMIN")
}
