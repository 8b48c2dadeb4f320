package backup

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/swarmvm/swarmvm/internal/qemu"
)

// Keep says which backups a prune keeps: the newest Last, and the newest
// of each of the newest Daily days and Weekly ISO weeks that have one.
// The newest backup is always kept (the VM's dirty bitmap is its), and so
// is every backup a kept one builds on.
type Keep struct {
	Last, Daily, Weekly int
}

// Decision is what a prune does with one backup, and why.
type Decision struct {
	ID   string `json:"id"`
	Keep bool   `json:"keep"`
	Why  string `json:"why"`
}

// Plan decides, oldest first.
func Plan(entries []Entry, k Keep) []Decision {
	why := map[string]string{}
	n := len(entries)
	if n == 0 {
		return nil
	}
	keep := func(e Entry, reason string) {
		if why[e.ID] == "" {
			why[e.ID] = reason
		}
	}
	keep(entries[n-1], "the newest")
	for i := n - 1; i >= 0 && i >= n-k.Last; i-- {
		keep(entries[i], fmt.Sprintf("one of the last %d", k.Last))
	}
	period := func(count int, name string, of func(time.Time) string) {
		seen := map[string]bool{}
		for i := n - 1; i >= 0 && len(seen) < count; i-- {
			p := of(entries[i].Point.UTC())
			if !seen[p] {
				seen[p] = true
				keep(entries[i], fmt.Sprintf("the newest of %s %s", name, p))
			}
		}
	}
	period(k.Daily, "day", func(t time.Time) string { return t.Format("2006-01-02") })
	period(k.Weekly, "week", func(t time.Time) string {
		y, w := t.ISOWeek()
		return fmt.Sprintf("%d-W%02d", y, w)
	})
	// A kept incremental keeps what it builds on.
	byID := map[string]Entry{}
	for _, e := range entries {
		byID[e.ID] = e
	}
	for i := n - 1; i >= 0; i-- {
		if why[entries[i].ID] == "" {
			continue
		}
		for p := entries[i].Parent; p != ""; p = byID[p].Parent {
			if _, ok := byID[p]; !ok {
				break
			}
			keep(byID[p], "a kept backup builds on it")
		}
	}
	out := make([]Decision, n)
	for i, e := range entries {
		out[i] = Decision{ID: e.ID, Keep: why[e.ID] != "", Why: why[e.ID]}
	}
	return out
}

// Prune removes the backups Plan does not keep, under the repository's
// lock. A removed backup's folder is first renamed .partial, so that it is
// never listed half removed (a prune cut short leaves what the next run
// clears).
func Prune(repo, vm string, k Keep, dryRun bool, out io.Writer) ([]Decision, error) {
	dir, err := vmDir(repo, vm, false)
	if err != nil {
		return nil, err
	}
	release, err := lock(dir, vm)
	if err != nil {
		return nil, err
	}
	defer release()
	entries, err := list(dir)
	if err != nil {
		return nil, err
	}
	plan := Plan(entries, k)
	for _, d := range plan {
		if d.Keep {
			fmt.Fprintf(out, "keep   %s  %s\n", d.ID, d.Why)
			continue
		}
		if dryRun {
			fmt.Fprintf(out, "remove %s  (dry run)\n", d.ID)
			continue
		}
		gone := filepath.Join(dir, d.ID+partial)
		if err := os.Rename(filepath.Join(dir, d.ID), gone); err != nil {
			return plan, err
		}
		if err := os.RemoveAll(gone); err != nil {
			return plan, err
		}
		fmt.Fprintf(out, "remove %s\n", d.ID)
	}
	return plan, syncDir(dir)
}

// Problem is what verify found wrong with one backup.
type Problem struct {
	ID    string `json:"id"`
	Error string `json:"error"`
}

// Verify re-reads every complete backup: each file against its manifest,
// each disk with qemu-img check (on its own: the chain's links are checked
// by resolving them), and each backup's chain down to a full one.
func Verify(ctx context.Context, repo, vm string, out io.Writer) ([]Problem, error) {
	dir, err := vmDir(repo, vm, false)
	if err != nil {
		return nil, err
	}
	entries, err := list(dir)
	if err != nil {
		return nil, err
	}
	img := qemu.Img{}
	var problems []Problem
	for _, e := range entries {
		err := checkFiles(e, "")
		if err == nil {
			err = img.CheckAlone(ctx, filepath.Join(e.Dir, DiskFile))
		}
		if err == nil {
			_, err = Chain(entries, e.ID)
		}
		if err != nil {
			problems = append(problems, Problem{ID: e.ID, Error: err.Error()})
			fmt.Fprintf(out, "%s  DAMAGED: %v\n", e.ID, err)
			continue
		}
		fmt.Fprintf(out, "%s  ok (%d files, %s)\n", e.ID, len(e.Files), e.Mode)
	}
	return problems, nil
}
