package console

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Keys keeps the console keys of VMs where swarmvm deploy runs, one file
// per VM (0600 in a 0700 folder): Swarm never gives a secret back, and
// `swarmvm console` signs its tickets with the same key the task reads.
type Keys struct{ Dir string }

// DefaultKeysDir is the folder Keys uses unless told otherwise.
func DefaultKeysDir() string {
	if d := os.Getenv("XDG_CONFIG_HOME"); d != "" {
		return filepath.Join(d, "swarmvm", "console")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/root"
	}
	return filepath.Join(home, ".config", "swarmvm", "console")
}

// Path is the key file of vm.
func (k Keys) Path(vm string) string { return filepath.Join(k.Dir, vm+".key") }

// Load reads vm's key.
func (k Keys) Load(vm string) ([]byte, error) {
	key, err := os.ReadFile(k.Path(vm))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no console key for %s in %s: tickets are signed where the VM was deployed with a console (swarmvm deploy --console-port); run this there, or copy %s here (0600)", vm, k.Dir, k.Path(vm))
	}
	if err != nil {
		return nil, err
	}
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("console key %s has %d bytes, fewer than %d", k.Path(vm), len(key), MinKeyBytes)
	}
	return key, nil
}

// Ensure returns vm's key, making a random one the first time. An existing
// key is never replaced.
func (k Keys) Ensure(vm string) (key []byte, made bool, err error) {
	if key, err := k.Load(vm); err == nil {
		return key, false, nil
	} else if _, serr := os.Stat(k.Path(vm)); serr == nil {
		return nil, false, err
	}
	if err := os.MkdirAll(k.Dir, 0o700); err != nil {
		return nil, false, err
	}
	key = make([]byte, MinKeyBytes)
	rand.Read(key)
	f, err := os.OpenFile(k.Path(vm), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, false, err
	}
	if _, err := f.Write(key); err != nil {
		f.Close()
		return nil, false, err
	}
	return key, true, f.Close()
}

// SecretName is the Swarm secret holding vm's key: it changes with the key
// (Swarm's secrets cannot change), and names no part of the key itself.
func SecretName(vm string, key []byte) string {
	h := sha256.Sum256(append([]byte("swarmvm-console/"+vm+"/"), key...))
	return "swarmvm-console-" + hex.EncodeToString(h[:8])
}
