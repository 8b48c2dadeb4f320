package config

import (
	"fmt"
	"strings"
)

// splitArgs splits QEMU_ARGS like a POSIX shell would split plain words:
// whitespace separates, single quotes are literal, double quotes allow \" and
// \\. Nothing is expanded.
func splitArgs(s string) ([]string, error) {
	var (
		args  []string
		cur   strings.Builder
		inArg bool
		quote rune
	)
	rs := []rune(s)
	for i := 0; i < len(rs); i++ {
		r := rs[i]
		switch {
		case quote == '\'':
			if r == '\'' {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case quote == '"':
			switch {
			case r == '"':
				quote = 0
			case r == '\\' && i+1 < len(rs) && (rs[i+1] == '"' || rs[i+1] == '\\'):
				i++
				cur.WriteRune(rs[i])
			default:
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inArg = r, true
		case r == ' ' || r == '\t' || r == '\n':
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteRune(r)
			inArg = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated %c quote", quote)
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}

// owned are the QEMU options swarmvm sets itself: the sandbox, the
// accelerator, the machine, QMP and monitors, the firmware, and the options
// that would undo the privilege model. An operator's QEMU_ARGS may add
// devices, not replace these.
var owned = map[string]string{
	"sandbox": "the seccomp sandbox", "accel": "the accelerator", "enable-kvm": "the accelerator",
	"machine": "the machine and accelerator", "M": "the machine and accelerator",
	"qmp": "QMP", "qmp-pretty": "QMP", "mon": "QMP", "monitor": "QMP", "chardev": "QMP and the serial console",
	"bios": "the firmware", "pflash": "the firmware", "L": "the firmware",
	"add-fd": "the descriptors swarmvm hands QEMU", "runas": "the privilege model", "run-with": "the privilege model",
	"chroot": "the privilege model", "daemonize": "supervision", "pidfile": "supervision",
	"nodefaults": "the device set", "no-user-config": "the device set", "readconfig": "the device set",
	"incoming": "the run state", "S": "the run state", "name": "the VM name",
	"serial": "the serial console", "kernel": "KERNEL_PATH", "initrd": "INITRD_PATH", "append": "KERNEL_CMDLINE",
}

// checkQEMUArgs refuses extra arguments that would replace what swarmvm
// owns, and any that would turn image locking off (invariant 1).
func checkQEMUArgs(args []string) error {
	var problems []string
	for i, a := range args {
		if strings.HasPrefix(a, "-") {
			opt := strings.TrimLeft(a, "-")
			if what, ok := owned[opt]; ok {
				problems = append(problems, fmt.Sprintf("%s would replace %s", a, what))
			}
		}
		low := strings.ToLower(a)
		if strings.Contains(low, "locking=off") || strings.Contains(low, "locking=false") || strings.Contains(low, "share-rw=on") {
			problems = append(problems, fmt.Sprintf("argument %d (%q) turns image locking off", i+1, a))
		}
		if strings.Contains(low, "if=pflash") {
			problems = append(problems, fmt.Sprintf("argument %d (%q) would replace the firmware", i+1, a))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return nil
}
