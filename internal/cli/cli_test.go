package cli

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/swarmvm/swarmvm/internal/status"
)

func run(t *testing.T, vars map[string]string, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	e := &env{getenv: func(k string) string { return vars[k] }, stdout: &out, stderr: &errb}
	code := e.run(context.Background(), args)
	return out.String(), errb.String(), code
}

func TestRenderFromFileMatchesGolden(t *testing.T) {
	out, errs, code := run(t, nil, "render", "-f", "../../docs/vms.example.yaml")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	want, err := os.ReadFile("../swarm/testdata/example.stack.yml")
	if err != nil {
		t.Fatal(err)
	}
	if out != string(want) {
		t.Errorf("render -f differs from the swarm package's golden file")
	}
}

// --node-cpus caps the CPU limit the stack file asks of a node's engine.
func TestRenderNodeCPUs(t *testing.T) {
	out, errs, code := run(t, nil, "render", "--name", "web-1", "--cpus", "2", "--node", "n1", "--node-cpus", "2")
	if code != 0 || !strings.Contains(out, "limits:\n          cpus: \"2\"") {
		t.Errorf("exit %d %s\n%s", code, errs, out)
	}
}

func TestRenderFlags(t *testing.T) {
	out, errs, code := run(t, nil, "render", "--name", "web-1", "--cpus", "2", "--memory", "2G", "--env", "LOG_LEVEL=debug", "--node", "node-1")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{"web-1:", "VM_MEMORY: 2G", "LOG_LEVEL: debug", "memory: 2304M", `cpus: "3"`,
		"node.hostname==node-1", "HOME_NODE: node-1", "NODE_ID: '{{.Node.ID}}'", "STORAGE_MODE: local"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// Bad input exits 2 (configuration) with the field or variable named.
func TestUsageErrors(t *testing.T) {
	cases := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"render", "--name", "a", "--memory", "1G", "--reserve-memory", "4G"}, nil, "reserve_memory: 4G is above the memory limit"},
		{[]string{"render", "--name", "web_1"}, nil, "name: \"web_1\" is not a VM name: 1 to 63"},
		{[]string{"render", "-f", "../../docs/vms.example.yaml", "--name", "x"}, nil, "--name and --file"},
		{[]string{"render", "--name", "a", "--env", "NOPE"}, nil, "write KEY=VALUE"},
		{[]string{"render", "--name", "a", "--env", "VM_RAM=1G"}, nil, "env.VM_RAM: is not a variable the runner reads"},
		{[]string{"render", "--name", "a"}, nil, "vms[0] (a).node: a VM on local storage needs its home node in a stack file"},
		{[]string{"render", "--name", "a", "--storage-mode", "shared", "--node", "n1"}, nil, "node: \"n1\" pins a VM on shared storage"},
		{[]string{"render", "--name", "a", "--storage-mode", "nfs"}, nil, "storage_mode: \"nfs\" is not local or shared"},
		{[]string{"render", "--name", "a", "--node", "n1", "--cpus", "4", "--node-cpus", "2"}, nil, "4 vCPUs, but the largest vm-capable node (--node-cpus) has 2 CPUs"},
		{[]string{"frobnicate"}, nil, "unknown command"},
		{[]string{"broker", "--socket-mode", "rw"}, nil, "--socket-mode"},
		{[]string{"run"}, map[string]string{"VM_NAME": "a/b", "VM_CPUS": "0"}, `VM_CPUS: 0 is outside 1–255`},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, errs, code := run(t, tc.env, tc.args...)
			if code != 2 {
				t.Fatalf("exit %d, want 2; stderr:\n%s", code, errs)
			}
			if !strings.Contains(errs, tc.want) {
				t.Errorf("stderr lacks %q:\n%s", tc.want, errs)
			}
		})
	}
}

func TestRunConfigErrorsNameEveryVariable(t *testing.T) {
	_, errs, code := run(t, map[string]string{"VM_NAME": "a/b", "VM_CPUS": "0", "ACCEL": "hvf"}, "run")
	if code != 2 {
		t.Fatalf("exit %d", code)
	}
	for _, v := range []string{"VM_NAME:", "VM_CPUS:", "ACCEL:"} {
		if !strings.Contains(errs, v) {
			t.Errorf("stderr lacks %s:\n%s", v, errs)
		}
	}
}

// --json writes the status contract that ps reads from Docker's health log.
func TestHealthJSONWithoutVM(t *testing.T) {
	for _, args := range [][]string{{"health", "--json"}, {"health", "--json", "--liveness"}} {
		out, _, code := run(t, map[string]string{"RUN_DIR": t.TempDir()}, args...)
		h, ok := status.ParseHealth(out)
		if code == 0 || !ok || h.Healthy || h.State != status.StateStarting || !strings.Contains(h.Reason, "VM not started") {
			t.Errorf("%v: exit %d, %q", args, code, out)
		}
	}
}

func TestHealthWithoutVM(t *testing.T) {
	out, _, code := run(t, map[string]string{"RUN_DIR": t.TempDir()}, "health")
	if code == 0 || !strings.HasPrefix(out, "unhealthy: VM not started") {
		t.Fatalf("exit %d, %q", code, out)
	}
}
