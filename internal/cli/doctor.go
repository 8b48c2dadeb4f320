package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/runner"
)

func (e *env) doctorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check this node or container for what a VM needs: symptom, cause, fix",
		Long: `Doctor runs the runner's preflight with the current environment and prints
each finding: what passed, and for what failed the symptom an operator would
see, its cause here and the fix. Without VM_NAME it checks for a VM named
"doctor". It exits 1 when anything failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			getenv := e.getenv
			if getenv("VM_NAME") == "" {
				getenv = func(k string) string {
					if k == "VM_NAME" {
						return "doctor"
					}
					return e.getenv(k)
				}
			}
			cfg := config.FromEnv(getenv)
			findings := []preflight.Finding{preflight.ThisMachine().Finding()}
			if err := cfg.Validate(); err != nil {
				findings = append(findings, configFinding(err))
			}
			checks, fds := runner.Preflight(cmd.Context(), cfg, 1)
			fds.Close()
			findings = append(findings, checks...)
			if failed := e.printFindings(findings); failed > 0 {
				fmt.Fprintf(e.stdout, "%d of %d checks failed\n", failed, len(findings))
				return &silentError{&runner.ExitError{Code: 1, Err: errors.New("checks failed")}}
			}
			fmt.Fprintf(e.stdout, "all %d checks passed\n", len(findings))
			return nil
		},
	}
}

func configFinding(err error) preflight.Finding {
	return preflight.Finding{
		Name: "config", Symptom: "invalid configuration", Cause: err.Error(),
		Fix: "correct the variables named above (see docs/reference.md)",
	}
}

// printFindings prints one line per finding and counts the failed ones.
func (e *env) printFindings(fs []preflight.Finding) (failed int) {
	for _, f := range fs {
		fmt.Fprintln(e.stdout, f.String())
		if !f.OK {
			failed++
		}
	}
	return failed
}
