package runner

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/procfs"
)

// childrenScenario runs in a process of its own (the test binary with
// CHILDREN_UNDER_TEST set): the owner of children reaps every child of its
// process, which must not be the test's.
func childrenScenario() {
	var logs bytes.Buffer
	var mu sync.Mutex
	c := newChildren(slog.New(slog.NewTextHandler(&lockedWriter{&mu, &logs}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	r := map[string]any{}
	ctx := context.Background()
	code, err := c.run(ctx, "sh", []string{"-c", "exit 3"}, &bytes.Buffer{}, &bytes.Buffer{})
	r["exit3"] = fmt.Sprint(code, err)
	var out, errOut bytes.Buffer
	code, err = c.run(ctx, "sh", []string{"-c", "echo out; echo err >&2"}, &out, &errOut)
	r["output"] = fmt.Sprintf("%d %v %s %s", code, err, strings.TrimSpace(out.String()), strings.TrimSpace(errOut.String()))
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	began := time.Now()
	_, err = c.run(short, "sh", []string{"-c", "sleep 30 & sleep 30"}, &bytes.Buffer{}, &bytes.Buffer{})
	cancel()
	r["killed"] = fmt.Sprint(err)
	r["killed_within_5s"] = time.Since(began) < 5*time.Second
	pid, exited, err := c.start("/bin/sh", []string{"sh", "-c", "sleep 0.2 & exit 0"}, &os.ProcAttr{Files: []*os.File{nil, nil, nil}})
	ws := <-exited
	r["start"] = fmt.Sprint(pid > 1, err, ws.Exited(), ws.ExitStatus())
	var wg sync.WaitGroup
	codes := make([]int, 20)
	for i := range codes {
		wg.Go(func() { codes[i], _ = c.run(ctx, "true", nil, &bytes.Buffer{}, &bytes.Buffer{}) })
	}
	wg.Wait()
	r["parallel"] = fmt.Sprint(codes)
	time.Sleep(600 * time.Millisecond) // the orphan's sleep ends
	mu.Lock()
	r["orphan_reaped"] = strings.Contains(logs.String(), "reaped orphan")
	mu.Unlock()
	// No zombie is left: every child was reaped.
	zombies := len(procfs.Processes(func(s procfs.Stat) bool { return s.PPID == os.Getpid() && s.State == 'Z' }))
	r["zombies"] = zombies
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
	os.Exit(0)
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// The owner of children: a child's exit code and output come back, a child
// still running when its context ends is killed with its group, a child
// started directly gets its own status (and a real pid: the one kill(-1)
// once came from a released pid of -1), twenty at once each get theirs,
// and an orphan is reaped, with no zombie left.
func TestChildren(t *testing.T) {
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "CHILDREN_UNDER_TEST=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("scenario: %v %s", err, out)
	}
	var r map[string]any
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("scenario said %q", out)
	}
	want := map[string]any{
		"exit3": "3 <nil>", "output": "0 <nil> out err", "start": "true <nil> true 0",
		"parallel": "[0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0]", "killed_within_5s": true, "orphan_reaped": true, "zombies": float64(0),
	}
	for k, w := range want {
		if r[k] != w {
			t.Errorf("%s: %v, want %v", k, r[k], w)
		}
	}
	if !strings.Contains(fmt.Sprint(r["killed"]), "killed") {
		t.Errorf("a child past its context: %v, want it killed", r["killed"])
	}
	if pids, _ := exec.Command("pgrep", "-f", "^sleep 30$").Output(); len(pids) > 0 {
		t.Errorf("the killed child's group was not killed: sleep 30 still runs (%s)", pids)
		exec.Command("pkill", "-f", "^sleep 30$").Run()
	}
}
