package runner

import (
	"os"
	"strconv"
	"strings"
)

// memoryLimit returns the container's memory limit in bytes, 0 when there
// is none. It reads cgroup v2's memory.max, else cgroup v1's
// memory.limit_in_bytes (whose "no limit" is a huge page-rounded number).
func memoryLimit(root string) int64 {
	for _, p := range []string{root + "/memory.max", root + "/memory/memory.limit_in_bytes"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 || n >= 1<<60 {
			return 0
		}
		return n
	}
	return 0
}
