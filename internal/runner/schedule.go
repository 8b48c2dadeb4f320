package runner

import (
	"bytes"
	"cmp"
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/swarmvm/swarmvm/internal/backup"
	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/status"
)

// BACKUP_EVERY: the runner backs its VM up into BACKUP_REPO (mounted into
// the task) on a schedule, with nobody at a terminal: the same online
// backup as swarmvm backup's job, asked for on the runner's own control
// socket. When the next backup is due is read from the repository itself
// (its newest complete backup's point), so that a backup missed while the
// VM was stopped runs soon after it starts, and a restarted runner keeps
// the rhythm. A failed backup is tried again after backupRetry.
const (
	scheduleGrace = 30 * time.Second // after the VM runs, before a missed backup
	backupRetry   = 5 * time.Minute
)

// nextBackup is when the next scheduled backup is due, given the point of
// the newest complete one (zero: none). Without a time of day, every
// after the last; with one (atMin minutes after midnight UTC), on the
// slots at that time and every after it: a slot passed since the last
// backup is due now.
func nextBackup(last, now time.Time, every time.Duration, atMin int, hasAt bool) time.Time {
	if !hasAt {
		if last.IsZero() {
			return now
		}
		return maxTime(last.Add(every), now)
	}
	day := now.UTC().Truncate(24 * time.Hour)
	anchor := day.Add(time.Duration(atMin) * time.Minute)
	k := now.Sub(anchor) / every
	if now.Before(anchor) {
		k-- // the slot before now is before the anchor
	}
	prev := anchor.Add(k * every)
	if last.Before(prev) {
		return now
	}
	return prev.Add(every)
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// backupStats are the VM's online backups since the runner started, for
// the metrics: a scheduled one's or a job's.
type backupStats struct {
	mu           sync.Mutex
	ok, failed   uint64
	lastOK       time.Time // the point of the newest one that succeeded
	lastDuration time.Duration
	next         time.Time // the next scheduled one, zero without a schedule
}

func (b *backupStats) done(r time.Time, took time.Duration, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		b.failed++
		return
	}
	b.ok++
	b.lastOK, b.lastDuration = r, took
}

func (b *backupStats) setNext(t time.Time) {
	b.mu.Lock()
	b.next = t
	b.mu.Unlock()
}

func (b *backupStats) read() (ok, failed uint64, lastOK, next time.Time, took time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ok, b.failed, b.lastOK, b.next, b.lastDuration
}

// scheduleBackups runs the VM's scheduled backups until ctx ends.
func (v *vm) scheduleBackups(ctx context.Context) {
	cfg := v.cfg
	atMin, hasAt := cfg.BackupAtMinutes()
	keep := backup.Keep{Last: cfg.BackupKeepLast, Daily: cfg.BackupKeepDaily, Weekly: cfg.BackupKeepWeekly}
	log := v.log.With("repo", cfg.BackupRepo)
	began := time.Now()
	var notBefore time.Time
	for {
		var last time.Time
		list, err := backup.List(cfg.BackupRepo, cfg.Name)
		if err != nil && !os.IsNotExist(err) && !strings.Contains(err.Error(), "no such file") {
			log.Warn("scheduled backups: the repository cannot be read; trying anyway", "err", err)
		}
		if len(list) > 0 {
			last = list[len(list)-1].Point
		}
		now := time.Now()
		due := nextBackup(last, now, cfg.BackupEvery, atMin, hasAt)
		due = maxTime(due, maxTime(began.Add(scheduleGrace), notBefore))
		v.backups.setNext(due)
		log.Info("next scheduled backup", "at", due.UTC().Format(time.RFC3339), "last", pointOf(last))
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(due)):
		}
		out := &lineLog{log: log}
		m, err := backup.Run(ctx, cfg, backup.Options{Repo: cfg.BackupRepo, Freeze: backup.DefaultFreeze, Node: cfg.NodeHostname, Img: v.img,
			FullEvery: cmp.Or(cfg.BackupFullEvery, backup.DefaultFullEvery)}, out)
		out.flush()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Error("scheduled backup failed; trying again later", status.Key, status.BackupFailed, status.AttrErr, err, "retry_in", backupRetry.String())
			notBefore = time.Now().Add(backupRetry)
			continue
		}
		notBefore = time.Time{}
		log.Info("scheduled backup in the repository", status.AttrBackup, m.ID, "mode", m.Mode, "consistency", m.Consistency)
		if keep != (backup.Keep{}) {
			pout := &lineLog{log: log.With("prune", true)}
			if _, err := backup.Prune(cfg.BackupRepo, cfg.Name, keep, false, pout); err != nil {
				log.Warn("pruning after the scheduled backup failed", "err", err)
			}
			pout.flush()
		}
	}
}

func pointOf(t time.Time) string {
	if t.IsZero() {
		return "none"
	}
	return t.UTC().Format(time.RFC3339)
}

// lineLog logs what a backup or a prune writes, a line at a time.
type lineLog struct {
	log *slog.Logger
	buf bytes.Buffer
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.buf.Write(p)
	for {
		line, err := l.buf.ReadString('\n')
		if err != nil {
			l.buf.WriteString(line) // not a whole line yet
			return len(p), nil
		}
		l.log.Info("backup: " + strings.TrimSpace(line))
	}
}

func (l *lineLog) flush() {
	if s := strings.TrimSpace(l.buf.String()); s != "" {
		l.log.Info("backup: " + s)
	}
	l.buf.Reset()
}

// scheduled reports whether the configuration has a backup schedule.
func scheduled(cfg config.Config) bool { return cfg.BackupEvery > 0 && cfg.BackupRepo != "" }
