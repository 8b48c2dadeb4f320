package vmdisk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// Import makes the VM's disk from an image brought from elsewhere: a file
// (src) or a URL, downloaded first beside the disk. The image must be
// self-contained and of a known format; it is converted to qcow2, checked,
// and installed under the VM's name only if that name is free. A UEFI VM
// also gets its NVRAM from the template. Progress goes to log.
func Import(ctx context.Context, cfg config.Config, src, url string, log io.Writer) error {
	if err := onHome(cfg); err != nil {
		return err
	}
	for _, f := range files(cfg) {
		if _, err := os.Lstat(f); err == nil {
			return fmt.Errorf("%s exists: the VM already has it, and swarmvm never overwrites a disk or NVRAM — import under another name, or set the file aside by hand", f)
		}
	}
	var want int64
	if cfg.UEFI() {
		w, err := qemu.CheckPair(cfg.OVMFCode, cfg.OVMFVarsTemplate)
		if err != nil {
			return err
		}
		want = w
	}
	if url != "" {
		tmp, err := download(ctx, url, cfg.ImagePath, log)
		if err != nil {
			return err
		}
		defer os.Remove(tmp)
		src = tmp
	}
	if err := convert(ctx, src, cfg.ImagePath, log); err != nil {
		return err
	}
	if cfg.UEFI() {
		if _, err := qemu.PrepareVars(cfg.OVMFVarsTemplate, cfg.OVMFVars, want, false, time.Now()); err != nil {
			return fmt.Errorf("NVRAM: %w", err)
		}
		fmt.Fprintf(log, "NVRAM %s created from %s\n", cfg.OVMFVars, cfg.OVMFVarsTemplate)
	}
	return nil
}

func convert(ctx context.Context, src, dst string, log io.Writer) error {
	img := qemu.Img{}
	info, err := img.Info(ctx, src)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if !slices.Contains(qemu.ImportFormats, info.Format) {
		return fmt.Errorf("source is %s, not one of %v", info.Format, qemu.ImportFormats)
	}
	if why := info.SelfContained(src); why != "" {
		return fmt.Errorf("source refused: %s", why)
	}
	fmt.Fprintf(log, "source: %s, virtual size %d bytes, %d bytes on disk\n", info.Format, info.VirtualSize, info.ActualSize)
	next := 0.0
	err = img.Convert(ctx, src, info.Format, dst, func(p float64) {
		if p >= next {
			fmt.Fprintf(log, "converting: %3.0f%%\n", p)
			next = p - float64(int(p)%10) + 10
		}
	})
	if err != nil {
		return err
	}
	res, err := img.Check(ctx, dst)
	if err == nil && res.Corruptions+res.CheckErrors > 0 {
		err = fmt.Errorf("%d corruptions, %d check errors", res.Corruptions, res.CheckErrors)
	}
	if err != nil {
		// The converted copy is ours alone; the source is untouched.
		os.Remove(dst)
		return fmt.Errorf("the converted disk failed qemu-img check (removed): %w", err)
	}
	fi, err := os.Stat(dst)
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "disk %s: qcow2, checked clean, %d bytes, mode %v, uid %d\n", dst, fi.Size(), fi.Mode().Perm(), os.Getuid())
	return nil
}

// download fetches url into a new file beside dst, logging progress.
func download(ctx context.Context, url, dst string, log io.Writer) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", fmt.Errorf("--url: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("download: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("download %s: %s", url, resp.Status)
	}
	tmp, err := qemu.TempName(dst + ".download")
	if err != nil {
		return "", err
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		os.Remove(tmp)
		return "", err
	}
	n, err := io.Copy(f, &meteredReader{r: resp.Body, m: newMeter("downloading", resp.ContentLength, 0, log)})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("download: %w", err)
	}
	if resp.ContentLength > 0 && n != resp.ContentLength {
		os.Remove(tmp)
		return "", errors.New("download: short body")
	}
	fmt.Fprintf(log, "downloaded %d bytes\n", n)
	return tmp, nil
}
