package swarm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/api/types/swarm"
	"go.yaml.in/yaml/v3"

	"github.com/swarmvm/swarmvm/internal/config"
)

// Where the broker's folder appears inside the container, and the health
// check: Swarm holds a task in "starting" until its first healthy check, so
// the first check's time sets how soon a VM counts as running. Engines with
// API 1.44 or later check every healthStartInterval until then (and every
// healthInterval after); older ones ignore it and check first after
// healthInterval. A check costs about 0.3 s of CPU on the node (BenchmarkHealthCheck),
// so healthInterval stays long; the start interval costs only while the
// VM starts (a runner waiting for a held disk passes the check, see
// swarmvm health --liveness).
const (
	containerBroker     = config.BrokerDir
	runTmpfsBytes       = 16 << 20
	healthInterval      = 10 * time.Second
	healthStartInterval = time.Second
	healthTimeout       = 5 * time.Second
	healthStart         = 60 * time.Second
	healthRetries       = 3
	restartDelay        = 10 * time.Second
	restartAttempts     = 5
	restartWindow       = 2 * time.Minute
	placementCapable    = "node.labels." + NodeLabel + "==true"
	placementKVM        = "node.labels." + AccelLabel + "!=" + config.AccelTCG
)

// ServiceSpec renders one VM as a Swarm service. It is pure and
// deterministic: the same VM gives the same spec, so a redeploy changes
// nothing that did not change.
func ServiceSpec(r Resolved) swarm.ServiceSpec {
	replicas := uint64(1)
	grace := r.StopGrace
	init := false
	delay, window := restartDelay, restartWindow
	attempts := uint64(restartAttempts)
	labels := map[string]string{LabelVM: r.Name, LabelStorage: r.StorageMode}
	if r.Home != "" {
		labels[LabelHome] = r.Home
	}
	if r.MetricsPort != 0 {
		labels[LabelMetricsPort] = strconv.Itoa(r.MetricsPort)
	}
	// The service's own labels also say that its runner hands the guest
	// over (container labels are the task's: a change would replace it).
	svcLabels := maps.Clone(labels)
	if HandsOver(r) {
		svcLabels[LabelHandOff] = HandOffVersion
	}
	return swarm.ServiceSpec{
		Annotations: swarm.Annotations{Name: r.Name, Labels: svcLabels},
		TaskTemplate: swarm.TaskSpec{
			ContainerSpec: &swarm.ContainerSpec{
				Image: r.Image, Labels: labels, Hostname: r.Name, Env: envList(r.RunnerEnv()), User: fmt.Sprintf("%d:%d", r.UID, RunnerGID),
				Privileges:      &swarm.Privileges{NoNewPrivileges: !r.TAP},
				Init:            &init,
				StopSignal:      "SIGTERM",
				ReadOnly:        true,
				Mounts:          mounts(r),
				StopGracePeriod: &grace,
				Healthcheck: &container.HealthConfig{
					Test: []string{"CMD", "swarmvm", "health", "--liveness", "--json"}, Interval: healthInterval,
					Timeout: healthTimeout, StartPeriod: healthStart, StartInterval: healthStartInterval, Retries: healthRetries,
				},
				CapabilityDrop: []string{"ALL"},
				CapabilityAdd:  capAdd(r),
				Sysctls:        sysctls(r),
				Secrets:        secrets(r),
			},
			Resources: &swarm.ResourceRequirements{
				Limits:       &swarm.Limit{NanoCPUs: r.LimitNanoCPUs, MemoryBytes: r.LimitBytes},
				Reservations: &swarm.Resources{NanoCPUs: r.ReserveNanoCPUs, MemoryBytes: r.ReserveBytes},
			},
			RestartPolicy: &swarm.RestartPolicy{Condition: swarm.RestartPolicyConditionOnFailure, Delay: &delay, MaxAttempts: &attempts, Window: &window},
			Placement:     &swarm.Placement{Constraints: constraints(r), MaxReplicas: 1},
		},
		Mode:           swarm.ServiceMode{Replicated: &swarm.ReplicatedService{Replicas: &replicas}},
		EndpointSpec:   endpoint(r),
		UpdateConfig:   &swarm.UpdateConfig{Parallelism: 1, Order: swarm.UpdateOrderStopFirst, FailureAction: swarm.UpdateFailureActionPause},
		RollbackConfig: &swarm.UpdateConfig{Parallelism: 1, Order: swarm.UpdateOrderStopFirst},
	}
}

// LabelHandOff, on a VM's service, says its runner hands the running guest
// over to the next task (HandOffVersion: the control op migrate); a
// service without it (an earlier swarmvm's) is updated stop-first.
const (
	LabelHandOff   = "io.swarmvm.handoff"
	HandOffVersion = "1"
)

// HandsOver says whether the VM's running guest can be handed over to a
// new task, live, on the same node (the runner's hand-off), when an update
// allows it (HandOff). It needs the new task to land where the guest runs
// (a local VM, pinned to its home) and to be able to run beside the old one
// there: no port published in host mode (one task per node may hold it),
// no TPM (swtpm's state does not move yet), no TAP from the broker (one
// per VM on a node).
func HandsOver(r Resolved) bool {
	return r.Home != "" && r.Env["TPM"] != "on" && r.NetMode != config.NetBridge &&
		r.ConsolePort == 0 && r.MetricsPort == 0 && r.ExportPort == 0 && (len(r.Ports) == 0 || r.PublishMode != "host")
}

// HandOff says whether the update of a VM's service from running to next
// hands the guest over: the VM can (HandsOver), the running task's runner
// can (its service is labelled so), and the update changes nothing of the
// VM's QEMU — only the runner's image. A migration needs the same QEMU on
// both sides: a change of memory, CPUs, disks, networking or the
// cloud-init seed takes a reboot, so such an update stays stop-first.
func HandOff(r Resolved, running, next swarm.ServiceSpec) bool {
	return HandsOver(r) && running.Labels[LabelHandOff] == HandOffVersion && sameButImage(running.TaskTemplate, next.TaskTemplate)
}

// sameButImage compares what of a task's spec makes its QEMU: the
// environment, mounts, secrets, resources, capabilities and placement.
func sameButImage(a, b swarm.TaskSpec) bool {
	ca, cb := a.ContainerSpec, b.ContainerSpec
	if ca == nil || cb == nil {
		return false
	}
	key := func(t swarm.TaskSpec) string {
		c := t.ContainerSpec
		env := slices.Sorted(slices.Values(c.Env))
		var mounts, secrets []string
		for _, m := range c.Mounts {
			mounts = append(mounts, fmt.Sprintf("%s:%s:%s:%v", m.Type, m.Source, m.Target, m.ReadOnly))
		}
		for _, s := range c.Secrets {
			secrets = append(secrets, s.SecretName)
		}
		var lim, res [2]int64
		if t.Resources != nil && t.Resources.Limits != nil {
			lim = [2]int64{t.Resources.Limits.NanoCPUs, t.Resources.Limits.MemoryBytes}
		}
		if t.Resources != nil && t.Resources.Reservations != nil {
			res = [2]int64{t.Resources.Reservations.NanoCPUs, t.Resources.Reservations.MemoryBytes}
		}
		var cons []string
		if t.Placement != nil {
			cons = t.Placement.Constraints
		}
		return fmt.Sprint(env, slices.Sorted(slices.Values(mounts)), slices.Sorted(slices.Values(secrets)), lim, res,
			slices.Sorted(slices.Values(c.CapabilityAdd)), c.Sysctls, c.User, c.Hostname, slices.Sorted(slices.Values(cons)))
	}
	return key(a) == key(b)
}

// WithHandOff makes spec's update hand the guest over: start-first (the
// new task beside the old one on its node, so no cap of one task a node),
// and a failure (the new task ends; the guest runs on in the old one)
// rolls the service back to the spec that runs.
func WithHandOff(spec swarm.ServiceSpec) swarm.ServiceSpec {
	spec.UpdateConfig = &swarm.UpdateConfig{Parallelism: 1, Order: swarm.UpdateOrderStartFirst, FailureAction: swarm.UpdateFailureActionRollback}
	spec.RollbackConfig = &swarm.UpdateConfig{Parallelism: 1, Order: swarm.UpdateOrderStartFirst}
	p := *spec.TaskTemplate.Placement
	p.MaxReplicas = 0
	spec.TaskTemplate.Placement = &p
	return spec
}

// endpoint publishes the forwarded ports under the same numbers, and the
// console's and the metrics' ports in host mode: each is the one VM's on
// one node, never balanced across the routing mesh.
func endpoint(r Resolved) *swarm.EndpointSpec {
	if len(r.Ports) == 0 && r.ConsolePort == 0 && r.MetricsPort == 0 && r.ExportPort == 0 {
		return nil
	}
	e := &swarm.EndpointSpec{Mode: swarm.ResolutionModeVIP}
	for _, p := range r.Ports {
		e.Ports = append(e.Ports, swarm.PortConfig{
			Protocol: network.IPProtocol(p.Proto), TargetPort: uint32(p.Host), PublishedPort: uint32(p.Host),
			PublishMode: swarm.PortConfigPublishMode(r.PublishMode),
		})
	}
	for _, port := range []int{r.ConsolePort, r.MetricsPort, r.ExportPort} {
		if port != 0 {
			e.Ports = append(e.Ports, swarm.PortConfig{
				Protocol: network.TCP, TargetPort: uint32(port), PublishedPort: uint32(port),
				PublishMode: swarm.PortConfigPublishModeHost,
			})
		}
	}
	return e
}

// StackConsoleSecret names the console key's secret in a rendered stack
// file, which the operator makes (deploy names its own after the key).
func StackConsoleSecret(vm string) string {
	h := sha256.Sum256([]byte("swarmvm-console/" + vm))
	return "swarmvm-console-" + hex.EncodeToString(h[:8])
}

// ConsoleKeyTarget is the console key's file in the task, readable by the
// VM's uid alone; the runner's CONSOLE_KEY_FILE default.
const ConsoleKeyTarget = "swarmvm-console"

// secrets hands the task its console key, when it has a console or exports, and its
// cloud-init seed's files: each readable by the VM's uid alone.
func secrets(r Resolved) []*swarm.SecretReference {
	var refs []*swarm.SecretReference
	add := func(name, target string) {
		refs = append(refs, &swarm.SecretReference{SecretName: name,
			File: &swarm.SecretReferenceFileTarget{Name: target, UID: fmt.Sprint(r.UID), GID: fmt.Sprint(RunnerGID), Mode: 0o400}})
	}
	if r.Keyed() {
		add(r.ConsoleSecret, ConsoleKeyTarget)
	}
	for _, f := range r.Seed {
		add(f.Secret, f.Target)
	}
	return refs
}

// sysctls lets QEMU, an unprivileged user, listen on a forwarded port below
// 1024 inside the container's own network namespace.
func sysctls(r Resolved) map[string]string {
	for _, p := range r.Ports {
		if p.Host < 1024 {
			return map[string]string{"net.ipv4.ip_unprivileged_port_start": "0"}
		}
	}
	return nil
}

func mounts(r Resolved) []mount.Mount {
	m := []mount.Mount{
		{Type: mount.TypeTmpfs, Target: "/run", TmpfsOptions: &mount.TmpfsOptions{SizeBytes: runTmpfsBytes}},
		{Type: mount.TypeBind, Source: r.BrokerDir, Target: containerBroker, ReadOnly: true},
		{Type: mount.TypeBind, Source: r.Storage, Target: r.Storage},
	}
	if r.BackupRepo != "" {
		m = append(m, mount.Mount{Type: mount.TypeBind, Source: r.BackupRepo, Target: r.BackupRepo})
	}
	if r.TAP {
		// Docker's default device rules allow the TUN device (c 10:200).
		m = append(m, mount.Mount{Type: mount.TypeBind, Source: "/dev/net/tun", Target: "/dev/net/tun"})
	}
	return m
}

// capAdd is what the VM's networking mode needs (config.NetCapAdd).
func capAdd(r Resolved) []string { return config.NetCapAdd(r.NetMode) }

func constraints(r Resolved) []string {
	c := append([]string{placementCapable}, r.Constraints...)
	if r.Accel == config.AccelKVM { // not on a node labelled for TCG only
		c = append(c, placementKVM)
	}
	if r.Home != "" {
		c = append(c, homeConstraint(r.Home))
	}
	sort.Strings(c[1:])
	return c
}

// homeConstraint pins a local VM to its home: by ID, which a reinstalled
// node does not inherit, or by hostname where node: names one.
func homeConstraint(home string) string {
	if nodeIDRE.MatchString(home) {
		return "node.id==" + home
	}
	return "node.hostname==" + home
}

// nodeIDRE matches Swarm's node IDs (25 lower-case letters and digits).
var nodeIDRE = regexp.MustCompile(`^[a-z0-9]{25}$`)

func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// The stack file, in compose format 3.9, written with only keys that
// `docker stack deploy` honours: no devices, security_opt, privileged or
// service-level tmpfs, which it drops (with or without a warning).
type stackFile struct {
	Version  string                   `yaml:"version"`
	Services map[string]stackService  `yaml:"services"`
	Secrets  map[string]stackExternal `yaml:"secrets,omitempty"`
}

// stackExternal is a secret the stack uses and does not make.
type stackExternal struct {
	External bool `yaml:"external"`
}

type stackSecret struct {
	Source string `yaml:"source"`
	Target string `yaml:"target"`
	UID    quoted `yaml:"uid"`
	GID    quoted `yaml:"gid"`
	Mode   uint32 `yaml:"mode"`
}

type stackService struct {
	Image           string            `yaml:"image"`
	Hostname        string            `yaml:"hostname"`
	User            quoted            `yaml:"user"`
	ReadOnly        bool              `yaml:"read_only"`
	CapDrop         []string          `yaml:"cap_drop"`
	CapAdd          []string          `yaml:"cap_add,omitempty"`
	Init            bool              `yaml:"init"`
	StopSignal      string            `yaml:"stop_signal"`
	StopGracePeriod string            `yaml:"stop_grace_period"`
	Environment     map[string]string `yaml:"environment"`
	Labels          map[string]string `yaml:"labels"`
	Volumes         []stackVolume     `yaml:"volumes"`
	Sysctls         map[string]string `yaml:"sysctls,omitempty"`
	Ports           []stackPort       `yaml:"ports,omitempty"`
	Secrets         []stackSecret     `yaml:"secrets,omitempty"`
	Healthcheck     stackHealth       `yaml:"healthcheck"`
	Deploy          stackDeploy       `yaml:"deploy"`
}

type stackVolume struct {
	Type     string      `yaml:"type"`
	Source   string      `yaml:"source,omitempty"`
	Target   string      `yaml:"target"`
	ReadOnly bool        `yaml:"read_only,omitempty"`
	Tmpfs    *stackTmpfs `yaml:"tmpfs,omitempty"`
}

type stackPort struct {
	Target    uint32 `yaml:"target"`
	Published uint32 `yaml:"published"`
	Protocol  string `yaml:"protocol"`
	Mode      string `yaml:"mode"`
}

type stackTmpfs struct {
	Size int64 `yaml:"size"`
}

type stackHealth struct {
	Test        []string `yaml:"test"`
	Interval    string   `yaml:"interval"`
	Timeout     string   `yaml:"timeout"`
	Retries     int      `yaml:"retries"`
	StartPeriod string   `yaml:"start_period"`
}

type stackDeploy struct {
	Mode           string            `yaml:"mode"`
	Replicas       int               `yaml:"replicas"`
	Labels         map[string]string `yaml:"labels"`
	Placement      stackPlacement    `yaml:"placement"`
	Resources      stackResources    `yaml:"resources"`
	RestartPolicy  stackRestart      `yaml:"restart_policy"`
	UpdateConfig   stackUpdate       `yaml:"update_config"`
	RollbackConfig stackUpdate       `yaml:"rollback_config"`
}

type stackPlacement struct {
	Constraints        []string `yaml:"constraints"`
	MaxReplicasPerNode int      `yaml:"max_replicas_per_node,omitempty"`
}

type stackResources struct {
	Limits       stackLimit `yaml:"limits"`
	Reservations stackLimit `yaml:"reservations"`
}

type stackLimit struct {
	CPUs   string `yaml:"cpus"`
	Memory string `yaml:"memory"`
}

type stackRestart struct {
	Condition   string `yaml:"condition"`
	Delay       string `yaml:"delay"`
	MaxAttempts int    `yaml:"max_attempts"`
	Window      string `yaml:"window"`
}

type stackUpdate struct {
	Parallelism   int    `yaml:"parallelism"`
	Order         string `yaml:"order"`
	FailureAction string `yaml:"failure_action,omitempty"`
}

// Stack renders VMs as one stack file. It is built from the same service
// specs that deploy sends, so the two cannot drift apart; YAML maps are
// written in key order, so the output is deterministic.
func Stack(rs []Resolved) ([]byte, error) {
	f := stackFile{Version: "3.9", Services: map[string]stackService{}}
	var homeless []error
	for i, r := range rs {
		if r.StorageMode == config.StorageLocal && r.Home == "" {
			homeless = append(homeless, &FieldError{fmt.Sprintf("vms[%d] (%s).node", i, r.Name),
				"a VM on local storage needs its home node in a stack file, or Swarm may start it on a node without its disk: set node: (or --node), or storage_mode: shared; swarmvm deploy picks and records a home itself"})
		}
	}
	if err := errors.Join(homeless...); err != nil {
		return nil, err
	}
	var b strings.Builder
	b.WriteString("# swarmvm stack: deploy with `docker stack deploy -c <this file> <stack>`.\n")
	b.WriteString("# Nodes must carry the label vm-capable=true (swarmvm node label <node>).\n")
	for _, r := range rs {
		if r.Keyed() && r.ConsoleSecret == "" {
			r.ConsoleSecret = StackConsoleSecret(r.Name)
			if f.Secrets == nil {
				f.Secrets = map[string]stackExternal{}
			}
			f.Secrets[r.ConsoleSecret] = stackExternal{External: true}
			fmt.Fprintf(&b, "# %s's console key, made first where swarmvm console will run:\n", r.Name)
			fmt.Fprintf(&b, "#   (umask 077; mkdir -p ~/.config/swarmvm/console; head -c 32 /dev/urandom > ~/.config/swarmvm/console/%s.key)\n", r.Name)
			fmt.Fprintf(&b, "#   docker secret create %s ~/.config/swarmvm/console/%s.key\n", r.ConsoleSecret, r.Name)
		}
		if len(r.Seed) > 0 {
			fmt.Fprintf(&b, "# %s's files, as secrets made first:\n", r.Name)
		}
		for _, sf := range r.Seed {
			if sf.Secret == "" {
				return nil, fmt.Errorf("%s: cloud_init %s not read (LoadSeed)", r.Name, sf.Path)
			}
			if f.Secrets == nil {
				f.Secrets = map[string]stackExternal{}
			}
			f.Secrets[sf.Secret] = stackExternal{External: true}
			if sf.Existing {
				fmt.Fprintf(&b, "#   (the secret %s exists: %s)\n", sf.Secret, sf.Target)
				continue
			}
			fmt.Fprintf(&b, "#   docker secret create %s %s   (%s)\n", sf.Secret, sf.Path, sf.Target)
		}
		f.Services[r.Name] = stackServiceOf(ServiceSpec(r))
	}
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(f); err != nil {
		return nil, err
	}
	enc.Close()
	return []byte(b.String()), nil
}

func stackServiceOf(s swarm.ServiceSpec) stackService {
	c := s.TaskTemplate.ContainerSpec
	t := s.TaskTemplate
	env := envMap(c.Env)
	var vols []stackVolume
	for _, m := range c.Mounts {
		v := stackVolume{Type: string(m.Type), Source: m.Source, Target: m.Target, ReadOnly: m.ReadOnly}
		if m.TmpfsOptions != nil {
			v.Tmpfs = &stackTmpfs{Size: m.TmpfsOptions.SizeBytes}
		}
		vols = append(vols, v)
	}
	var ports []stackPort
	if s.EndpointSpec != nil {
		for _, p := range s.EndpointSpec.Ports {
			ports = append(ports, stackPort{Target: p.TargetPort, Published: p.PublishedPort, Protocol: string(p.Protocol), Mode: string(p.PublishMode)})
		}
	}
	var secs []stackSecret
	for _, sr := range c.Secrets {
		secs = append(secs, stackSecret{Source: sr.SecretName, Target: sr.File.Name, UID: quoted(sr.File.UID), GID: quoted(sr.File.GID), Mode: uint32(sr.File.Mode)})
	}
	h := c.Healthcheck
	rp := t.RestartPolicy
	return stackService{
		Image: c.Image, Hostname: c.Hostname, User: quoted(c.User), ReadOnly: c.ReadOnly, CapDrop: c.CapabilityDrop, CapAdd: c.CapabilityAdd,
		Init: *c.Init, StopSignal: c.StopSignal, StopGracePeriod: dur(*c.StopGracePeriod),
		Environment: env, Labels: c.Labels, Volumes: vols, Sysctls: c.Sysctls, Ports: ports, Secrets: secs,
		Healthcheck: stackHealth{Test: h.Test, Interval: dur(h.Interval), Timeout: dur(h.Timeout), Retries: h.Retries, StartPeriod: dur(h.StartPeriod)},
		Deploy: stackDeploy{
			Mode: "replicated", Replicas: int(*s.Mode.Replicated.Replicas), Labels: s.Labels,
			Placement: stackPlacement{Constraints: t.Placement.Constraints, MaxReplicasPerNode: int(t.Placement.MaxReplicas)},
			Resources: stackResources{
				Limits:       stackLimit{CPUs: cpus(t.Resources.Limits.NanoCPUs), Memory: bytesM(t.Resources.Limits.MemoryBytes)},
				Reservations: stackLimit{CPUs: cpus(t.Resources.Reservations.NanoCPUs), Memory: bytesM(t.Resources.Reservations.MemoryBytes)},
			},
			RestartPolicy:  stackRestart{Condition: string(rp.Condition), Delay: dur(*rp.Delay), MaxAttempts: int(*rp.MaxAttempts), Window: dur(*rp.Window)},
			UpdateConfig:   stackUpdate{Parallelism: int(s.UpdateConfig.Parallelism), Order: string(s.UpdateConfig.Order), FailureAction: string(s.UpdateConfig.FailureAction)},
			RollbackConfig: stackUpdate{Parallelism: int(s.RollbackConfig.Parallelism), Order: string(s.RollbackConfig.Order)},
		},
	}
}

func dur(d time.Duration) string {
	if d%time.Minute == 0 {
		return fmt.Sprintf("%dm", d/time.Minute)
	}
	return fmt.Sprintf("%ds", d/time.Second)
}

func cpus(nano int64) string { return strconv.FormatFloat(float64(nano)/1e9, 'f', -1, 64) }

func bytesM(b int64) string { return fmt.Sprintf("%dM", b>>20) }

// quoted is a string written in double quotes: "10001:10001" unquoted is a
// base-60 number to a YAML 1.1 reader.
type quoted string

func (q quoted) MarshalYAML() (any, error) {
	return &yaml.Node{Kind: yaml.ScalarNode, Style: yaml.DoubleQuotedStyle, Value: string(q)}, nil
}
