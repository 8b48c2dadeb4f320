package swarm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"testing"

	swarmtypes "github.com/moby/moby/api/types/swarm"

	"github.com/swarmvm/swarmvm/internal/status"
)

// frame writes one multiplexed log frame, as the Engine sends them.
type frame struct {
	w      *bytes.Buffer
	stream byte
}

func (f frame) Write(p []byte) (int, error) {
	f.w.Write(binary.BigEndian.AppendUint32([]byte{f.stream, 0, 0, 0}, uint32(len(p))))
	return f.w.Write(p)
}

// countingReader counts what was read of it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += n
	return n, err
}

func (c *countingReader) Close() error { return nil }

// ps reads a task's log up to the runner's "VM running" line and no
// further: a month of log lines after it are never fetched.
func TestTaskAccelReadsOnlyTheStart(t *testing.T) {
	var stream bytes.Buffer
	w := frame{&stream, 2}
	for i := range 20000 {
		line := fmt.Sprintf("time=x level=INFO msg=\"line %d\" vm=a\n", i)
		switch i {
		case 30:
			line = fmt.Sprintf("time=x level=INFO msg=\"KVM verified\" vm=a %s=%s\n", status.Key, status.KVMVerified)
		case 31:
			line = fmt.Sprintf("time=x level=INFO msg=\"VM running\" vm=a %s=%s status=running accel=kvm\n", status.Key, status.VMRunning)
		}
		w.Write([]byte(line))
	}
	total := stream.Len()
	rc := &countingReader{r: &stream}
	running := status.Key + "=" + status.VMRunning
	lines, err := logUntil(rc, startLines, func(l string) bool { return bytes.Contains([]byte(l), []byte(running)) })
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 32 || accelVerdict(lines) != AccelKVM {
		t.Fatalf("read %d lines, verdict %q; want 32 and %q", len(lines), accelVerdict(lines), AccelKVM)
	}
	// The copy reads ahead a little (buffers), never the whole stream.
	if rc.n > 256<<10 || rc.n >= total {
		t.Errorf("read %d of %d bytes for 32 lines", rc.n, total)
	}
	// Without the line, the bound holds.
	var quiet bytes.Buffer
	qw := frame{&quiet, 1}
	for i := range 5000 {
		fmt.Fprintf(qw, "line %d\n", i)
	}
	if lines, _ := logUntil(io.NopCloser(&quiet), startLines, func(string) bool { return false }); len(lines) != startLines {
		t.Errorf("read %d lines, want the bound %d", len(lines), startLines)
	}
	t.Logf("read %d of %d bytes", rc.n, total)
}

// A task on another node shows what Swarm and its runner's log say: Swarm
// counts a task with a health check as running only once a check passed.
func TestRemoteHealth(t *testing.T) {
	task := func(s swarmtypes.TaskState) swarmtypes.Task {
		return swarmtypes.Task{Status: swarmtypes.TaskStatus{State: s}}
	}
	for _, c := range []struct {
		state   swarmtypes.TaskState
		waiting string
		want    string
	}{
		{swarmtypes.TaskStateRunning, "", "healthy"},
		{swarmtypes.TaskStateRunning, "waiting: disk held by another QEMU", "waiting: disk held by another QEMU"},
		{swarmtypes.TaskStateStarting, "", "starting"},
		{swarmtypes.TaskStatePending, "", "-"},
	} {
		if got := remoteHealth(task(c.state), c.waiting); got != c.want {
			t.Errorf("%s, waiting %q: %q, want %q", c.state, c.waiting, got, c.want)
		}
	}
}
