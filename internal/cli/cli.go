// Package cli is swarmvm's command line: one file per subcommand, flags,
// logging set-up, and the exit code and message an operator sees.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/runner"
	"github.com/swarmvm/swarmvm/internal/status"
)

// Version is set at build time with -ldflags "-X ...cli.Version=...".
var Version = "dev"

// env is how subcommands read the environment; tests replace it.
type env struct {
	getenv func(string) string
	stdout io.Writer
	stderr io.Writer
}

// Run executes swarmvm with args (without the program name) and returns
// the process's exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	e := &env{getenv: os.Getenv, stdout: stdout, stderr: stderr}
	return e.run(ctx, args)
}

func (e *env) run(ctx context.Context, args []string) int {
	stderr := e.stderr
	root := &cobra.Command{
		Use:           "swarmvm",
		Short:         "QEMU/KVM virtual machines as Docker Swarm services, without --privileged",
		Version:       Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetArgs(args)
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	root.AddCommand(e.runCmd(), e.healthCmd(), e.doctorCmd(), e.brokerCmd(),
		e.renderCmd(), e.deployCmd(), e.psCmd(), e.rmCmd(), e.nodeCmd(), e.tapCreateCmd(), e.auditCmd(), e.diskCmd(), e.moveCmd(), e.migrateCmd(), e.consoleCmd(), e.backupCmd(), e.restoreCmd(), e.guestCmd(), e.snapshotCmd())
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var silent *silentError
	if !errors.As(err, &silent) {
		fmt.Fprintf(stderr, "swarmvm: %s\n", indent(err.Error()))
	}
	code := runner.Code(err)
	var ue *usageError
	if code == status.ExitInternal && (isUsage(err) || errors.As(err, &ue)) {
		code = status.ExitConfig
	}
	return code
}

// silentError carries an exit code for an error already reported.
type silentError struct{ err error }

func (s *silentError) Error() string { return s.err.Error() }
func (s *silentError) Unwrap() error { return s.err }

func isUsage(err error) bool {
	msg := err.Error()
	return strings.HasPrefix(msg, "unknown command") || strings.HasPrefix(msg, "unknown flag") ||
		strings.HasPrefix(msg, "unknown shorthand") || strings.Contains(msg, "accepts ")
}

// indent puts the lines of a joined error under one another.
func indent(s string) string { return strings.ReplaceAll(s, "\n", "\n  ") }

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l}))
}
