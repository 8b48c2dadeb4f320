package runner

import (
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/swarmvm/swarmvm/internal/cloudinit"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/status"
)

// The files a NoCloud seed is built from, in CLOUD_INIT_DIR (Swarm
// secrets: 0400, the VM's uid).
const (
	SeedUserData      = "swarmvm-user-data"
	SeedMetaData      = "swarmvm-meta-data"
	SeedNetworkConfig = "swarmvm-network-config"
)

// buildSeed makes the VM's cloud-init seed on the run tmpfs and hands it
// to QEMU read-only. Its content is never logged: user-data carries
// passwords and keys.
func buildSeed(cfg config.Config, p *prepared, log *slog.Logger) error {
	s := cloudinit.Seed{Hostname: cfg.Name, SSHKeys: cfg.CloudInitSSHKeys}
	var parts []string
	for name, dst := range map[string]*[]byte{SeedUserData: &s.UserData, SeedMetaData: &s.MetaData, SeedNetworkConfig: &s.NetworkConfig} {
		b, err := os.ReadFile(filepath.Join(cfg.CloudInitDir, name))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue
		case err != nil:
			return exitf(status.ExitConfig, "CLOUD_INIT_DIR: cannot read %s: %v — the task must get it as a secret its uid can read (swarmvm deploy does)", name, err)
		}
		*dst = b
		parts = append(parts, strings.TrimPrefix(name, "swarmvm-"))
	}
	path := seedPath(cfg)
	os.Remove(path) // a seed of an earlier run in this run folder
	if err := cloudinit.Build(path, cfg.RunDir, s); err != nil {
		return exitf(status.ExitConfig, "CLOUD_INIT: %v", err)
	}
	p.facts.seed = true
	log.Info("cloud-init seed", "instance_id", s.InstanceID(), "from", strings.Join(sorted(parts), ","), "ssh_keys", len(s.SSHKeys), "bus", cfg.CloudInitBus)
	return nil
}

func sorted(s []string) []string { slices.Sort(s); return s }
