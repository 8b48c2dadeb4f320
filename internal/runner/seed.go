package runner

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/swarmvm/swarmvm/internal/cloudinit"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/preflight"
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
func buildSeed(ctx context.Context, cfg config.Config, p *prepared, log *slog.Logger) error {
	key, err := seedKey(ctx, cfg, p, log)
	if err != nil {
		return err
	}
	s := cloudinit.Seed{Hostname: cfg.Name, SSHKeys: cfg.CloudInitSSHKeys, Key: key}
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
	id := s.InstanceID()
	if key == nil { // the unkeyed digest of the seed: never in the log
		id = "(unkeyed, not logged)"
	}
	log.Info("cloud-init seed", "instance_id", id, "from", strings.Join(sorted(parts), ","), "ssh_keys", len(s.SSHKeys), "bus", cfg.CloudInitBus)
	return nil
}

// unkeyed is what the key file holds for a VM that keeps the unkeyed
// instance-id it had before keys.
const unkeyed = "unkeyed\n"

// seedKey reads the VM's key for its instance-id (config.SeedKeyPath, the
// VM's own file, 0600), making it the first time: 32 random bytes. A VM
// that booted here before keys existed (its serial log was here, its disk
// holds data) keeps its unkeyed id instead, pinned in the file: a new id
// would make cloud-init treat it as a new instance (new SSH host keys,
// user-data run again). It returns nil for such a VM.
func seedKey(ctx context.Context, cfg config.Config, p *prepared, log *slog.Logger) ([]byte, error) {
	path := cfg.SeedKeyPath()
	f, err := preflight.OpenOwn(cfg.StorageDir, "the cloud-init key", path, os.O_RDONLY)
	if err == nil {
		defer f.Close()
		b, err := io.ReadAll(io.LimitReader(f, 256))
		if err != nil {
			return nil, exitf(status.ExitStorage, "the cloud-init key %s: %v", path, err)
		}
		if string(b) == unkeyed {
			log.Warn("cloud-init instance-id: kept as the unkeyed digest this VM had, which tells a reader of it about the seed; remove the file to key it (cloud-init then sees a new instance: new SSH host keys, user-data again)", "file", path)
			return nil, nil
		}
		key, err := hex.DecodeString(strings.TrimSpace(string(b)))
		if err != nil || len(key) != 32 {
			return nil, exitf(status.ExitStorage, "the cloud-init key %s is not a key (64 hex digits) — restore it from a backup of the VM, or remove it (a new key gives the guest a new instance-id: cloud-init runs its first-boot steps again)", path)
		}
		return key, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, exitf(status.ExitStorage, "%v — the runner uses only the files it made or checked as its own: remove the file if it is not this VM's, or chown it to this VM's uid %d", err, os.Geteuid())
	}
	content, key := []byte{}, make([]byte, 32)
	legacy := false
	if p.bootedHere {
		if legacy, err = p.img.HasData(ctx, cfg.ImagePath); err != nil {
			return nil, exitf(status.ExitStorage, "IMAGE_PATH %s: %w", cfg.ImagePath, err)
		}
	}
	if legacy {
		content, key = []byte(unkeyed), nil
	} else {
		rand.Read(key)
		content = []byte(hex.EncodeToString(key) + "\n")
	}
	w, err := preflight.CreateOwn(cfg.StorageDir, "the cloud-init key", path, 0o600)
	if err != nil {
		return nil, exitf(status.ExitStorage, "%v — the runner keeps only a key it made itself: remove that file and start again", err)
	}
	_, err = w.Write(content)
	if err == nil {
		err = w.Sync()
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, exitf(status.ExitStorage, "the cloud-init key %s: %v", path, err)
	}
	if legacy {
		log.Warn("cloud-init instance-id: this VM booted here before its id was keyed; it keeps the unkeyed one (a new id would make cloud-init start over); remove the file to key it", "file", path)
		return nil, nil
	}
	log.Info("cloud-init key made: the instance-id is keyed with it (HMAC), and it moves with the disk", "file", path)
	return key, nil
}

func sorted(s []string) []string { slices.Sort(s); return s }
