package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	vmstatus "github.com/swarmvm/swarmvm/internal/status"
)

// A hostile guest agent (the test guest's swarmvm.agent: random bytes, one
// line that never ends, or a port held open and never answered) leaves the
// runner healthy, answering its health check, bounded in memory, and its
// VM stopped cleanly through ACPI: for each, over several of the runner's
// polls of the agent, every health check answers "healthy" with the agent
// "not answering", the runner's peak RSS stays under 40 MiB, and docker
// stop ends with exit 0.
func TestHostileGuestAgent(t *testing.T) {
	// what the runner's debug log says of each: proof that it met the agent
	meets := map[string]string{
		"garbage": "qga: sync:",
		"endless": "qga: reply exceeds size limit",
		"silent":  "context deadline exceeded",
	}
	for _, kind := range []string{"garbage", "endless", "silent"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			v := newVM(t)
			v.run(nil, append(kernelEnv("swarmvm.agent="+kind), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M", "SHUTDOWN_TIMEOUT=30s", "LOG_LEVEL=debug")...)
			v.waitFor("the hostile agent", 180*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-AGENT "+kind+" /dev/vport") })
			runner, _ := v.qemuPID()
			checks := 0
			for end := time.Now().Add(35 * time.Second); time.Now().Before(end); time.Sleep(2 * time.Second) {
				began := time.Now()
				out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health", "--json").Output()
				took := time.Since(began)
				var h vmstatus.Health
				if err != nil || json.Unmarshal(out, &h) != nil || !h.Healthy {
					t.Fatalf("health check with a %s agent: %v %s", kind, err, out)
				}
				if h.Agent == nil || h.Agent.State != vmstatus.AgentSilent {
					t.Fatalf("health says the agent is %+v, want %q", h.Agent, vmstatus.AgentSilent)
				}
				if took > 4*time.Second {
					t.Errorf("a health check took %v", took)
				}
				checks++
			}
			hwm := status(t, runner).KiB("VmHWM")
			if hwm > 40<<10 {
				t.Errorf("the runner's peak RSS is %d KiB with a %s agent", hwm, kind)
			}
			logs := v.logs()
			if strings.Contains(logs, "event="+vmstatus.AgentAnswered) {
				t.Errorf("the runner took a %s agent for one that answers", kind)
			}
			if l, ok := findLog(logs, "guest agent not answering"); !ok || !strings.Contains(l.Attrs["err"], meets[kind]) {
				t.Errorf("the runner's log does not show it meeting the %s agent (%q): %v", kind, meets[kind], l.Attrs)
			} else {
				t.Logf("%s agent: the runner's last word on it: %s", kind, l.Attrs["err"])
			}
			code, took := v.stop(60 * time.Second)
			if code != 0 {
				t.Fatalf("exit %d after docker stop, want 0", code)
			}
			contains(t, "runner log", v.logs(), "guest powered off through ACPI; QEMU exited 0")
			t.Logf("%s agent: %d health checks healthy, the runner's peak RSS %d KiB, stop %v", kind, checks, hwm, took.Round(100*time.Millisecond))
		})
	}
}

// HEALTH=agent: while the guest's agent answers, the VM is healthy and the
// health report says the agent answers; once it has been silent past
// HEALTH_AGENT_GRACE (10 s here; the test guest's agent leaves its port 25 s
// after boot), the health check fails naming the agent, while QEMU runs on.
func TestHealthAgent(t *testing.T) {
	v := newVM(t)
	v.run(nil, append(kernelEnv("swarmvm.agent=answer:25"), "ACCEL=tcg", "BOOT_MODE=bios", "DISK_SIZE=1G", "VM_MEMORY=256M",
		"HEALTH=agent", "HEALTH_AGENT_GRACE=10s")...)
	health := func() (vmstatus.Health, error) {
		out, err := exec.Command("docker", "exec", v.name, "swarmvm", "health", "--json").Output()
		var h vmstatus.Health
		if jerr := json.Unmarshal(out, &h); jerr != nil {
			return h, fmt.Errorf("%v %s", jerr, out)
		}
		return h, err
	}
	v.waitFor("the agent answering in the health report", 120*time.Second, func() bool {
		h, err := health()
		return err == nil && h.Healthy && h.Agent != nil && h.Agent.State == vmstatus.AgentAnswering
	})
	v.waitFor("the test guest's agent leaving", 120*time.Second, func() bool { return strings.Contains(v.serial(), "SWARMVM-GUEST-AGENT-QUIT") })
	quit := time.Now()
	var h vmstatus.Health
	v.waitFor("the health check failing on the silent agent", 90*time.Second, func() bool {
		var err error
		h, err = health()
		return err != nil && !h.Healthy
	})
	took := time.Since(quit)
	contains(t, "health reason", h.Reason, "guest agent has not answered", "HEALTH=agent")
	if took < 10*time.Second {
		t.Errorf("unhealthy %v after the agent left, before the 10 s grace", took)
	}
	contains(t, "runner log", v.logs(), "event="+vmstatus.AgentAnswered, "event="+vmstatus.AgentLost)
	if !v.running() {
		t.Error("the runner ended; a silent agent is for Swarm's health check to judge")
	}
	t.Logf("unhealthy %v after the agent left: %s", took.Round(time.Second), h.Reason)
}
