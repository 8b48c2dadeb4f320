package cluster

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/swarm"
	"github.com/moby/moby/client"
)

// BenchmarkDeploy: `swarmvm deploy` → the task running, audited and its
// VM's start verified (under TCG, asked for by name), against the Swarm
// floor: a service of the same image whose entrypoint sleeps, with no
// health check, created → its task running. Alternating, on node 1
// (engine 26, API 1.45: health start_interval) and on node 2 (engine
// 20.10, API 1.41: none). It prints medians and the difference.
func BenchmarkDeploy(b *testing.B) {
	require(b)
	api, err := client.New(client.WithHost(dockerHost(manager)), client.WithAPIVersionNegotiation())
	if err != nil {
		b.Fatal(err)
	}
	const rounds = 3
	for i := 0; i < b.N; i++ {
		for _, n := range []int{1, 2} {
			label(b, n)
			version, _ := dk(b, n, "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})")
			var floor, dep []float64
			for r := 0; r < rounds; r++ {
				floor = append(floor, swarmFloor(b, api, n))
				name := fmt.Sprintf("bench-deploy-%d-%d", n, time.Now().UnixNano()%100000)
				began := time.Now()
				out := deploy(b, vmArgs(name, local)...)
				dep = append(dep, float64(time.Since(began).Milliseconds()))
				if !strings.Contains(out, "accelerator: TCG, asked for by name") || !strings.Contains(out, "running on node "+hostname(n)) {
					b.Fatalf("deploy did not verify the VM on %s:\n%s", hostname(n), out)
				}
				// The node has room for one such VM at a time.
				dk(b, manager, "service", "rm", name)
				waitNoQEMU(b, name, 3*time.Minute)
			}
			f, d := median(floor), median(dep)
			b.ReportMetric(d-f, fmt.Sprintf("node%d-added-ms", n))
			fmt.Printf("deploy on %s, engine %s, %d each (ms, median): swarmvm deploy %.0f, Swarm floor %.0f, deploy adds %.0f (%.1fx)\n",
				hostname(n), strings.TrimSpace(version), rounds, d, f, d-f, d/f)
		}
	}
}

// swarmFloor creates a service of the runner image that only sleeps (no
// health check) on node n and returns the ms until its task runs.
func swarmFloor(b *testing.B, api *client.Client, n int) float64 {
	ctx := context.Background()
	replicas := uint64(1)
	spec := swarm.ServiceSpec{
		Annotations: swarm.Annotations{Name: fmt.Sprintf("bench-floor-%d", time.Now().UnixNano()%100000)},
		TaskTemplate: swarm.TaskSpec{
			ContainerSpec: &swarm.ContainerSpec{Image: image, Command: []string{"sleep", "infinity"}, Healthcheck: &container.HealthConfig{Test: []string{"NONE"}}},
			Placement:     &swarm.Placement{Constraints: []string{"node.hostname==" + hostname(n)}},
		},
		Mode: swarm.ServiceMode{Replicated: &swarm.ReplicatedService{Replicas: &replicas}},
	}
	began := time.Now()
	res, err := api.ServiceCreate(ctx, client.ServiceCreateOptions{Spec: spec})
	if err != nil {
		b.Fatal(err)
	}
	defer api.ServiceRemove(ctx, res.ID, client.ServiceRemoveOptions{})
	for time.Since(began) < 2*time.Minute {
		ts, err := api.TaskList(ctx, client.TaskListOptions{Filters: make(client.Filters).Add("service", res.ID)})
		if err == nil && slices.ContainsFunc(ts.Items, func(t swarm.Task) bool { return t.Status.State == swarm.TaskStateRunning }) {
			return float64(time.Since(began).Milliseconds())
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Fatal("the floor service's task did not run")
	return 0
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkMigrate: swarmvm migrate of a 512 MiB guest on shared storage
// between the two workers, idle and rewriting 64 MiB of its memory without
// end: QEMU's measured downtime and migration time (as the receiving job
// reports them) beside migrate's wall time, which adds its three jobs and
// the service update; each VM goes there and back. Goal for the idle
// guest: QEMU's downtime at most 300 ms.
func BenchmarkMigrate(b *testing.B) {
	require(b)
	label(b, 1, 2, 3)
	for _, c := range []struct{ key, cmdline, want string }{
		{"idle", "swarmvm.tick=1", "SWARMVM-GUEST-TICK"},
		{"dirtying", "swarmvm.tick=1 swarmvm.dirty=64", "SWARMVM-GUEST-DIRTY 64MiB"},
	} {
		vm := uniq("bench-mig")
		args := vmArgs(vm, shared, "--storage-mode", "shared", "--constraint", "node.role==worker")
		for i, a := range args {
			if a == "256M" {
				args[i] = "512M"
			}
		}
		deploy(b, append(args, cmdline(c.cmdline)...)...)
		waitFile(b, serialLog(sharedStorage(), vm), c.want, 1, 3*time.Minute)
		time.Sleep(3 * time.Second)
		for round := 0; round < 2; round++ {
			to := 5 - nodeNumOf(b, newestTask(b, vm).node)
			began := time.Now()
			out, code := swarmvm(b, "migrate", vm, "--to", hostname(to))
			wall := time.Since(began)
			if code != 0 {
				b.Fatalf("migrate: exit %d\n%s", code, out)
			}
			line := ""
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, "received: QEMU's figures") {
					line = l
				}
			}
			var down, total, mib int
			fmt.Sscanf(line[strings.Index(line, "downtime"):], "downtime %d ms, migration %d ms, %d MiB", &down, &total, &mib)
			fmt.Printf("migrate, %s 512 MiB guest (TCG), to %s: QEMU's downtime %d ms (goal ≤ 300), migration %d ms, %d MiB; migrate's wall time %.1f s (%.0fx the migration)\n",
				c.key, hostname(to), down, total, mib, wall.Seconds(), wall.Seconds()*1000/float64(max(total, 1)))
			b.ReportMetric(float64(down), c.key+"-downtime-ms")
		}
	}
}

func nodeNumOf(b testing.TB, host string) int {
	var n int
	fmt.Sscanf(strings.TrimPrefix(host, "svmc-n"), "%d", &n)
	return n
}
