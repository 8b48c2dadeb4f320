package config

import (
	"strings"
	"testing"
)

// FuzzFromEnv feeds arbitrary environments (KEY=VALUE lines) to FromEnv,
// Validate and the memory decision: whatever the input, no panic, and every
// problem is an *Error naming a variable of the table.
func FuzzFromEnv(f *testing.F) {
	f.Add("VM_NAME=web-1\nVM_MEMORY=2G\nPORTS=22,8080:80,53/udp\n", int64(2<<30))
	f.Add("VM_NAME=a/b\nVM_CPUS=-1\nDISK_SIZE=1Q\nQEMU_ARGS=-sandbox off \"x\n", int64(0))
	f.Add("VM_NAME=x\nNET_MODE=tap\nTAP_ADDR=10.0.3.1\nSHUTDOWN_TIMEOUT=-5s\n", int64(1))
	f.Add("VM_NAME=..\nIMAGE_PATH=../../etc/shadow\nKVM_BROKER=off\n", int64(-1))
	f.Fuzz(func(t *testing.T, env string, limit int64) {
		m := map[string]string{}
		for _, line := range strings.Split(env, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				m[k] = v
			}
		}
		c := FromEnv(func(k string) string { return m[k] })
		for _, e := range unjoin(c.Validate()) {
			ce, ok := e.(*Error)
			if !ok {
				t.Fatalf("problem %v is not an *Error", e)
			}
			known := false
			for _, v := range Variables {
				known = known || v == ce.Var
			}
			if !known {
				t.Fatalf("problem names %q, not a variable of the table", ce.Var)
			}
		}
		c.GuestMemoryMiB(limit)
	})
}
