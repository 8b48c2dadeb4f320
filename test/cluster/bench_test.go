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
