package runner

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/qemu"
	"github.com/swarmvm/swarmvm/internal/status"
)

func prepareVars(ctx context.Context, cfg config.Config, img qemu.Img, log *slog.Logger) error {
	want, err := qemu.CheckPair(cfg.OVMFCode, cfg.OVMFVarsTemplate)
	if err != nil {
		return exitf(status.ExitStorage, "OVMF: %w", err)
	}
	if err := varsLost(ctx, img, cfg); err != nil {
		return err
	}
	if err := mkdirFor(cfg, "OVMF_VARS", cfg.OVMFVars); err != nil {
		return err
	}
	res, err := qemu.PrepareVars(cfg.OVMFVarsTemplate, cfg.OVMFVars, want, cfg.OVMFVarsReset, time.Now())
	if err != nil {
		return exitf(status.ExitStorage, "OVMF_VARS %s: %w", cfg.OVMFVars, err)
	}
	if res.SetAside != "" {
		log.Warn("OVMF_VARS_RESET: NVRAM set aside and recreated from the template; unset OVMF_VARS_RESET or it happens at every start",
			"old", res.SetAside, "new", cfg.OVMFVars)
	} else if res.Created {
		log.Info("OVMF vars created from the template", "path", cfg.OVMFVars, "template", cfg.OVMFVarsTemplate)
	}
	return nil
}

// lostUnderData reports whether a VM's own state file or folder (NVRAM,
// TPM) is missing while its disk already holds data and no reset of it was
// asked for: state that existed and is gone, not a new VM's.
func lostUnderData(ctx context.Context, img qemu.Img, cfg config.Config, path string, reset bool) (bool, error) {
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) || reset {
		return false, nil
	}
	has, err := img.HasData(ctx, cfg.ImagePath)
	if err != nil {
		return false, exitf(status.ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, err)
	}
	return has, nil
}

// varsLost refuses to start a VM whose disk already holds data but whose
// NVRAM file is missing: making a new one from the template would be an
// NVRAM reset (boot entries, Secure Boot state), which only
// OVMF_VARS_RESET asks for.
func varsLost(ctx context.Context, img qemu.Img, cfg config.Config) error {
	lost, err := lostUnderData(ctx, img, cfg, cfg.OVMFVars, cfg.OVMFVarsReset)
	if err != nil || !lost {
		return err // a new VM's NVRAM starts from the template
	}
	return exitf(status.ExitStorage, "OVMF_VARS %s is missing but the disk %s already holds data: this VM's NVRAM (UEFI boot entries, Secure Boot state) is gone — restore the file, or set OVMF_VARS_RESET=true once to start from the template (also for a disk brought from elsewhere)", cfg.OVMFVars, cfg.ImagePath)
}
