package config

import (
	"fmt"
	"regexp"
	"slices"
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

// QEMU_ARGS passes through an allow-list: options that add harmless
// devices or set guest-visible details, each with its value checked. What
// is not here is refused with the reason, however it is spelled — a
// deny-list missed the JSON form of -blockdev, share-rw=yes, -global,
// -debugcon onto the VM's own disk and -gdb. Disks, networks, firmware,
// monitors and the accelerator come from the runner's own variables.
var passOptions = map[string]func(string) string{
	"device":     deviceValue,
	"smbios":     noFiles,
	"rtc":        keysOnly("base", "clock", "driftfix"),
	"boot":       keysOnly("order", "once", "menu", "strict", "reboot-timeout"),
	"uuid":       func(v string) string { return matches(uuidRE, v, "a UUID") },
	"overcommit": keysOnly("mem-lock", "cpu-pm"),
	"vga":        oneOf("none", "std", "virtio", "qxl", "cirrus"),
	"object":     objectValue,
	"fw_cfg":     fwCfgValue,
}

// passFlags are the options without a value that pass through.
var passFlags = map[string]bool{"no-reboot": true, "no-shutdown": true, "usb": true}

// passDevices are the device drivers an operator may add: entropy, memory
// ballooning, input, USB controllers, a watchdog, sound. None of them
// reaches a file, a network or a character device by itself.
var passDevices = map[string]bool{
	"virtio-rng-pci": true, "virtio-balloon-pci": true, "virtio-keyboard-pci": true, "virtio-tablet-pci": true,
	"virtio-mouse-pci": true, "qemu-xhci": true, "nec-usb-xhci": true, "usb-ehci": true, "usb-tablet": true,
	"usb-kbd": true, "usb-mouse": true, "i6300esb": true, "intel-hda": true, "ich9-intel-hda": true,
	"pvpanic": true, "virtio-iommu-pci": true,
}

// linking are device properties that attach a device to something outside
// itself (a drive, a chardev, a backend, a file).
var linking = []string{"drive", "chardev", "netdev", "memdev", "rng", "file", "romfile", "fd", "share-rw", "audiodev", "iothread", "backend"}

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

func deviceValue(v string) string {
	parts := strings.Split(v, ",")
	if !passDevices[parts[0]] {
		return fmt.Sprintf("device %q is not one swarmvm passes through (entropy, balloon, input, USB, watchdog, sound)", parts[0])
	}
	for _, p := range parts[1:] {
		k, _, _ := strings.Cut(p, "=")
		for _, l := range linking {
			if k == l || strings.HasSuffix(k, "."+l) {
				return fmt.Sprintf("property %q attaches the device to something outside it", k)
			}
		}
	}
	return ""
}

func objectValue(v string) string {
	typ, _, _ := strings.Cut(v, ",")
	if typ != "rng-builtin" {
		return fmt.Sprintf("object %q is not one swarmvm passes through (rng-builtin)", typ)
	}
	return noFiles(v)
}

func fwCfgValue(v string) string {
	for _, p := range strings.Split(v, ",") {
		k, _, _ := strings.Cut(p, "=")
		if k != "name" && k != "string" {
			return fmt.Sprintf("%q: only name= and string= (a file would be read by QEMU)", k)
		}
	}
	return ""
}

func noFiles(v string) string {
	if strings.Contains(v, "file=") || strings.Contains(v, "path=") {
		return "names a file, which QEMU would open"
	}
	return ""
}

func keysOnly(keys ...string) func(string) string {
	return func(v string) string {
		for _, p := range strings.Split(v, ",") {
			k, _, ok := strings.Cut(p, "=")
			if !ok && len(keys) > 0 {
				k = keys[0] // the implied first key, as QEMU reads "-boot c"
			}
			if !slices.Contains(keys, k) {
				return fmt.Sprintf("%q is not one of %s", k, strings.Join(keys, ", "))
			}
		}
		return ""
	}
}

func oneOf(vals ...string) func(string) string {
	return func(v string) string {
		if !slices.Contains(vals, v) {
			return fmt.Sprintf("%q is not one of %s", v, strings.Join(vals, ", "))
		}
		return ""
	}
}

func matches(re *regexp.Regexp, v, what string) string {
	if !re.MatchString(v) {
		return fmt.Sprintf("%q is not %s", v, what)
	}
	return ""
}

// checkQEMUArgs lets through only the allowed options, each with a value
// that passes its check, and says why anything else is refused.
func checkQEMUArgs(args []string) error {
	var problems []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		opt := strings.TrimLeft(a, "-")
		if !strings.HasPrefix(a, "-") || opt == "" {
			problems = append(problems, fmt.Sprintf("%q is not an option (options start with -)", a))
			continue
		}
		if passFlags[opt] {
			continue
		}
		check, ok := passOptions[opt]
		if !ok {
			problems = append(problems, fmt.Sprintf("%s is not one of the options swarmvm passes through (%s): disks, networks, firmware, monitors and the accelerator come from the runner's own variables", a, passList()))
			continue
		}
		if i+1 >= len(args) {
			problems = append(problems, a+" needs a value")
			continue
		}
		i++
		if why := check(args[i]); why != "" {
			problems = append(problems, fmt.Sprintf("%s %s: %s", a, args[i], why))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return nil
}

func passList() string {
	var out []string
	for k := range passOptions {
		out = append(out, "-"+k)
	}
	for k := range passFlags {
		out = append(out, "-"+k)
	}
	slices.Sort(out)
	return strings.Join(out, " ")
}
