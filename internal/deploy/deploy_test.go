package deploy

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
)

// VMs waited for together write at the same time; each one's lines still
// come out as one block, each line named, and a VM deployed alone writes
// as it goes.
func TestReportsKeptApart(t *testing.T) {
	var out bytes.Buffer
	shared := &lockedWriter{w: &out}
	var wg sync.WaitGroup
	for _, name := range []string{"a", "b", "c"} {
		rep := &report{name: name, out: shared}
		wg.Go(func() {
			for i := range 200 {
				fmt.Fprintf(rep, "task: step %d\n", i)
			}
			rep.printf("running on node n1")
			rep.flush()
		})
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 3*201 {
		t.Fatalf("%d lines, want %d", len(lines), 3*201)
	}
	for b := range 3 {
		block := lines[b*201 : (b+1)*201]
		name, _, _ := strings.Cut(block[0], ":")
		for i, l := range block {
			if !strings.HasPrefix(l, name+": ") {
				t.Fatalf("block of %s, line %d is %q: the reports interleave", name, i, l)
			}
		}
		if block[200] != name+": running on node n1" {
			t.Errorf("block of %s ends %q", name, block[200])
		}
	}

	var alone bytes.Buffer
	rep := &report{name: "solo", out: &lockedWriter{w: &alone}, live: true}
	rep.printf("service abc created")
	if alone.String() != "solo: service abc created\n" {
		t.Errorf("a VM alone: %q written before its end, want the line at once", alone.String())
	}
}
