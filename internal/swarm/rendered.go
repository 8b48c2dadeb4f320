package swarm

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/swarm"
)

// rendered is a VM's service as render wrote it, read back: the one
// reader of what swarmvm keeps in a service (its labels, the runner's
// environment, its user and its storage mount). Everything that asks a
// running deployment about a VM asks through it.
type rendered struct {
	service *swarm.Service
	name    string // LabelVM
	home    string // LabelHome: the home node's ID; "" for shared storage
	image   string
	user    string // uid:gid
	uid     string
	storage string   // the storage folder, bind-mounted at its own path
	envList []string // the runner's environment as written
	env     map[string]string
}

// readRendered reads a service render wrote; ok is false for a service
// that is not a swarmvm VM's (a job on a VM's disk carries its name too).
func readRendered(s *swarm.Service) (rendered, bool) {
	if s == nil || s.Spec.Labels[LabelVM] == "" || s.Spec.Labels[LabelJob] != "" || s.Spec.TaskTemplate.ContainerSpec == nil {
		return rendered{}, false
	}
	cs := s.Spec.TaskTemplate.ContainerSpec
	r := rendered{service: s, name: s.Spec.Labels[LabelVM], home: s.Spec.Labels[LabelHome],
		image: cs.Image, user: cs.User, envList: cs.Env, env: envMap(cs.Env)}
	r.uid, _, _ = strings.Cut(cs.User, ":")
	for _, m := range cs.Mounts {
		if m.Type == mount.TypeBind && m.Target != containerBroker && m.Source != "/dev/net/tun" && m.Source != r.env["BACKUP_REPO"] {
			r.storage = m.Source
		}
	}
	return r, true
}

// vm reads the service of the VM called name, or says there is none.
func (c *Client) vm(ctx context.Context, name string) (rendered, error) {
	s, err := c.service(ctx, name)
	if err != nil {
		return rendered{}, err
	}
	r, ok := readRendered(s)
	if !ok {
		return rendered{}, fmt.Errorf("no swarmvm VM named %s (swarmvm ps)", name)
	}
	return r, nil
}

// envMap reads a KEY=value list (a service's or a container's).
func envMap(list []string) map[string]string {
	m := make(map[string]string, len(list))
	for _, kv := range list {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// consolePort is the VM's console port, 0 without a console.
func (r rendered) consolePort() int {
	n, _ := strconv.Atoi(r.env["CONSOLE_PORT"])
	return n
}

// withEnv is the runner's environment with key set to value.
func (r rendered) withEnv(key, value string) []string {
	out := make([]string, 0, len(r.envList)+1)
	for _, kv := range r.envList {
		if k, _, _ := strings.Cut(kv, "="); k != key {
			out = append(out, kv)
		}
	}
	return append(out, key+"="+value)
}
