// Package kvmdev proves that a descriptor is a working KVM device: the one
// check the broker makes before it grants a descriptor and the runner makes
// on the descriptor it received (or opened) before QEMU gets it.
package kvmdev

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// KVM ioctls (linux/kvm.h): _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01).
const (
	getAPIVersion = 0xAE00
	createVM      = 0xAE01
	// APIVersion is the only KVM API version Linux has ever answered.
	APIVersion = 12
)

// ErrNotKVM: the descriptor does not answer KVM_GET_API_VERSION as KVM.
var ErrNotKVM = errors.New("not a KVM device")

// CreateError is a KVM device that answers but cannot create a VM;
// Errno tells why (EBUSY: another hypervisor holds VT-x/AMD-V).
type CreateError struct{ Errno error }

func (e *CreateError) Error() string { return fmt.Sprintf("KVM_CREATE_VM: %v", e.Errno) }
func (e *CreateError) Unwrap() error { return e.Errno }

// Probe checks f: the API version, then a test VM created and closed at
// once, which is what fails where VT-x/AMD-V is off or taken.
func Probe(f *os.File) error {
	fd := int(f.Fd())
	v, err := unix.IoctlRetInt(fd, getAPIVersion)
	if err != nil || v != APIVersion {
		return fmt.Errorf("%w: KVM_GET_API_VERSION answers %d (%v), not %d", ErrNotKVM, v, err, APIVersion)
	}
	vm, err := unix.IoctlRetInt(fd, createVM)
	if err != nil {
		return &CreateError{Errno: err}
	}
	unix.Close(vm)
	return nil
}
