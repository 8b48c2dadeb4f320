package broker

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/fdpass"
)

// A TAP's descriptor lets its holder change the TAP's MAC without any
// capability. The bridge's own MAC is pinned and the port locked to the
// VM's MAC, but a changed TAP is still a changed port; the broker watches
// its TAPs over netlink and ends the lease of one whose MAC, owner or
// persistence changes: the TAP is removed, and the audit says why.
type tapWatch struct {
	want  tapState
	uid   int
	end   func()
	ended string
}

// changedTAP is a uid's wait after the broker ended its lease.
type changedTAP struct {
	until time.Time
	why   string
}

// rescanEvery is how often the watched TAPs are also read afresh: an
// event the kernel could not queue (a full socket buffer) is not missed
// for longer.
const rescanEvery = 2 * time.Second

// watchTAPs follows link changes until ctx ends.
func (b *Broker) watchTAPs(ctx context.Context) error {
	ch := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribe(ch, ctx.Done()); err != nil {
		return err
	}
	go func() {
		for u := range ch {
			if u.Header.Type != unix.RTM_DELLINK { // removed: its lease ends with it anyway
				b.check(u.Link)
			}
		}
	}()
	go func() {
		t := time.NewTicker(rescanEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			b.mu.Lock()
			idx := make([]int, 0, len(b.watches))
			for i := range b.watches {
				idx = append(idx, i)
			}
			b.mu.Unlock()
			for _, i := range idx {
				if l, err := netlink.LinkByIndex(i); err == nil {
					b.check(l)
				}
			}
		}
	}()
	return nil
}

// check ends the lease of a watched TAP that changed.
func (b *Broker) check(l netlink.Link) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if w := b.watches[l.Attrs().Index]; w != nil && w.ended == "" {
		if w.ended = changed(w.want, l); w.ended != "" {
			b.waits[w.uid] = changedTAP{until: time.Now().Add(b.cfg.ChangedTAPWait), why: w.ended}
			w.end()
		}
	}
}

func (b *Broker) watch(g *grant, uid int, end func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.watches[g.tapIndex] = &tapWatch{want: g.tapState, uid: uid, end: end}
}

// changedWait refuses a TAP to a uid whose lease the broker ended for a
// changed TAP, until its wait is over.
func (b *Broker) changedWait(uid int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	w, ok := b.waits[uid]
	switch left := time.Until(w.until); {
	case !ok:
		return nil
	case left <= 0:
		delete(b.waits, uid)
		return nil
	default:
		return fmt.Errorf("no TAP for uid %d until %s: the broker ended its lease for a changed TAP (%s)",
			uid, w.until.UTC().Format(time.RFC3339), w.why)
	}
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

// changed says how a leased TAP differs from what the broker made, or "".
func changed(want tapState, l netlink.Link) string {
	got := stateOf(l)
	name := l.Attrs().Name
	switch {
	case !bytes.Equal(got.mac, want.mac):
		return fmt.Sprintf("tap %s changed its MAC from %s to %s: lease ended by the broker", name, want.mac, got.mac)
	case got.owner != want.owner || got.group != want.group:
		return fmt.Sprintf("tap %s changed its owner from %d:%d to %d:%d: lease ended by the broker", name, int32(want.owner), int32(want.group), int32(got.owner), int32(got.group))
	case got.persist != want.persist:
		return fmt.Sprintf("tap %s was made persistent: lease ended by the broker", name)
	}
	return ""
}

// tapStats reads the counters of the leased TAP at index; a lease without
// a TAP has none.
func tapStats(index int) (*fdpass.TAPStats, error) {
	if index == 0 {
		return nil, fmt.Errorf("this lease has no TAP")
	}
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return nil, fmt.Errorf("the lease's TAP: %v", err)
	}
	s := l.Attrs().Statistics
	if s == nil {
		return nil, fmt.Errorf("the kernel gave no counters for %s", l.Attrs().Name)
	}
	return &fdpass.TAPStats{RxBytes: s.RxBytes, RxPackets: s.RxPackets, RxErrors: s.RxErrors, RxDropped: s.RxDropped,
		TxBytes: s.TxBytes, TxPackets: s.TxPackets, TxErrors: s.TxErrors, TxDropped: s.TxDropped}, nil
}
