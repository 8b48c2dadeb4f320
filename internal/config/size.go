package config

import (
	"fmt"
	"strconv"
	"strings"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
	tib = int64(1) << 40
)

// ParseSize reads sizes the way QEMU's own options read them: a number with
// an optional K, M, G or T suffix (an "iB" or "B" after it is accepted), all
// binary. A bare number is taken in units of def, so VM_MEMORY=2048 means
// MiB as it does for -m, and DISK_SIZE=20 would mean bytes as for qemu-img.
//
// Exported so that a definition file's sizes are read the way the runner
// reads its variables.
func ParseSize(s string, def int64) (int64, error) {
	num := strings.ToUpper(strings.TrimSpace(s))
	unit := def
	if strings.HasSuffix(num, "B") {
		num, unit = strings.TrimSuffix(strings.TrimSuffix(num, "B"), "I"), 1
	}
	if n := len(num); n > 0 {
		if u, ok := map[byte]int64{'K': kib, 'M': mib, 'G': gib, 'T': tib}[num[n-1]]; ok {
			num, unit = num[:n-1], u
		}
	}
	if num == "" || strings.TrimLeft(num, "0123456789") != "" {
		return 0, fmt.Errorf("%q is not a size (write a whole number with K, M, G or T, e.g. 4G)", s)
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > (1<<50)/unit*1024 {
		return 0, fmt.Errorf("%q is out of range", s)
	}
	return n * unit, nil
}

// FormatMiB renders a MiB count the way an operator would write it.
func FormatMiB(m int64) string {
	if m%1024 == 0 {
		return fmt.Sprintf("%dG", m/1024)
	}
	return fmt.Sprintf("%dM", m)
}
