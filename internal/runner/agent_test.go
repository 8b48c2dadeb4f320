package runner

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/status"
)

// scriptedAgent answers on a unix socket as qemu-ga does, for as long as
// it is not closed: the channel's other end, which QEMU makes from the
// guest's port. (The real agent, in a real guest, is in test/e2e.)
func scriptedAgent(t *testing.T, path string) net.Listener {
	return scriptedAgentSaw(t, path, nil)
}

// freezeFails makes the scripted agent's freezes fail.
var freezeFails atomic.Bool

// scriptedAgentSaw is scriptedAgent, sending saw each command it gets.
func scriptedAgentSaw(t *testing.T, path string, saw chan<- map[string]any) net.Listener {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return
					}
					var cmd struct {
						Execute   string         `json:"execute"`
						Arguments map[string]any `json:"arguments"`
					}
					if json.Unmarshal(bytes.TrimLeft(line, "\xff"), &cmd) != nil {
						continue
					}
					if saw != nil {
						select {
						case saw <- map[string]any{"execute": cmd.Execute, "arguments": cmd.Arguments}:
						default:
						}
					}
					var reply string
					switch cmd.Execute {
					case "guest-sync-delimited":
						id, _ := json.Marshal(cmd.Arguments["id"])
						reply = "\xff" + `{"return": ` + string(id) + `}`
					case "guest-get-osinfo":
						reply = `{"return": {"id": "debian", "name": "Debian GNU/Linux", "pretty-name": "Debian GNU/Linux 13 (trixie)\n"}}`
					case "guest-get-fsinfo":
						reply = `{"return": [{"name": "vda1", "mountpoint": "/", "type": "ext4", "used-bytes": 1000, "total-bytes": 4000, "disk": []},
							{"name": "vda1", "mountpoint": "/", "type": "ext4", "used-bytes": 1000, "total-bytes": 4000, "disk": []},
							{"name": "sr0", "mountpoint": "/media", "type": "iso9660", "disk": []}]}`
					case "guest-network-get-interfaces":
						reply = `{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
							{"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}]}`
					case "guest-set-time":
						reply = `{"return": {}}`
					case "guest-fsfreeze-freeze":
						reply = `{"return": 2}`
						if freezeFails.Load() {
							reply = `{"error": {"class": "GenericError", "desc": "failed to freeze /data: Device or resource busy"}}`
						}
					case "guest-fsfreeze-thaw":
						reply = `{"return": 2}`
					default:
						reply = `{"error": {"class": "CommandNotFound", "desc": "no"}}`
					}
					c.Write([]byte(strings.ReplaceAll(reply, "\n\t\t\t\t\t\t\t", "") + "\n"))
				}
			}()
		}
	}()
	return l
}

// The runner's watch of the agent: once it answers, agent.json (what the
// health check reports) has the guest's OS, on one line, and its address
// without loopback's, and the log states it once with status keys; when
// the agent goes, the log says so and the file says "not answering"; stop
// removes the file.
func TestAgentWatch(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "qga.sock")
	l := scriptedAgent(t, sock)
	var mu sync.Mutex
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&lockedWriter{&mu, &logs}, nil))
	a := watchAgentEvery(sock, dir, log, 100*time.Millisecond)
	defer a.stop()
	waitAgent := func(state string) *status.Agent {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if s := readAgent(dir); s != nil && s.State == state {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("agent.json never said %q: %+v", state, readAgent(dir))
			}
		}
	}
	s := waitAgent(status.AgentAnswering)
	if !s.Answered || time.Since(s.Since) > 10*time.Second {
		t.Errorf("agent.json: answered %v since %v", s.Answered, s.Since)
	}
	if s.OS != "Debian GNU/Linux 13 (trixie) " || strings.Join(s.Addresses, " ") != "10.0.2.15" {
		t.Errorf("agent.json: %+v", s)
	}
	time.Sleep(300 * time.Millisecond) // polls that change nothing say nothing
	mu.Lock()
	said := logs.String()
	mu.Unlock()
	if n := strings.Count(said, "event="+status.AgentAnswered); n != 1 ||
		!strings.Contains(said, `guest_os="Debian GNU/Linux 13 (trixie) " addresses=10.0.2.15`) {
		t.Errorf("%d lines with event=%s in:\n%s", n, status.AgentAnswered, said)
	}
	if !a.answering() {
		t.Error("answering() is false while the agent answers")
	}
	// the filesystems with a size (the metrics drop the repeated mount)
	if fs := a.filesystems(); len(fs) != 2 || fs[0].Mountpoint != "/" || *fs[0].TotalBytes != 4000 {
		t.Errorf("filesystems %+v", fs)
	}

	l.Close() // the agent's connection stays: the watch must notice it gone
	a.mu.Lock()
	if a.c != nil {
		a.c.Close()
	}
	a.mu.Unlock()
	if s := waitAgent(status.AgentSilent); !s.Answered {
		t.Error("agent.json forgot that the agent answered once")
	}
	if fs := a.filesystems(); fs != nil {
		t.Errorf("filesystems kept from an agent that no longer answers: %+v", fs)
	}
	mu.Lock()
	said = logs.String()
	mu.Unlock()
	if !strings.Contains(said, "event="+status.AgentLost) {
		t.Errorf("no event=%s in:\n%s", status.AgentLost, said)
	}
	a.stop()
	if readAgent(dir) != nil {
		t.Error("agent.json is still there after stop")
	}
}

// After the VM resumes, the runner sets the guest's clock through the
// agent to the host's time (the agent gets guest-set-time with it, in
// nanoseconds), and says so.
func TestAgentSetsClock(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "qga.sock")
	saw := make(chan map[string]any, 64)
	scriptedAgentSaw(t, sock, saw)
	var mu sync.Mutex
	var logs bytes.Buffer
	a := watchAgentEvery(sock, dir, slog.New(slog.NewTextHandler(&lockedWriter{&mu, &logs}, nil)), time.Hour)
	defer a.stop()
	for deadline := time.Now().Add(10 * time.Second); !a.answering(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the agent never answered")
		}
	}
	before := time.Now()
	a.setClock("the VM resumed")
	for deadline := time.After(10 * time.Second); ; {
		select {
		case cmd := <-saw:
			if cmd["execute"] != "guest-set-time" {
				continue
			}
			ns, _ := cmd["arguments"].(map[string]any)["time"].(float64)
			if set := time.Unix(0, int64(ns)); set.Before(before.Add(-time.Second)) || set.After(time.Now().Add(time.Second)) {
				t.Errorf("guest-set-time with %v, want about %v", set, before)
			}
			for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				mu.Lock()
				said := logs.String()
				mu.Unlock()
				if strings.Contains(said, "the guest's clock set through its agent") {
					return
				}
				if time.Now().After(end) {
					t.Fatalf("log:\n%s", said)
				}
			}
		case <-deadline:
			t.Fatal("no guest-set-time within 10 s")
		}
	}
}

// A freeze is always undone: by its thaw, by its hard deadline when the
// caller never thaws, by the runner's stop, and at once when the freeze
// itself fails (the agent may have frozen some filesystems first).
func TestFreezeAlwaysThaws(t *testing.T) {
	start := func(t *testing.T) (*guestAgent, chan map[string]any) {
		dir := t.TempDir()
		sock := filepath.Join(dir, "qga.sock")
		saw := make(chan map[string]any, 64)
		scriptedAgentSaw(t, sock, saw)
		a := watchAgentEvery(sock, dir, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Hour)
		t.Cleanup(a.stop)
		return a, saw
	}
	// next is the next freeze or thaw the agent got, within d.
	next := func(t *testing.T, saw chan map[string]any, d time.Duration) string {
		t.Helper()
		for end := time.After(d); ; {
			select {
			case c := <-saw:
				if x := c["execute"].(string); strings.HasPrefix(x, "guest-fsfreeze-") {
					return x
				}
			case <-end:
				return "nothing"
			}
		}
	}
	ctx := func() context.Context {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		return c
	}
	t.Run("thaw", func(t *testing.T) {
		a, saw := start(t)
		thaw, n, err := a.freeze(ctx(), time.Minute)
		if err != nil || n != 2 || next(t, saw, 5*time.Second) != "guest-fsfreeze-freeze" {
			t.Fatalf("freeze: %d %v", n, err)
		}
		if _, _, err := a.freeze(ctx(), time.Minute); err == nil {
			t.Error("a second freeze while frozen was taken")
		}
		if err := thaw(); err != nil || next(t, saw, 5*time.Second) != "guest-fsfreeze-thaw" {
			t.Fatalf("thaw: %v", err)
		}
		if got := next(t, saw, 300*time.Millisecond); got != "nothing" {
			t.Errorf("after the thaw the agent got %s (the deadline's timer should be gone)", got)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		a, saw := start(t)
		began := time.Now()
		if _, _, err := a.freeze(ctx(), 300*time.Millisecond); err != nil || next(t, saw, 5*time.Second) != "guest-fsfreeze-freeze" {
			t.Fatal(err)
		}
		if got := next(t, saw, 5*time.Second); got != "guest-fsfreeze-thaw" {
			t.Fatalf("no thaw at the deadline: %s", got)
		}
		if took := time.Since(began); took < 300*time.Millisecond || took > 3*time.Second {
			t.Errorf("thawed after %v, want at the 300 ms deadline", took)
		}
	})
	t.Run("stop", func(t *testing.T) {
		a, saw := start(t)
		if _, _, err := a.freeze(ctx(), time.Hour); err != nil || next(t, saw, 5*time.Second) != "guest-fsfreeze-freeze" {
			t.Fatal(err)
		}
		a.stop()
		if got := next(t, saw, time.Second); got != "guest-fsfreeze-thaw" {
			t.Fatalf("stop did not thaw: %s", got)
		}
	})
	t.Run("failed freeze", func(t *testing.T) {
		freezeFails.Store(true)
		defer freezeFails.Store(false)
		a, saw := start(t)
		if _, _, err := a.freeze(ctx(), time.Hour); err == nil || !strings.Contains(err.Error(), "Device or resource busy") {
			t.Fatalf("freeze: %v, want the agent's error", err)
		}
		if got, then := next(t, saw, 5*time.Second), next(t, saw, 5*time.Second); got != "guest-fsfreeze-freeze" || then != "guest-fsfreeze-thaw" {
			t.Fatalf("after a failed freeze the agent got %s, then %s; want a thaw", got, then)
		}
	})
}

// HEALTH=agent: a VM is unhealthy only when its agent answered once and
// has been silent past the grace; an agent that never answered (none
// installed) and one silent for less (a reboot) leave it healthy.
func TestAgentSilentVerdict(t *testing.T) {
	dir := t.TempDir()
	put := func(a status.Agent) {
		b, _ := json.Marshal(a)
		os.WriteFile(agentFile(dir), b, 0o600)
	}
	long, short := time.Now().Add(-3*time.Minute), time.Now().Add(-10*time.Second)
	for _, c := range []struct {
		name      string
		a         status.Agent
		grace     time.Duration
		unhealthy bool
	}{
		{"silent past the grace", status.Agent{State: status.AgentSilent, Since: long, Answered: true}, 2 * time.Minute, true},
		{"HEALTH=qemu", status.Agent{State: status.AgentSilent, Since: long, Answered: true}, 0, false},
		{"silent within the grace", status.Agent{State: status.AgentSilent, Since: short, Answered: true}, 2 * time.Minute, false},
		{"never answered", status.Agent{State: status.AgentSilent, Since: long}, 2 * time.Minute, false},
		{"answering", status.Agent{State: status.AgentAnswering, Since: long, Answered: true}, 2 * time.Minute, false},
	} {
		put(c.a)
		err := agentSilent(dir, c.grace)
		if (err != nil) != c.unhealthy || (err != nil && !strings.Contains(err.Error(), "HEALTH=agent")) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}
