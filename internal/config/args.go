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
// Values are read as QEMU reads them (optValues): a check sees what QEMU
// will act on, not a spelling of it.
var passOptions = map[string]func(string) string{
	"device": deviceValue,
	"smbios": keysOnly("type", "vendor", "version", "date", "release", "uefi", "manufacturer", "product", "serial", "uuid", "sku",
		"family", "asset", "location", "part", "speed", "value", "sock_pfx", "processor-family", "processor-id", "max-speed",
		"current-speed", "loc_pfx", "bank"),
	"rtc":        keysOnly("base", "clock", "driftfix"),
	"boot":       keysOnly("order", "once", "menu", "strict", "reboot-timeout", "splash-time"),
	"uuid":       func(v string) string { return matches(uuidRE, v, "a UUID") },
	"overcommit": keysOnly("mem-lock", "cpu-pm"),
	"vga":        oneOf("none", "std", "virtio", "qxl", "cirrus"),
	"object":     objectValue,
	"fw_cfg":     keysOnly("name", "string"),
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
// itself (a drive, a chardev, a backend), or name a file QEMU would open.
var linking = []string{"drive", "chardev", "netdev", "memdev", "rng", "file", "filename", "romfile", "fd", "path", "dir",
	"share-rw", "audiodev", "iothread", "backend", "sock", "socket", "frudatafile", "x-igd-opregion", "bootfile"}

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// opt is one key=value of an option's value, as QEMU reads it.
type opt struct{ key, value string }

// optValues reads an option's value as QEMU's option parser does: pairs
// separated by commas, ",," a comma within a value, a first element
// without "=" the implied key's value (a device's driver, an object's
// type), a later bare "key" as key=on ("nokey" as key=off). A value in
// JSON, or a key given twice (QEMU would take the last), is refused: what
// is checked must be what QEMU acts on.
func optValues(v, implied string) ([]opt, string) {
	if strings.HasPrefix(strings.TrimSpace(v), "{") {
		return nil, "a JSON value: write key=value pairs"
	}
	var out []opt
	seen := map[string]bool{}
	for i, part := range splitOpts(v) {
		k, val, hasEq := strings.Cut(part, "=")
		switch {
		case !hasEq && i == 0 && implied != "":
			k, val = implied, part
		case !hasEq && strings.HasPrefix(k, "no") && len(k) > 2:
			k, val = k[2:], "off"
		case !hasEq:
			val = "on"
		}
		if seen[k] {
			return nil, fmt.Sprintf("%q is given twice (QEMU takes the last): give each key once", k)
		}
		seen[k] = true
		out = append(out, opt{k, val})
	}
	return out, ""
}

// splitOpts splits at single commas; ",," is a literal comma.
func splitOpts(v string) []string {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] != ',' {
			cur.WriteByte(v[i])
			continue
		}
		if i+1 < len(v) && v[i+1] == ',' {
			cur.WriteByte(',')
			i++
			continue
		}
		parts = append(parts, cur.String())
		cur.Reset()
	}
	return append(parts, cur.String())
}

// deviceValue: a driver from passDevices, given as the first element (a
// driver= key would be a second spelling), and no property that links it.
func deviceValue(v string) string {
	opts, why := optValues(v, "driver")
	if why != "" {
		return why
	}
	if v == "" || opts[0].key != "driver" || strings.HasPrefix(v, "driver=") {
		return "the driver comes first, without driver= (e.g. virtio-rng-pci,id=rng0)"
	}
	if !passDevices[opts[0].value] {
		return fmt.Sprintf("device %q is not one swarmvm passes through (entropy, balloon, input, USB, watchdog, sound)", opts[0].value)
	}
	for _, o := range opts[1:] {
		if o.key == "driver" {
			return `"driver" is given twice (QEMU takes the last): give each key once`
		}
		if linked(o.key) {
			return fmt.Sprintf("property %q attaches the device to something outside it", o.key)
		}
	}
	return ""
}

func linked(key string) bool {
	for _, l := range linking {
		if key == l || strings.HasSuffix(key, "."+l) {
			return true
		}
	}
	return false
}

// objectValue: rng-builtin only, given as the first element (qom-type=
// would be a second spelling), with an id and nothing that names a file.
func objectValue(v string) string {
	opts, why := optValues(v, "qom-type")
	if why != "" {
		return why
	}
	if v == "" || opts[0].key != "qom-type" || strings.HasPrefix(v, "qom-type=") {
		return "the object's type comes first, without qom-type= (rng-builtin,id=rng0)"
	}
	if opts[0].value != "rng-builtin" {
		return fmt.Sprintf("object %q is not one swarmvm passes through (rng-builtin)", opts[0].value)
	}
	for _, o := range opts[1:] {
		if o.key != "id" {
			return fmt.Sprintf("%q: rng-builtin takes an id only", o.key)
		}
	}
	return ""
}

func keysOnly(keys ...string) func(string) string {
	return func(v string) string {
		implied := ""
		if len(keys) > 0 {
			implied = keys[0] // as QEMU reads "-boot c"
		}
		opts, why := optValues(v, implied)
		if why != "" {
			return why
		}
		for _, o := range opts {
			if !slices.Contains(keys, o.key) {
				return fmt.Sprintf("%q is not one of %s", o.key, strings.Join(keys, ", "))
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
