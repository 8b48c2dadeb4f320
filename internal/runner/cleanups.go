package runner

import "time"

// cleanups are what the runner undoes when it ends: each registered where
// the thing is made, run once, in reverse, each with the time by which the
// whole stop must be over (a step bounds its waits by it).
type cleanups struct{ fs []func(by time.Time) }

func (c *cleanups) add(f func(by time.Time)) { c.fs = append(c.fs, f) }

func (c *cleanups) run(by time.Time) {
	for i := len(c.fs) - 1; i >= 0; i-- {
		c.fs[i](by)
	}
	c.fs = nil
}

// until is what is left before by, at most d, never below zero.
func until(by time.Time, d time.Duration) time.Duration {
	return max(0, min(d, time.Until(by)))
}

// waitBy waits for ch until by.
func waitBy(ch <-chan struct{}, by time.Time) bool {
	t := time.NewTimer(until(by, time.Until(by)))
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
}
