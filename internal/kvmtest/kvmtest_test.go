package kvmtest

import (
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// Every listed test exists, in its package, and calls Require: the list
// names no test that was renamed, moved or no longer needs KVM. (Require
// itself fails a test that calls it without being listed.)
func TestListMatchesTheTests(t *testing.T) {
	listed := Listed()
	if len(listed) == 0 {
		t.Fatal("needs-kvm.txt lists no test")
	}
	for name, why := range listed {
		pkg, test, ok := strings.Cut(name, " ")
		if !ok || why == "" {
			t.Errorf("%q: want PACKAGE TEST: WHY", name)
			continue
		}
		top, sub, _ := strings.Cut(test, "/")
		body := testBody(t, filepath.Join("..", "..", pkg), top)
		switch {
		case body == "":
			t.Errorf("%s: no func %s in %s", name, top, pkg)
		case !strings.Contains(body, "kvmtest.Require(t)"):
			t.Errorf("%s: %s does not call kvmtest.Require", name, top)
		case sub != "" && !strings.Contains(body, `t.Run("`+sub+`"`):
			t.Errorf("%s: %s has no subtest %q", name, top, sub)
		}
	}
}

// testBody is the source of func name in dir's test files, up to the next
// top-level func.
func testBody(t *testing.T, dir, name string) string {
	files, _ := filepath.Glob(filepath.Join(dir, "*_test.go"))
	start := regexp.MustCompile(`(?m)^func ` + regexp.QuoteMeta(name) + `\(`)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src := string(b)
		loc := start.FindStringIndex(src)
		if loc == nil {
			continue
		}
		rest := src[loc[1]:]
		if end := strings.Index(rest, "\nfunc "); end >= 0 {
			rest = rest[:end]
		}
		return rest
	}
	return ""
}

func TestQualified(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	if got := Qualified(file, "TestX/y"); got != "internal/kvmtest TestX/y" {
		t.Errorf("Qualified = %q", got)
	}
}

func TestProbeStandIn(t *testing.T) {
	for path, ok := range map[string]bool{StandInDevice: true, "/dev/null": false, "/proc/self/status": false} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		err = ProbeStandIn(f)
		f.Close()
		if (err == nil) != ok {
			t.Errorf("ProbeStandIn(%s) = %v", path, err)
		}
	}
}
