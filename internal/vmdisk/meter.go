package vmdisk

import (
	"fmt"
	"io"
	"time"
)

// meter counts the bytes of a copy, logs how far it has come every tenth
// (every 64 MiB when the total is unknown), and holds the copy to a rate.
type meter struct {
	what     string
	total, n int64
	next     int64
	rate     int64 // bytes a second; 0: as fast as it goes
	began    time.Time
	log      io.Writer
}

func newMeter(what string, total, rate int64, log io.Writer) *meter {
	return &meter{what: what, total: total, rate: rate, began: time.Now(), log: log}
}

func (m *meter) add(n int) {
	m.n += int64(n)
	if m.n >= m.next || (n > 0 && m.n == m.total) {
		if m.total > 0 {
			fmt.Fprintf(m.log, "%s: %3d%% (%d of %d bytes)\n", m.what, m.n*100/m.total, m.n, m.total)
			m.next = (m.n*10/m.total + 1) * m.total / 10 // the next tenth
		} else {
			fmt.Fprintf(m.log, "%s: %d bytes\n", m.what, m.n)
			m.next = m.n + 64<<20
		}
	}
	if m.rate > 0 {
		due := m.began.Add(time.Duration(float64(m.n) / float64(m.rate) * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
	}
}

type meteredReader struct {
	r io.Reader
	m *meter
}

func (r *meteredReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.m.add(n)
	return n, err
}
