// Package status is the contract between the runner and the programs that
// read it from outside its container. `deploy`, `ps` and `audit` read the
// runner's log through the Engine API and Swarm's health log through a
// container inspect; neither may depend on how a message is worded. So each
// fact the runner states has one name here: a log line carries it as the
// attribute Key (event=kvm-verified), with its details as attributes of
// their own, and `swarmvm health --json` writes a Health.
package status

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// Key is the log attribute that names the fact a line states.
const Key = "event"

// The facts the runner states in its log.
const (
	// KVMVerified: QEMU's query-kvm said enabled and present.
	KVMVerified = "kvm-verified"
	// VMRunning: QMP answered and the VM runs; AttrAccel says on what.
	VMRunning = "vm-running"
	// Exited: the runner's last line; AttrCode and AttrErr say why.
	Exited = "exit"
	// StateDiskHeld and StateFull (the health states below) start a wait,
	// and Resumed ends a pause on a full volume: ps reads a task's state
	// from them where it cannot see its container's health (another node).
	Resumed = "resumed"
	// AgentAnswered: the guest agent answered, first or after a silence,
	// or told something new; AttrGuestOS and AttrAddresses say what.
	// AgentLost: it stopped answering. ps reads a guest's addresses
	// from them where it cannot ask the health check (another node).
	AgentAnswered = "agent-answered"
	AgentLost     = "agent-lost"
	// BackupDone and BackupFailed: the runner served an online backup (a
	// scheduled one or a job's), or one failed; AttrBackup names it.
	BackupDone   = "backup-done"
	BackupFailed = "backup-failed"
	// ExportOpened and ExportClosed: a pull-mode export of the disk
	// (AttrBackup names it) opened, and closed (AttrWhy says why).
	ExportOpened = "export-opened"
	ExportClosed = "export-closed"
	// HandoffBegan, HandoffDone and HandoffFailed: the guest is handed
	// over, live, from the VM's task to its next one on the same node
	// (both runners say each; the failure's AttrErr or AttrWhy says why).
	HandoffBegan  = "handoff-began"
	HandoffDone   = "handoff-done"
	HandoffFailed = "handoff-failed"
)

// Attribute keys of those lines.
const (
	AttrAccel = "accel"
	AttrCode  = "code"
	AttrErr   = "err"
	// AttrGuestOS is the guest's OS as its agent names it; AttrAddresses
	// its addresses, separated by commas.
	AttrBackup    = "backup"
	AttrWhy       = "why"
	AttrGuestOS   = "guest_os"
	AttrAddresses = "addresses"
)

// Line is one log line of the runner, read back: the fact it states (""
// for none) and its attributes.
type Line struct {
	Event string
	Attrs map[string]string
}

// Parse reads a line written by slog's text handler, possibly behind a
// prefix such as `docker service logs` adds ("vm.1.x@node | "): key=value
// pairs, a value either bare or Go-quoted. Words without "=" are skipped.
func Parse(s string) Line {
	attrs := map[string]string{}
	for s != "" {
		s = strings.TrimLeft(s, " \t|")
		i := strings.IndexAny(s, "= \t")
		if i < 0 {
			break
		}
		if s[i] != '=' { // a word of the prefix
			s = s[i:]
			continue
		}
		key, rest := s[:i], s[i+1:]
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				break
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			j := strings.IndexAny(rest, " \t")
			if j < 0 {
				j = len(rest)
			}
			val, rest = rest[:j], rest[j:]
		}
		attrs[key] = val
		s = rest
	}
	return Line{Event: attrs[Key], Attrs: attrs}
}

// Find returns the last line of lines stating event.
func Find(lines []string, event string) (Line, bool) {
	for i := len(lines) - 1; i >= 0; i-- {
		if !strings.Contains(lines[i], Key+"="+event) {
			continue
		}
		if l := Parse(lines[i]); l.Event == event {
			return l, true
		}
	}
	return Line{}, false
}

// The states `swarmvm health` reports.
const (
	StateRunning  = "running"
	StateStarting = "starting"            // no QEMU yet: the runner prepares, or has stopped
	StateFull     = "paused-storage-full" // paused on a full storage volume; resumes by itself
	StateDiskHeld = "waiting-disk-held"   // shared storage: another QEMU holds the disk
	StatePanicked = "panicked"
	StateDown     = "down" // anything else: QEMU gone, QMP silent, KVM off, paused
)

// Health is what `swarmvm health --json` writes: one JSON object per line,
// the last output Docker keeps for a task.
type Health struct {
	Healthy bool   `json:"healthy"`
	State   string `json:"state"`
	Accel   string `json:"accel,omitempty"`
	Reason  string `json:"reason"`
	// Waiting is true in the two states a restart cannot help, which pass
	// the --liveness check while still unhealthy: StateFull, StateDiskHeld.
	Waiting bool `json:"waiting,omitempty"`
	// Agent is what the guest agent last said, for a VM with its channel
	// (GUEST_AGENT=on) once QEMU runs.
	Agent *Agent `json:"agent,omitempty"`
}

// Agent is the guest agent as the runner last found it.
type Agent struct {
	State     string   `json:"state"` // AgentAnswering or AgentSilent
	OS        string   `json:"os,omitempty"`
	Addresses []string `json:"addresses,omitempty"`
	// Since is when the agent took its State; Answered is true once it
	// has answered since the VM started.
	Since    time.Time `json:"since,omitzero"`
	Answered bool      `json:"answered,omitempty"`
}

// The guest agent's states.
const (
	AgentAnswering = "answering"
	AgentSilent    = "not answering" // not yet, or no longer
)

// ParseHealth reads a Health from a health check's output.
func ParseHealth(output string) (Health, bool) {
	var h Health
	err := json.Unmarshal([]byte(strings.TrimSpace(output)), &h)
	return h, err == nil && h.State != ""
}
