// Package heartbeat reads the test guest's heartbeat from its serial log
// (swarmvm.tick=1: SWARMVM-GUEST-TICK <boot id> <n> every 100 ms), which
// shows whether a guest that was moved kept running: its boot id stays and
// its counter goes on.
package heartbeat

import (
	"fmt"
	"regexp"
	"strconv"
)

var tickRE = regexp.MustCompile(`SWARMVM-GUEST-TICK ([0-9a-f-]{36}) ([0-9]+)`)

// Tick is one heartbeat.
type Tick struct {
	Boot string
	N    int
}

// Ticks is the serial log's heartbeats, in order.
func Ticks(serial string) []Tick {
	var out []Tick
	for _, m := range tickRE.FindAllStringSubmatch(serial, -1) {
		n, _ := strconv.Atoi(m[2])
		out = append(out, Tick{m[1], n})
	}
	return out
}

// Check says why the heartbeats in serial are not those of one boot, boot,
// whose counter only went on: at most one line may be lost, where the next
// runner's header line cut into it as two runners wrote the log.
func Check(serial, boot string) error {
	ts := Ticks(serial)
	for i, t := range ts {
		if t.Boot != boot {
			return fmt.Errorf("heartbeat %d is of boot %s, not %s: the guest rebooted", i+1, t.Boot, boot)
		}
		if i > 0 && (t.N <= ts[i-1].N || t.N > ts[i-1].N+2) {
			return fmt.Errorf("heartbeat %d after %d: the guest lost its state", t.N, ts[i-1].N)
		}
	}
	return nil
}
