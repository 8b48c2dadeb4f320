package poll

import (
	"context"
	"errors"
	"testing"
	"time"
)

// It asks at once, then at each interval, and stops at the first yes.
func TestUntilDone(t *testing.T) {
	n := 0
	err := Until(context.Background(), time.Millisecond, func(context.Context) (bool, error) {
		n++
		return n == 3, nil
	})
	if err != nil || n != 3 {
		t.Errorf("err %v after %d checks, want nil after 3", err, n)
	}
}

// A failing check ends the wait with its error, at once.
func TestUntilCheckFails(t *testing.T) {
	boom := errors.New("boom")
	n := 0
	err := Until(context.Background(), time.Hour, func(context.Context) (bool, error) { n++; return false, boom })
	if !errors.Is(err, boom) || n != 1 {
		t.Errorf("err %v after %d checks, want boom after 1", err, n)
	}
}

// A context that ends stops the wait between checks, with its error, and
// without waiting out the interval.
func TestUntilContextEnds(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	began := time.Now()
	err := Until(ctx, time.Hour, func(context.Context) (bool, error) { return false, nil })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err %v, want the deadline", err)
	}
	if waited := time.Since(began); waited > 10*time.Second {
		t.Errorf("waited %v for a 50ms context", waited)
	}
}

func TestSleep(t *testing.T) {
	if !Sleep(context.Background(), time.Millisecond) {
		t.Error("a whole sleep said it was cut short")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Error("a sleep in an ended context said it slept")
	}
}
