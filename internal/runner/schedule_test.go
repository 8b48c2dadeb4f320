package runner

import (
	"testing"
	"time"
)

// When a scheduled backup is due: every after the last, at once without
// one; on a time of day, the next slot, or at once for a slot missed
// while the VM was stopped.
func TestNextBackup(t *testing.T) {
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	now := at("2026-12-05T12:00:00Z")
	for _, c := range []struct {
		name  string
		last  string
		every time.Duration
		atMin int
		hasAt bool
		want  string
	}{
		{"none yet", "", time.Hour, 0, false, "2026-12-05T12:00:00Z"},
		{"every hour", "2026-12-05T11:30:00Z", time.Hour, 0, false, "2026-12-05T12:30:00Z"},
		{"overdue", "2026-12-05T09:00:00Z", time.Hour, 0, false, "2026-12-05T12:00:00Z"},
		{"daily at 02:00, done today", "2026-12-05T02:00:05Z", 24 * time.Hour, 120, true, "2026-12-06T02:00:00Z"},
		{"daily at 02:00, missed today", "2026-12-04T02:00:05Z", 24 * time.Hour, 120, true, "2026-12-05T12:00:00Z"},
		{"daily at 14:00, before today's", "2026-12-04T14:00:05Z", 24 * time.Hour, 14 * 60, true, "2026-12-05T14:00:00Z"},
		{"daily at 14:00, missed yesterday's", "2026-12-03T14:00:05Z", 24 * time.Hour, 14 * 60, true, "2026-12-05T12:00:00Z"},
		{"every 6h from 01:00", "2026-12-05T07:00:01Z", 6 * time.Hour, 60, true, "2026-12-05T13:00:00Z"},
		{"every 1m from 00:00, none yet", "", time.Minute, 0, true, "2026-12-05T12:00:00Z"},
	} {
		var last time.Time
		if c.last != "" {
			last = at(c.last)
		}
		if got := nextBackup(last, now, c.every, c.atMin, c.hasAt); !got.Equal(at(c.want)) {
			t.Errorf("%s: %v, want %s", c.name, got.UTC(), c.want)
		}
	}
}
