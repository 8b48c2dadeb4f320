package kvmdev

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// What answers the ioctls wrongly is refused as not KVM: a regular file
// (memfd), a character device that is another device.
func TestProbeRefusesOtherDescriptors(t *testing.T) {
	fd, err := unix.MemfdCreate("not-kvm", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	memfd := os.NewFile(uintptr(fd), "memfd")
	defer memfd.Close()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	for _, f := range []*os.File{memfd, null} {
		if err := Probe(f); !errors.Is(err, ErrNotKVM) {
			t.Errorf("%s: %v, want ErrNotKVM", f.Name(), err)
		}
	}
}

func TestProbeKVM(t *testing.T) {
	kvmtest.Require(t)
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Probe(f); err != nil {
		t.Fatalf("Probe(/dev/kvm): %v", err)
	}
}
