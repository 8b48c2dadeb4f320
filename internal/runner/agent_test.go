package runner

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/status"
)

// scriptedAgent answers on a unix socket as qemu-ga does, for as long as
// it is not closed: the channel's other end, which QEMU makes from the
// guest's port. (The real agent, in a real guest, is in test/e2e.)
func scriptedAgent(t *testing.T, path string) net.Listener {
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
					var reply string
					switch cmd.Execute {
					case "guest-sync-delimited":
						id, _ := json.Marshal(cmd.Arguments["id"])
						reply = "\xff" + `{"return": ` + string(id) + `}`
					case "guest-get-osinfo":
						reply = `{"return": {"id": "debian", "name": "Debian GNU/Linux", "pretty-name": "Debian GNU/Linux 13 (trixie)\n"}}`
					case "guest-network-get-interfaces":
						reply = `{"return": [{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
							{"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}]}`
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

	l.Close() // the agent's connection stays: the watch must notice it gone
	a.mu.Lock()
	if a.c != nil {
		a.c.Close()
	}
	a.mu.Unlock()
	waitAgent(status.AgentSilent)
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
