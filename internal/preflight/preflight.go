// Package preflight checks, before QEMU starts, everything that would make
// it fail in a way an operator cannot read from QEMU's own message: the KVM
// device, the firmware, the disk and the storage folders. Each check returns
// a Finding in the words of the troubleshooting table: the symptom an
// operator sees, its cause on this node, and the fix.
package preflight

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// Class groups findings by what they block; the runner turns a failed
// class into its exit code.
type Class string

// Classes of finding.
const (
	ClassKVM     Class = "kvm"
	ClassStorage Class = "storage"
	ClassQEMU    Class = "qemu"
	ClassNet     Class = "net"
	ClassConfig  Class = "config"
)

// Finding is the result of one check.
type Finding struct {
	Name    string // what was checked, e.g. "kvm device"
	Class   Class
	OK      bool
	Detail  string // for a pass: what was found
	Symptom string // for a failure: what the operator sees
	Cause   string
	Fix     string
}

func pass(name string, class Class, format string, args ...any) Finding {
	return Finding{Name: name, Class: class, OK: true, Detail: fmt.Sprintf(format, args...)}
}

func fail(name string, class Class, symptom, cause, fix string) Finding {
	return Finding{Name: name, Class: class, Symptom: symptom, Cause: cause, Fix: fix}
}

// Error is a failed finding as an error: "symptom: cause — fix".
func (f Finding) Error() string {
	return f.Symptom + ": " + f.Cause + " — " + f.Fix
}

// String renders a finding for logs and the doctor's table.
func (f Finding) String() string {
	if f.OK {
		return fmt.Sprintf("ok    %-16s %s", f.Name, f.Detail)
	}
	return fmt.Sprintf("FAIL  %-16s symptom: %s\n      %-16s cause:   %s\n      %-16s fix:     %s", f.Name, f.Symptom, "", f.Cause, "", f.Fix)
}

// Failed returns the findings that did not pass.
func Failed(fs []Finding) []Finding {
	var out []Finding
	for _, f := range fs {
		if !f.OK {
			out = append(out, f)
		}
	}
	return out
}

// who describes the process's credentials, for messages about access.
func who() string {
	groups, _ := os.Getgroups()
	g := make([]string, len(groups))
	for i, x := range groups {
		g[i] = fmt.Sprint(x)
	}
	s := fmt.Sprintf("uid %d gid %d", os.Geteuid(), os.Getegid())
	if len(g) > 0 {
		s += " groups " + strings.Join(g, ",")
	}
	return s
}

// owner describes a file's owner and mode.
func owner(fi os.FileInfo) string {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return fmt.Sprintf("owner %d:%d mode %s", st.Uid, st.Gid, fi.Mode())
	}
	return "mode " + fi.Mode().String()
}
