package swarm

import (
	"context"
	"fmt"
	"github.com/moby/moby/api/types/mount"
	"io"
	"strings"

	"github.com/moby/moby/client"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/nodecheck"
	"github.com/swarmvm/swarmvm/internal/preflight"
)

// ProbeOptions says what a VM-capable node must have.
type ProbeOptions struct {
	nodecheck.Options
	Image string
}

// Probe checks this node (the machine it runs on) for what VMs need
// (nodecheck.Probe) and, through its engine, for the runner image.
func (c *Client) Probe(ctx context.Context, o ProbeOptions) []preflight.Finding {
	return append(nodecheck.Probe(ctx, o.Options), c.probeImage(ctx, o.Image))
}

// ProbeNode probes another node from a short job there, as a VM's task
// sees the node: in the runner image (the job not starting says the image
// is missing), as the runner's user in its group, with the storage and
// broker folders mounted (a missing one rejects the job, naming it). The
// job's findings are written to progress; the error says whether any
// failed.
func (c *Client) ProbeNode(ctx context.Context, node string, o ProbeOptions, progress io.Writer) error {
	n, err := c.api.NodeInspect(ctx, node, client.NodeInspectOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %w", node, err)
	}
	args := []string{"node", "probe-here", "--storage", o.Storage, "--broker-dir", o.BrokerDir, "--accel", o.Accel}
	mounts := []mount.Mount{{Type: mount.TypeBind, Source: o.BrokerDir, Target: o.BrokerDir}}
	if o.SharedStorage != "" {
		args = append(args, "--shared-storage", o.SharedStorage)
		mounts = append(mounts, mount.Mount{Type: mount.TypeBind, Source: o.SharedStorage, Target: o.SharedStorage})
	}
	j := Job{Kind: "probe", VM: "node-probe", Node: n.Node.ID, Image: o.Image, User: fmt.Sprintf("%d:%d", config.RunnerUID, config.RunnerGID),
		Storage: o.Storage, Args: args, Mounts: mounts}
	return c.RunJob(ctx, j, progress)
}

func (c *Client) probeImage(ctx context.Context, image string) preflight.Finding {
	const name = "image"
	if _, err := c.api.ImageInspect(ctx, image); err != nil {
		return preflight.Finding{Name: name, Class: preflight.ClassQEMU, Symptom: "VM tasks will not start: image not on this node",
			Cause: fmt.Sprintf("%s: %v", image, err), Fix: "make image on this node, or docker pull it from your registry"}
	}
	return preflight.Finding{Name: name, Class: preflight.ClassQEMU, OK: true, Detail: image + " present"}
}

// Self is this engine's Swarm node ID.
func (c *Client) Self(ctx context.Context) (string, string, error) {
	info, err := c.api.Info(ctx, client.InfoOptions{})
	if err != nil {
		return "", "", err
	}
	if info.Info.Swarm.NodeID == "" {
		return "", "", fmt.Errorf("this engine is not in a swarm (docker swarm init, or join one)")
	}
	return info.Info.Swarm.NodeID, info.Info.Name, nil
}

// Label sets (on) or clears the vm-capable label on a node, by ID or
// hostname. A node labelled with tcgOnly is marked vm-accel=tcg too, so
// that only VMs asking for TCG go there; without it that mark is cleared.
func (c *Client) Label(ctx context.Context, node string, on, tcgOnly bool) (string, error) {
	n, err := c.api.NodeInspect(ctx, node, client.NodeInspectOptions{})
	if err != nil {
		return "", fmt.Errorf("node %s: %w", node, err)
	}
	spec := n.Node.Spec
	if spec.Labels == nil {
		spec.Labels = map[string]string{}
	}
	if on {
		spec.Labels[NodeLabel] = "true"
	} else {
		delete(spec.Labels, NodeLabel)
	}
	if on && tcgOnly {
		spec.Labels[AccelLabel] = config.AccelTCG
	} else {
		delete(spec.Labels, AccelLabel)
	}
	if _, err := c.api.NodeUpdate(ctx, n.Node.ID, client.NodeUpdateOptions{Version: n.Node.Version, Spec: spec}); err != nil {
		return "", fmt.Errorf("node update %s: %w", node, err)
	}
	return n.Node.Description.Hostname, nil
}

// Local reports whether the engine is reached through a unix socket, so
// is on this machine.
func (c *Client) Local() bool {
	return strings.HasPrefix(c.api.DaemonHost(), "unix://")
}

// IsSelf reports whether node (ID or hostname) is this engine's node
// and the engine is on this machine (reached through a unix socket). An
// engine reached over TCP or SSH is another machine's: what this one has
// says nothing of it, so its node counts as another.
func (c *Client) IsSelf(ctx context.Context, node string) (bool, error) {
	if !c.Local() {
		return false, nil
	}
	id, host, err := c.Self(ctx)
	if err != nil {
		return false, err
	}
	return node == id || strings.EqualFold(node, host) || strings.HasPrefix(id, node) && len(node) >= 6, nil
}
