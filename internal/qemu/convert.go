package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// ImageInfo is what qemu-img says of a disk image, with what would make it
// reach beyond itself: a backing file, an external data file, or (vmdk)
// extents in other files.
type ImageInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	ActualSize  int64  `json:"actual-size"`
	BackingFile string `json:"backing-filename"`
	Specific    struct {
		Type string `json:"type"`
		Data struct {
			DataFile string `json:"data-file"`
			Bitmaps  []struct {
				Name  string   `json:"name"`
				Flags []string `json:"flags"` // "auto": recording; "in-use": not saved properly
			} `json:"bitmaps"`
			Extents []struct {
				Filename string `json:"filename"`
			} `json:"extents"`
		} `json:"data"`
	} `json:"format-specific"`
}

// ImportFormats are the formats an imported image may have.
var ImportFormats = []string{"qcow2", "raw", "vmdk", "vhdx", "vdi"}

// SelfContained says why an image reaches beyond its own file, or "" when
// it does not. Such an image is refused: what it refers to is not part of
// what was imported, and may be anything on the node.
func (s ImageInfo) SelfContained(path string) string {
	switch {
	case s.BackingFile != "":
		return fmt.Sprintf("it has a backing file (%s): flatten it first (qemu-img convert -O qcow2 without -B, where the backing file is)", s.BackingFile)
	case s.Specific.Data.DataFile != "":
		return fmt.Sprintf("it has an external data file (%s): convert it into a self-contained image first", s.Specific.Data.DataFile)
	}
	for _, e := range s.Specific.Data.Extents {
		if e.Filename != path {
			return fmt.Sprintf("its extent %s is another file: convert it into a single-file image first", e.Filename)
		}
	}
	return ""
}

// Convert writes src (of format from) as a new qcow2 image at dst, never
// replacing dst: it is written under a temporary name and linked into
// place. progress, when set, gets qemu-img's percentage as it goes.
func (m Img) Convert(ctx context.Context, src, from, dst string, progress func(float64)) error {
	return m.convert(ctx, []string{"-f", from, src}, dst, progress)
}

// ConvertChain writes a chain of qcow2 images as one new qcow2 at dst, as
// Convert does: chain[0] is the base, each next one holds what changed on
// it. The chain is given to qemu-img whole (json: options), so that no
// image's own backing-file name is followed.
func (m Img) ConvertChain(ctx context.Context, chain []string, dst string, progress func(float64)) error {
	if len(chain) == 0 {
		return errors.New("an empty chain")
	}
	var node any // JSON null: the base has no backing
	for _, p := range chain {
		node = map[string]any{"driver": "qcow2", "file": map[string]any{"driver": "file", "filename": p}, "backing": node}
	}
	b, err := json.Marshal(node)
	if err != nil {
		return err
	}
	return m.convert(ctx, []string{"json:" + string(b)}, dst, progress)
}

func (m Img) convert(ctx context.Context, src []string, dst string, progress func(float64)) error {
	tmp, err := tempName(dst)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	cmd := exec.CommandContext(ctx, m.bin(), append(append([]string{"convert", "-p", "-O", "qcow2"}, src...), tmp)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	sc := bufio.NewScanner(out)
	sc.Split(scanCR)
	for sc.Scan() {
		// "    (12.50/100%)"
		s := strings.TrimSpace(sc.Text())
		s = strings.TrimSuffix(strings.TrimPrefix(s, "("), "/100%)")
		if p, err := strconv.ParseFloat(s, 64); err == nil && progress != nil {
			progress(p)
		}
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("qemu-img convert: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return err
	}
	return publish(tmp, dst)
}

// scanCR splits qemu-img's progress output, which ends each update with a
// carriage return, as well as at newlines.
func scanCR(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// TempName reserves a unique name beside path, for a file that Publish
// will give path's name.
func TempName(path string) (string, error) { return tempName(path) }

// Publish gives tmp the name path unless path exists (ErrExists).
func Publish(tmp, path string) error { return publish(tmp, path) }
