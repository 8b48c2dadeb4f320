package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A list as internal/kvmtest/needs-kvm.txt has it.
const skipList = `# comment
internal/kvmdev TestProbeKVM: KVM_CREATE_VM on the host's device
test/e2e TestBroker/kvm: a grant of the host's device
`

// Output as go test -v prints it, with kvmtest.Require's skip messages.
const (
	passed    = "=== RUN   TestA\n--- PASS: TestA (0.00s)\n"
	listedTop = "=== RUN   TestProbeKVM\n    kvmdev_test.go:35: needs /dev/kvm, which this host cannot have: no vmx; listed as: internal/kvmdev TestProbeKVM\n--- SKIP: TestProbeKVM (0.00s)\n"
	listedSub = "=== RUN   TestBroker\n=== RUN   TestBroker/kvm\n    broker_test.go:9: needs /dev/kvm, which this host cannot have: no vmx; listed as: test/e2e TestBroker/kvm\n--- PASS: TestBroker (1.00s)\n    --- SKIP: TestBroker/kvm (0.00s)\n"
	unlisted  = "=== RUN   TestOther\n    x_test.go:3: needs /dev/kvm, which this host cannot have: no vmx; listed as: internal/runner TestOther\n--- SKIP: TestOther (0.00s)\n"
	plainSkip = "=== RUN   TestLazy\n    y_test.go:4: not today\n--- SKIP: TestLazy (0.00s)\n"
)

func runSkips(t *testing.T, output, kvmStatus string) (string, string, int) {
	t.Helper()
	dir := t.TempDir()
	out, list := filepath.Join(dir, "out"), filepath.Join(dir, "list")
	os.WriteFile(out, []byte(output), 0o644)
	os.WriteFile(list, []byte(skipList), 0o644)
	script, _ := filepath.Abs("../../scripts/skips.sh")
	cmd := exec.Command(script, out, kvmStatus, list)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

func TestSkipsJudged(t *testing.T) {
	cases := []struct {
		name, output, kvm string
		code              int
		notRun            []string
		says              string
	}{
		{"no skip", passed, "2", 0, nil, ""},
		{"listed, on a host without KVM", passed + listedTop + listedSub, "2", 0,
			[]string{"internal/kvmdev TestProbeKVM: KVM_CREATE_VM on the host's device", "test/e2e TestBroker/kvm: a grant of the host's device"}, ""},
		{"listed, on a host with KVM", passed + listedTop, "0", 1, nil, "this host has KVM"},
		{"not listed", listedTop + unlisted, "2", 1, nil, "not in"},
		{"another skip", listedTop + plainSkip, "2", 1, []string{"internal/kvmdev TestProbeKVM: KVM_CREATE_VM on the host's device"}, "1 tests skipped"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			stdout, stderr, code := runSkips(t, tc.output, tc.kvm)
			var got []string
			if s := strings.TrimSpace(stdout); s != "" {
				got = strings.Split(s, "\n")
			}
			if code != tc.code || strings.Join(got, "|") != strings.Join(tc.notRun, "|") || !strings.Contains(stderr, tc.says) {
				t.Errorf("exit %d, not run %q, stderr %q; want exit %d, not run %q, stderr with %q", code, got, stderr, tc.code, tc.notRun, tc.says)
			}
		})
	}
}
