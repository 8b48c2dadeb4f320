package qemu

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Debian's OVMF vars files (package ovmf, installed by scripts/test.sh):
// the Microsoft and snakeoil templates have Secure Boot keys, the plain
// one has none; what is not a vars file is refused.
func TestSecureBootKeys(t *testing.T) {
	for file, want := range map[string]bool{
		"OVMF_VARS_4M.ms.fd": true, "OVMF_VARS_4M.snakeoil.fd": true, "OVMF_VARS_4M.fd": false,
		"OVMF_VARS.ms.fd": true, "OVMF_VARS.fd": false,
	} {
		path := filepath.Join("/usr/share/OVMF", file)
		got, err := SecureBootKeys(path)
		if err != nil {
			t.Fatalf("%s: %v (Debian's ovmf package is needed)", file, err)
		}
		if got != want {
			vars, _ := SecureBootVars(path)
			t.Errorf("%s: keys %v, want %v (global variables %v)", file, got, want, vars)
		}
	}
	vars, err := SecureBootVars("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
	if err != nil || vars["db"] == 0 || vars["KEK"] == 0 {
		t.Errorf("ms template: %v %v, want PK, KEK and db", vars, err)
	}
	for _, bad := range [][]byte{nil, make([]byte, 540672), []byte("_FVH_FVH_FVH")} {
		p := filepath.Join(t.TempDir(), "vars.fd")
		os.WriteFile(p, bad, 0o600)
		if _, err := SecureBootKeys(p); !errors.Is(err, ErrNotVarStore) {
			t.Errorf("%d bytes of junk: %v, want ErrNotVarStore", len(bad), err)
		}
	}
	if _, err := SecureBootKeys("/usr/share/OVMF/OVMF_CODE_4M.fd"); !errors.Is(err, ErrNotVarStore) {
		t.Errorf("firmware code read as vars: %v", err)
	}
}
