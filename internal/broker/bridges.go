package broker

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// A bridge may be open to every allowed peer ("br0"), or only to peers
// whose uid is in given ranges ("br-a@10000000-10499999", "br-a@20001",
// repeatable): tenants whose VMs run in a uid range each get their own
// bridge, and no uid gets a TAP on another tenant's LAN.
type uidRange struct{ lo, hi int }

// bridgePolicy maps each allowed bridge to the uid ranges that may use it;
// nil ranges: every allowed peer.
type bridgePolicy map[string][]uidRange

// ParseBridges reads the broker's --bridge entries.
func ParseBridges(entries []string) (bridgePolicy, error) {
	p := bridgePolicy{}
	open := map[string]bool{}
	for _, e := range entries {
		name, uids, scoped := strings.Cut(e, "@")
		if name == "" {
			return nil, fmt.Errorf("--bridge %q: no bridge name", e)
		}
		if !scoped {
			if len(p[name]) > 0 { // given to uid ranges before: either order is refused
				return nil, fmt.Errorf("--bridge %q: %s is also given to uid ranges; give it uid ranges or none", e, name)
			}
			open[name] = true
			p[name] = nil
			continue
		}
		lo, hi, isRange := strings.Cut(uids, "-")
		if !isRange {
			hi = lo
		}
		l, err1 := strconv.Atoi(lo)
		h, err2 := strconv.Atoi(hi)
		if err1 != nil || err2 != nil || l < 0 || h < l {
			return nil, fmt.Errorf("--bridge %q: write NAME, NAME@UID or NAME@FIRST-LAST", e)
		}
		if open[name] {
			return nil, fmt.Errorf("--bridge %q: %s is also open to every peer; give it uid ranges or none", e, name)
		}
		p[name] = append(p[name], uidRange{l, h})
	}
	return p, nil
}

// allows says why uid may not have a TAP on bridge, or "" when it may.
func (p bridgePolicy) allows(bridge string, uid int) string {
	ranges, known := p[bridge]
	if !known {
		names := make([]string, 0, len(p))
		for n := range p {
			names = append(names, n)
		}
		slices.Sort(names)
		return fmt.Sprintf("bridge %q is not allowed by this broker (allowed: %s)", bridge, strings.Join(names, ", "))
	}
	if ranges == nil {
		return ""
	}
	for _, r := range ranges {
		if uid >= r.lo && uid <= r.hi {
			return ""
		}
	}
	return fmt.Sprintf("bridge %q is not open to uid %d (the broker gives it to other uids only)", bridge, uid)
}
