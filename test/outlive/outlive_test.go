package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// outlive fails a run that leaves a process behind (here an orphaned
// sleep, as a fake QEMU was left), kills it, and passes a clean one; it
// reaps the orphans that end while the run goes on.
func TestOutlive(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "outlive")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v %s", err, out)
	}
	cases := []struct {
		script string
		code   int
		says   string
	}{
		{"true", 0, ""},
		{"exit 3", 3, ""},
		{"sleep 0.5 & exit 0", 0, ""}, // ends within the grace
		{"exec 1>&- 2>&-; sleep 600 & exit 0", 1, "outlived the test run that started it: sleep 600"},
		{"(sleep 600 &) ; exit 3", 3, "1 processes outlived"},
		// An orphan that ends while the command runs is reaped at once, not
		// left a zombie (kill(pid, 0) would still find it) until the end.
		{`p=$(sh -c 'sleep 0.2 >/dev/null 2>&1 & echo $!'); sleep 2.5; [ ! -e /proc/$p ]`, 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.script, func(t *testing.T) {
			cmd := exec.Command(bin, "--", "sh", "-c", tc.script)
			cmd.Env = []string{"OUTLIVE_GRACE=2s", "PATH=/usr/bin:/bin"}
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			if code != tc.code || !strings.Contains(string(out), tc.says) || (tc.says == "" && strings.Contains(string(out), "outlived")) {
				t.Errorf("exit %d, output %q; want exit %d saying %q", code, out, tc.code, tc.says)
			}
			if exec.Command("pgrep", "-f", "^sleep 600$").Run() == nil {
				t.Error("a sleep 600 is still alive: outlive did not kill what was left")
				exec.Command("pkill", "-f", "^sleep 600$").Run()
			}
		})
	}
}
