package runner

import (
	"log/slog"
	"time"
)

// phases logs, at debug level, how long each step of a start took and the
// time since the runner began: where a slow start goes.
type phases struct {
	log         *slog.Logger
	began, last time.Time
}

func newPhases(log *slog.Logger) *phases {
	now := time.Now()
	return &phases{log: log, began: now, last: now}
}

func (p *phases) done(name string) {
	now := time.Now()
	p.log.Debug("phase", "phase", name, "took_ms", ms(now.Sub(p.last)), "since_start_ms", ms(now.Sub(p.began)))
	p.last = now
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
