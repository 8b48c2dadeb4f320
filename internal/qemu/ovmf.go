package qemu

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// OVMF's split images are made as a pair: CODE and VARS together fill the
// flash (2 MiB for the old builds, 4 MiB for the current ones). A VARS file
// from the other size class is not NVRAM this firmware can use, and starting
// with it would silently lose the variables.
var flashSizes = []int64{2 << 20, 4 << 20}

// ErrMismatch reports an OVMF file that does not belong with the others.
var ErrMismatch = errors.New("OVMF files do not match")

// CheckPair verifies that code and the vars template belong together and
// returns the vars size they imply.
func CheckPair(code, template string) (int64, error) {
	cs, err := size(code)
	if err != nil {
		return 0, err
	}
	ts, err := size(template)
	if err != nil {
		return 0, err
	}
	for _, f := range flashSizes {
		if cs+ts == f {
			return ts, nil
		}
	}
	return 0, fmt.Errorf("%w: %s (%d bytes) and template %s (%d bytes) are not a CODE/VARS pair of one build (their sizes add up to %d, not 2 MiB or 4 MiB)",
		ErrMismatch, code, cs, template, ts, cs+ts)
}

// VarsResult says what PrepareVars did.
type VarsResult struct {
	Created  bool
	SetAside string // where a reset moved the old vars file, if it did
}

// PrepareVars makes sure vars is this VM's own NVRAM: created from template
// when missing, kept when present and of the template's size. A vars file of
// another size is refused unless reset is asked for; a reset never deletes:
// the old file is renamed aside first.
func PrepareVars(template, vars string, want int64, reset bool, now time.Time) (VarsResult, error) {
	var res VarsResult
	vs, err := size(vars)
	switch {
	case err == nil && reset:
		res.SetAside = fmt.Sprintf("%s.%s.bak", vars, now.UTC().Format("20060102T150405Z"))
		if err := os.Rename(vars, res.SetAside); err != nil {
			return res, fmt.Errorf("set aside %s: %w", vars, err)
		}
	case err == nil && vs == want:
		return res, nil
	case err == nil:
		return res, fmt.Errorf("%w: %s is %d bytes but the template is %d bytes (made for another firmware build?)", ErrMismatch, vars, vs, want)
	case !errors.Is(err, os.ErrNotExist):
		return res, err
	}
	if err := copyNew(template, vars); err != nil {
		return res, err
	}
	res.Created = true
	return res, nil
}

// copyNew copies src to a new file dst (mode 0600), never replacing dst.
func copyNew(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := tempName(dst)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return publish(tmp, dst)
}

func size(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	if !fi.Mode().IsRegular() {
		return 0, fmt.Errorf("%s is not a regular file", path)
	}
	return fi.Size(), nil
}
