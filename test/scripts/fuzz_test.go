// Package scripts tests the logic of the shell scripts that decide a test
// run's outcome, where a real failure cannot be had on demand: a stand-in
// for the go command plays the fuzzing engine.
package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeGo plays `go test`: a fuzzing run takes the next outcome from the
// plan file — pass, hiccup (the engine loses a worker and saves an input
// that passes alone), crash (it saves an input that fails alone) or hang
// (it reports a hung worker and saves an input that passes alone, slowly).
// `go test -c` writes a test binary that runs one saved input: it fails
// for a crash input and takes 2 s for a hang input.
const fakeGo = `#!/usr/bin/env bash
set -eu
case "$*" in
*-fuzz*)
	next=$(head -n1 "$PLAN"); sed -i 1d "$PLAN"
	n=$(wc -l <"$CALLS"); echo fuzz >>"$CALLS"
	case $next in
	pass) echo "fuzz: elapsed: 1s, execs: 1234 (1234/sec)"; echo PASS; exit 0 ;;
	hiccup) mkdir -p "$CORPUS"; echo x >"$CORPUS/hiccup$n"
		echo "fuzzing process hung or terminated unexpectedly while minimizing: EOF"; exit 1 ;;
	hang) mkdir -p "$CORPUS"; echo x >"$CORPUS/slow$n"
		echo "fuzzing process hung or terminated unexpectedly: exit status 2"; exit 1 ;;
	crash) mkdir -p "$CORPUS"; echo x >"$CORPUS/crash$n"; echo "panic: boom"; exit 1 ;;
	esac ;;
*-c*)
	out=$(sed 's/.*-o \([^ ]*\).*/\1/' <<<"$*")
	cat >"$out" <<'BIN'
#!/usr/bin/env bash
echo alone >>"$CALLS"
case "$*" in *crash*) echo "the input fails"; exit 1 ;; *slow*) sleep 2 ;; esac
echo ok
BIN
	chmod +x "$out" ;;
esac
`

type fuzzRun struct {
	out    string
	code   int
	calls  []string
	corpus []string
}

func runFuzz(t *testing.T, plan ...string) fuzzRun {
	t.Helper()
	dir := t.TempDir()
	pkg := filepath.Join(dir, "pkg")
	corpus := filepath.Join(pkg, "testdata", "fuzz", "FuzzX")
	goBin := filepath.Join(dir, "go")
	if err := os.WriteFile(goBin, []byte(fakeGo), 0o755); err != nil {
		t.Fatal(err)
	}
	planFile, calls := filepath.Join(dir, "plan"), filepath.Join(dir, "calls")
	os.WriteFile(planFile, []byte(strings.Join(plan, "\n")+"\n"), 0o644)
	os.WriteFile(calls, nil, 0o644)
	script, _ := filepath.Abs("../../scripts/fuzz.sh")
	cmd := exec.Command(script, "pkg", "FuzzX", "100x")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GO="+goBin, "PLAN="+planFile, "CALLS="+calls, "CORPUS="+corpus, "HANG_LIMIT=1")
	out, err := cmd.CombinedOutput()
	r := fuzzRun{out: string(out)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	c, _ := os.ReadFile(calls)
	r.calls = strings.Fields(string(c))
	ents, _ := os.ReadDir(corpus)
	for _, e := range ents {
		r.corpus = append(r.corpus, e.Name())
	}
	t.Logf("plan %v → exit %d, calls %v, corpus %v\n%s", plan, r.code, r.calls, r.corpus, r.out)
	return r
}

func TestFuzzPasses(t *testing.T) {
	r := runFuzz(t, "pass")
	if r.code != 0 || strings.Join(r.calls, " ") != "fuzz" || !strings.Contains(r.out, "execs: 1234") {
		t.Fatalf("a passing target: exit %d, calls %v", r.code, r.calls)
	}
}

// An engine hiccup is retried once, reported, and leaves no input behind.
func TestFuzzEngineHiccupRetriedOnce(t *testing.T) {
	r := runFuzz(t, "hiccup", "pass")
	if r.code != 0 {
		t.Fatalf("exit %d after a hiccup and a clean retry", r.code)
	}
	if got := strings.Join(r.calls, " "); got != "fuzz alone fuzz" {
		t.Fatalf("calls %q, want the saved input run alone, then one more fuzzing run", got)
	}
	if !strings.Contains(r.out, "the fuzzing engine failed, not the code") || !strings.Contains(r.out, "on the retry") {
		t.Fatalf("the hiccup and the retry are not reported:\n%s", r.out)
	}
	if len(r.corpus) != 0 {
		t.Fatalf("the hiccup's input was left in the corpus: %v", r.corpus)
	}
}

func TestFuzzTwoHiccupsFail(t *testing.T) {
	r := runFuzz(t, "hiccup", "hiccup", "pass")
	if r.code != 1 || !strings.Contains(r.out, "failed twice") {
		t.Fatalf("two hiccups in a row: exit %d", r.code)
	}
	if n := strings.Count(strings.Join(r.calls, " "), "fuzz"); n != 2 {
		t.Fatalf("%d fuzzing runs, want 2 (one retry only)", n)
	}
}

// A crash is never retried: its input fails alone and stays for the fix.
func TestFuzzCrashFailsAndKeepsInput(t *testing.T) {
	r := runFuzz(t, "crash", "pass")
	if r.code != 1 || !strings.Contains(r.out, "fails, or hangs, on its own") {
		t.Fatalf("a crash: exit %d", r.code)
	}
	if got := strings.Join(r.calls, " "); got != "fuzz alone" {
		t.Fatalf("calls %q: a crash must not be fuzzed again", got)
	}
	if len(r.corpus) != 1 || !strings.HasPrefix(r.corpus[0], "crash") {
		t.Fatalf("the crash input is not kept: %v", r.corpus)
	}
}

// An input the engine reported as hung that passes alone, but slower than
// the hang limit, is a finding: kept, and the target fails, not retried.
func TestFuzzSlowInputKept(t *testing.T) {
	r := runFuzz(t, "hang", "pass")
	if r.code != 1 || !strings.Contains(r.out, "over the 1 s hang limit") || !strings.Contains(r.out, "fails, or hangs, on its own") {
		t.Fatalf("a slow input: exit %d", r.code)
	}
	if got := strings.Join(r.calls, " "); got != "fuzz alone" {
		t.Fatalf("calls %q: a slow input must not be fuzzed again", got)
	}
	if len(r.corpus) != 1 || !strings.HasPrefix(r.corpus[0], "slow") {
		t.Fatalf("the slow input is not kept: %v", r.corpus)
	}
}
