// Package cloudinit builds the NoCloud seed a guest's cloud-init (or
// cloudbase-init on Windows) reads at boot: a small ISO9660 image labelled
// CIDATA holding user-data, meta-data and, when given, network-config, with
// Rock Ridge and Joliet names so that every reader sees the real file
// names. The runner builds it on the /run tmpfs from the task's secrets;
// it is never written to the storage volume.
package cloudinit

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
	"go.yaml.in/yaml/v3"
)

// Seed is what the guest is given. Nil parts are left out.
type Seed struct {
	UserData      []byte
	MetaData      []byte // YAML; instance-id, local-hostname and public-keys are added when it lacks them
	NetworkConfig []byte
	Hostname      string
	SSHKeys       []string
	// Key is the VM's own secret that its instance-id is keyed with (an
	// HMAC): the id then tells nothing of the seed to whoever reads it (a
	// log reader, a guest user without the root that reads user-data). A
	// nil Key is the unkeyed digest a VM had before, kept for such a VM
	// so that cloud-init does not see a new instance.
	Key []byte
}

// InstanceID changes when, and only when, anything in the seed changes:
// cloud-init runs its once-per-instance steps again for a new one, and not
// on a reboot with the same inputs. It is keyed with Key (HMAC-SHA256).
func (s Seed) InstanceID() string {
	h := sha256.New()
	if s.Key != nil {
		h = hmac.New(sha256.New, s.Key)
	}
	for _, part := range [][]byte{s.UserData, s.MetaData, s.NetworkConfig, []byte(s.Hostname), []byte(strings.Join(s.SSHKeys, "\n"))} {
		fmt.Fprintf(h, "%d:", len(part))
		h.Write(part)
	}
	return "iid-swarmvm-" + hex.EncodeToString(h.Sum(nil)[:8])
}

// Files are the seed's files as the guest reads them.
func (s Seed) Files() (map[string][]byte, error) {
	meta := map[string]any{}
	if len(s.MetaData) > 0 {
		if err := yaml.Unmarshal(s.MetaData, &meta); err != nil {
			return nil, fmt.Errorf("meta-data is not a YAML mapping: %v", err)
		}
		if meta == nil {
			meta = map[string]any{}
		}
	}
	if _, ok := meta["instance-id"]; !ok {
		meta["instance-id"] = s.InstanceID()
	}
	if _, ok := meta["local-hostname"]; !ok && s.Hostname != "" {
		meta["local-hostname"] = s.Hostname
	}
	if len(s.SSHKeys) > 0 {
		keys, _ := meta["public-keys"].([]any)
		for _, k := range s.SSHKeys {
			if !slices.Contains(keys, any(k)) {
				keys = append(keys, k)
			}
		}
		meta["public-keys"] = keys
	}
	md, err := yaml.Marshal(meta)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{"meta-data": md, "user-data": s.UserData}
	if len(s.UserData) == 0 {
		files["user-data"] = []byte("#cloud-config\n{}\n")
	}
	if len(s.NetworkConfig) > 0 {
		files["network-config"] = s.NetworkConfig
	}
	return files, nil
}

// Build writes the seed image to path, created 0600 and never over an
// existing file; work is a private folder for the image's staging.
func Build(path, work string, s Seed) error {
	files, err := s.Files()
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	stage, err := os.MkdirTemp(work, ".cidata-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	fs, err := iso9660.Create(file.New(f, false), 0, 0, 2048, stage)
	if err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		w, err := fs.OpenFile("/"+name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			return fmt.Errorf("cloud-init seed %s: %w", name, err)
		}
		_, err = w.Write(files[name])
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("cloud-init seed %s: %w", name, err)
		}
	}
	if err := fs.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: "CIDATA"}); err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	return nil
}

// Read returns the files of a seed image by their long names, for tests
// and `swarmvm doctor`.
func Read(path string) (map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	fs, err := iso9660.Read(file.New(f, true), st.Size(), 0, 2048)
	if err != nil {
		return nil, err
	}
	ents, err := fs.ReadDir(".")
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := fs.ReadFile(e.Name())
		if err != nil {
			return nil, err
		}
		out[filepath.Base(e.Name())] = b
	}
	return out, nil
}
