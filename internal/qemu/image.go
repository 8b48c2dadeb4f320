package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// Img runs qemu-img.
type Img struct {
	Binary string // default "qemu-img"
	// Exec runs it; nil is os/exec. The runner, which owns every child
	// process it has and reaps them itself, runs it through that owner.
	Exec Exec
}

// Exec runs bin with args to its end, its output to stdout and stderr,
// and returns its exit code; an error when it could not run, or was
// stopped (ctx).
type Exec func(ctx context.Context, bin string, args []string, stdout, stderr io.Writer) (int, error)

// osExec is Exec by os/exec.
func osExec(ctx context.Context, bin string, args []string, stdout, stderr io.Writer) (int, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, err
	}
	return 0, nil
}

func (m Img) exec(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	if m.Exec != nil {
		return m.Exec(ctx, m.bin(), args, stdout, stderr)
	}
	return osExec(ctx, m.bin(), args, stdout, stderr)
}

func (m Img) bin() string {
	if m.Binary == "" {
		return "qemu-img"
	}
	return m.Binary
}

func (m Img) run(ctx context.Context, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	code, err := m.exec(ctx, args, &stdout, &stderr)
	if err == nil && code != 0 {
		err = fmt.Errorf("exit status %d", code)
	}
	if err != nil {
		msg := bytes.TrimSpace(stderr.Bytes())
		if len(msg) == 0 {
			return nil, fmt.Errorf("qemu-img %s: %w", args[0], err)
		}
		return nil, fmt.Errorf("qemu-img %s: %w: %s", args[0], err, msg)
	}
	return stdout.Bytes(), nil
}

// Info reads an image's format and size. It asks for a shared lock (-U) so
// that it works while a QEMU holds the image, and never writes.
func (m Img) Info(ctx context.Context, path string) (ImageInfo, error) {
	var info ImageInfo
	err := m.info(ctx, &info, "-U", path)
	return info, err
}

// info runs qemu-img info --output=json with args and decodes it into v.
func (m Img) info(ctx context.Context, v any, args ...string) error {
	out, err := m.run(ctx, append([]string{"info", "--output=json"}, args...)...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("qemu-img info: %w", err)
	}
	return nil
}

// HasData reports whether any cluster of the image holds data: a freshly
// created disk has none, and a VM with an install medium boots from the
// medium until it has.
func (m Img) HasData(ctx context.Context, path string) (bool, error) {
	out, err := m.run(ctx, "map", "-U", "--output=json", path)
	if err != nil {
		return false, err
	}
	var extents []struct {
		Data bool `json:"data"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		return false, fmt.Errorf("qemu-img map: %w", err)
	}
	for _, e := range extents {
		if e.Data {
			return true, nil
		}
	}
	return false, nil
}

// ErrExists reports that a file to be created was already there; it was
// left alone.
var ErrExists = errors.New("already exists")

// Create makes a new qcow2 image at path. It never replaces a file: the
// image is made under a temporary name and linked into place, which fails
// if anything took the name meanwhile (ErrExists).
func (m Img) Create(ctx context.Context, path string, size int64) error {
	tmp, err := tempName(path)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if _, err := m.run(ctx, "create", "-q", "-f", "qcow2", tmp, strconv.FormatInt(size, 10)); err != nil {
		return err
	}
	return publish(tmp, path)
}

// tempName reserves a unique name beside path (same folder, so a link can
// publish it).
func tempName(path string) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".new-*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	f.Close()
	return name, nil
}

// publish gives tmp the name path unless path exists, and syncs the folder.
func publish(tmp, path string) error {
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s: %w", path, ErrExists)
		}
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// CheckResult is what qemu-img check found.
type CheckResult struct {
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
	CheckErrors int `json:"check-errors"`
}

// ErrLocked reports an image whose lock another process holds: a QEMU is
// using it.
var ErrLocked = errors.New("image is locked by another process")

// Check runs qemu-img check without repairing anything. It takes the
// image's lock, so a disk in use by a running QEMU is reported as
// ErrLocked rather than checked under its feet.
func (m Img) Check(ctx context.Context, path string) (CheckResult, error) {
	var stdout, stderr bytes.Buffer
	code, err := m.exec(ctx, []string{"check", "--output=json", path}, &stdout, &stderr)
	if err == nil && code != 0 && code != 2 && code != 3 {
		err = fmt.Errorf("exit status %d", code)
	}
	msg := string(bytes.TrimSpace(stderr.Bytes()))
	if strings.Contains(msg, "Failed to get") && strings.Contains(msg, "lock") {
		return CheckResult{}, fmt.Errorf("%w: %s", ErrLocked, msg)
	}
	var res CheckResult
	if jerr := json.Unmarshal(stdout.Bytes(), &res); jerr != nil {
		if err == nil {
			err = jerr
		}
		return res, fmt.Errorf("qemu-img check: %v: %s", err, msg)
	}
	// Exit 2 (corruptions) and 3 (leaks) come with a full report.
	return res, nil
}

// SetBacking writes backing (a qcow2, named relative to path's folder)
// into path's header as its backing file, and nothing else: no data is
// read or copied (rebase -u). It is how a backup that holds only the
// clusters changed since its parent names that parent.
func (m Img) SetBacking(ctx context.Context, path, backing string) error {
	_, err := m.run(ctx, "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
	return err
}

// Bitmap adds (op "add": persistent, recording) or removes (op "remove")
// a dirty bitmap of a qcow2 no QEMU holds.
func (m Img) Bitmap(ctx context.Context, path, op, name string) error {
	_, err := m.run(ctx, "bitmap", "--"+op, "-f", "qcow2", path, name)
	return err
}

// CheckAlone runs qemu-img check on one qcow2 of a chain by itself (its
// backing file, if it names one, is not opened) and fails on any
// corruption or check error.
func (m Img) CheckAlone(ctx context.Context, path string) error {
	spec, err := json.Marshal(map[string]any{"driver": "qcow2", "file": map[string]any{"driver": "file", "filename": path}, "backing": nil})
	if err != nil {
		return err
	}
	res, err := m.Check(ctx, "json:"+string(spec))
	if err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	if res.Corruptions+res.CheckErrors > 0 {
		return fmt.Errorf("%s: qemu-img check found %d corruptions, %d errors", filepath.Base(path), res.Corruptions, res.CheckErrors)
	}
	return nil
}

// Run runs qemu-img with args and returns its output; an error carries
// what it said.
func (m Img) Run(ctx context.Context, args ...string) ([]byte, error) { return m.run(ctx, args...) }
