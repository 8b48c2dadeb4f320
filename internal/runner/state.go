package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/procfs"
	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/status"
)

// state is what the runner leaves in RUN_DIR for `swarmvm health`, which
// runs as a separate process in the same container.
type state struct {
	PID          int       `json:"pid"`
	Name         string    `json:"name"`
	Accel        string    `json:"accel"`
	HealthSocket string    `json:"health_socket"`
	Started      time.Time `json:"started"`
	// Waiting, when set, says why there is no QEMU yet (a disk held by
	// another QEMU on shared storage); it wraps ErrDiskHeld in health.
	Waiting string `json:"waiting,omitempty"`
	// AgentGrace (HEALTH=agent) is how long a guest agent that answered
	// may be silent before the VM counts as unhealthy; 0: it never does.
	AgentGrace time.Duration `json:"agent_grace,omitempty"`
}

func writeState(path string, st state) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

var (
	errNotStarted = errors.New("VM not started (no state file yet: the runner is still preparing or has stopped)")
	errPanicked   = errors.New("the guest kernel panicked")
)

// Report is Health as the status contract states it (`swarmvm health
// --json`), for programs that read it from outside the container.
func Report(ctx context.Context, runDir string) status.Health {
	accel, msg, err := check(ctx, runDir)
	if err == nil {
		return status.Health{Healthy: true, State: status.StateRunning, Accel: accel, Reason: msg, Agent: readAgent(runDir)}
	}
	h := status.Health{State: status.StateDown, Reason: err.Error(), Agent: readAgent(runDir)}
	switch {
	case errors.Is(err, ErrStorageFull):
		h.State, h.Waiting = status.StateFull, true
	case errors.Is(err, ErrDiskHeld):
		h.State, h.Waiting = status.StateDiskHeld, true
	case errors.Is(err, errNotStarted):
		h.State = status.StateStarting
	case errors.Is(err, errPanicked):
		h.State = status.StatePanicked
	}
	return h
}

// Health reports whether the VM in runDir is healthy: QEMU alive, its
// health monitor answering, the VM running and, under kvm, KVM enabled.
// The string is a one-line reason either way.
func Health(ctx context.Context, runDir string) (string, error) {
	_, msg, err := check(ctx, runDir)
	return msg, err
}

// check is Health, with the accelerator the state file names.
func check(ctx context.Context, runDir string) (accel, msg string, err error) {
	b, err := os.ReadFile(filepath.Join(runDir, "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return "", "", errNotStarted
	}
	if err != nil {
		return "", "", fmt.Errorf("state file: %w", err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return "", "", fmt.Errorf("state file: %w", err)
	}
	if st.Waiting != "" {
		return "", "", fmt.Errorf("%w (waiting: %s)", ErrDiskHeld, strings.TrimPrefix(st.Waiting, ErrDiskHeld.Error()+": "))
	}
	if !procfs.Alive(st.PID) {
		return "", "", fmt.Errorf("QEMU (pid %d) is not running", st.PID)
	}
	c, err := qmp.Dial(ctx, st.HealthSocket)
	if err != nil {
		return "", "", fmt.Errorf("QMP does not answer: %w", err)
	}
	defer c.Close()
	qs, err := c.QueryStatus(ctx)
	if err != nil {
		return "", "", err
	}
	switch qs.Status {
	case "running":
	case "io-error":
		return "", "", ioError(ctx, c)
	case "guest-panicked":
		return "", "", fmt.Errorf("%w (pvpanic); the runner stops QEMU and exits %d", errPanicked, status.ExitPanicked)
	default:
		return "", "", fmt.Errorf("VM is %s, not running", qs.Status)
	}
	if err := agentSilent(runDir, st.AgentGrace); err != nil {
		return "", "", err
	}
	if st.Accel != config.AccelKVM {
		return st.Accel, fmt.Sprintf("VM %s running under %s", st.Name, st.Accel), nil
	}
	kvm, err := c.QueryKVM(ctx)
	if err != nil {
		return "", "", err
	}
	if !kvm.Enabled || !kvm.Present {
		return "", "", fmt.Errorf("KVM not in use (enabled=%v present=%v)", kvm.Enabled, kvm.Present)
	}
	return st.Accel, fmt.Sprintf("VM %s running, KVM enabled", st.Name), nil
}

// ioError says why a VM is paused on an I/O error, from its drives' I/O
// status. A full volume wraps ErrStorageFull.
func ioError(ctx context.Context, c *qmp.Client) error {
	blocks, err := c.QueryBlock(ctx)
	if err != nil {
		return fmt.Errorf("VM paused on a disk I/O error (query-block: %v)", err)
	}
	for _, b := range blocks {
		if b.IOStatus == "nospace" {
			return fmt.Errorf("%w: VM paused: a write to drive %s found no space left on the storage volume — free space there; the runner resumes the VM when %d MiB are free", ErrStorageFull, b.Device, ResumeFree>>20)
		}
	}
	for _, b := range blocks {
		if b.IOStatus == "failed" {
			return fmt.Errorf("VM paused on a disk I/O error on drive %s", b.Device)
		}
	}
	return errors.New("VM paused on a disk I/O error")
}

// agentSilent is the HEALTH=agent verdict: an error when the guest's agent
// answered once and has been silent for longer than grace (a guest that
// hangs while QEMU runs on); nil with grace 0.
func agentSilent(runDir string, grace time.Duration) error {
	if grace <= 0 {
		return nil
	}
	a := readAgent(runDir)
	if a == nil || !a.Answered || a.State == status.AgentAnswering {
		return nil
	}
	if silent := time.Since(a.Since); silent > grace {
		return fmt.Errorf("the guest agent has not answered for %s, past HEALTH_AGENT_GRACE %s (HEALTH=agent): the guest may hang", silent.Round(time.Second), grace)
	}
	return nil
}
