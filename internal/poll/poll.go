// Package poll waits for a condition that nothing announces: a task to
// run, a job to end, a peer to listen, a lock to go. It is the one poll
// loop: it asks at once, then at every interval, and stops when the
// answer is yes, when asking fails, or when the context ends.
package poll

import (
	"context"
	"time"
)

// Until calls check at once and then every interval until check reports
// done or an error, or ctx ends. It returns check's error, or ctx's when
// ctx ended first (context.DeadlineExceeded for a timeout); a check under
// way when ctx ends gets the same ctx and ends as it does.
func Until(ctx context.Context, every time.Duration, check func(context.Context) (done bool, err error)) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		done, err := check(ctx)
		if err != nil || done {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Sleep waits for d or until ctx ends, whichever is first, and says
// whether the whole d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
