package broker

import (
	"bytes"
	"context"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A TAP's descriptor lets its holder change the TAP's MAC without any
// capability. The bridge's own MAC is pinned and the port locked to the
// VM's MAC, but a changed TAP is still a changed port; the broker watches
// its TAPs over netlink and ends the lease of one whose MAC or flags
// change: the TAP is removed, and the audit says why.
type tapWatch struct {
	want  tapState
	end   func()
	ended string
}

// watchTAPs follows link changes until ctx ends.
func (b *Broker) watchTAPs(ctx context.Context) error {
	ch := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribe(ch, ctx.Done()); err != nil {
		return err
	}
	go func() {
		for u := range ch {
			if u.Header.Type == unix.RTM_DELLINK {
				continue // removed: its lease ends with it anyway
			}
			a := u.Attrs()
			b.mu.Lock()
			w := b.watches[a.Index]
			if w != nil && w.ended == "" {
				switch {
				case !bytes.Equal(a.HardwareAddr, w.want.mac):
					w.ended = fmt.Sprintf("tap %s changed its MAC from %s to %s: lease ended by the broker", a.Name, w.want.mac, a.HardwareAddr)
				case a.Flags&watchedFlags != w.want.flags:
					w.ended = fmt.Sprintf("tap %s changed its flags from %v to %v: lease ended by the broker", a.Name, w.want.flags, a.Flags&watchedFlags)
				}
				if w.ended != "" {
					w.end()
				}
			}
			b.mu.Unlock()
		}
	}()
	return nil
}

func (b *Broker) watch(g *grant, end func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.watches[g.tapIndex] = &tapWatch{want: g.tapState, end: end}
}

func (b *Broker) unwatch(index int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.watches, index)
}

// endedBy says why the broker ended the lease of a TAP, or "".
func (b *Broker) endedBy(index int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if w := b.watches[index]; w != nil {
		return w.ended
	}
	return ""
}
