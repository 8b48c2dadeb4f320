package qemu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"unicode/utf16"
)

// OVMF keeps its UEFI variables in the vars flash as an authenticated
// variable store: a firmware volume header, a variable store header, then
// variables one after the other (4-byte aligned), each a header, its
// UTF-16 name and its data. Only what deciding "Secure Boot keys are
// enrolled" needs is read here.

var (
	// gEfiAuthenticatedVariableGuid, as it is laid out in the flash.
	authVarStoreGUID = []byte{0x78, 0x2c, 0xf3, 0xaa, 0x7b, 0x94, 0x9a, 0x43, 0xa1, 0x80, 0x2e, 0x14, 0x4e, 0xc3, 0x77, 0x92}
	// EFI_GLOBAL_VARIABLE: PK, KEK, SecureBoot, BootOrder...
	globalVarGUID = []byte{0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c}
	// EFI_IMAGE_SECURITY_DATABASE_GUID: db, dbx.
	imageSecurityGUID = []byte{0xcb, 0xb2, 0x19, 0xd7, 0x3a, 0x3d, 0x96, 0x45, 0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f}
)

const (
	fvSignatureAt   = 40 // "_FVH"
	fvHeaderLenAt   = 48
	varStoreHdrSize = 28
	authVarHdrSize  = 60
	varStartID      = 0x55aa
	varAdded        = 0x3f
	varInDeletion   = 0xfe // cleared bit: deletion under way
)

// ErrNotVarStore reports a file that is not an OVMF vars flash.
var ErrNotVarStore = errors.New("not an OVMF vars file (no authenticated variable store)")

// SecureBootVars lists the live variables of an OVMF vars file in the EFI
// global namespace (PK, KEK, boot entries) and the image security one (db,
// dbx), with their data sizes.
func SecureBootVars(path string) (map[string]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	vars, err := varStore(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return vars, nil
}

// varStore reads the variables of a vars flash's content b.
func varStore(b []byte) (map[string]int, error) {
	if len(b) < 64 || string(b[fvSignatureAt:fvSignatureAt+4]) != "_FVH" {
		return nil, ErrNotVarStore
	}
	at := int(binary.LittleEndian.Uint16(b[fvHeaderLenAt:]))
	if at+varStoreHdrSize > len(b) || !bytes.Equal(b[at:at+16], authVarStoreGUID) {
		return nil, ErrNotVarStore
	}
	end := at + int(binary.LittleEndian.Uint32(b[at+16:]))
	if end > len(b) {
		end = len(b)
	}
	vars := map[string]int{}
	for off := at + varStoreHdrSize; off+authVarHdrSize <= end; {
		h := b[off : off+authVarHdrSize]
		if binary.LittleEndian.Uint16(h) != varStartID {
			break
		}
		state := h[2]
		nameSize := int(binary.LittleEndian.Uint32(h[36:]))
		dataSize := int(binary.LittleEndian.Uint32(h[40:]))
		name := off + authVarHdrSize
		next := name + nameSize + dataSize
		if nameSize < 0 || dataSize < 0 || next > end || next < name {
			return nil, fmt.Errorf("variable at %#x runs past the store", off)
		}
		guid := h[44:60]
		if (state == varAdded || state == varAdded&varInDeletion) && (bytes.Equal(guid, globalVarGUID) || bytes.Equal(guid, imageSecurityGUID)) {
			vars[utf16Name(b[name:name+nameSize])] = dataSize
		}
		off = (next + 3) &^ 3
	}
	return vars, nil
}

func utf16Name(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// SecureBootKeys reports whether an OVMF vars file has Secure Boot's keys
// enrolled: a platform key (PK), a key exchange key (KEK) and an allowed
// signatures database (db). With a Secure Boot firmware build such NVRAM
// boots with Secure Boot on. Debian's OVMF_VARS_4M.ms.fd has them
// (Microsoft's KEK and db); the plain OVMF_VARS_4M.fd has none.
func SecureBootKeys(path string) (bool, error) {
	vars, err := SecureBootVars(path)
	if err != nil {
		return false, err
	}
	return vars["PK"] > 0 && vars["KEK"] > 0 && vars["db"] > 0, nil
}
