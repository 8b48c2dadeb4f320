package broker

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// BenchmarkGrant: a KVM grant as a runner gets it (connect, request,
// descriptor received, lease held, then closed), one client at a time and
// with 100 clients at once; it prints p50 and p99. The descriptor is the
// KVM device, probed with a test VM as for a real grant, where the host
// has one, else a stand-in (a memfd): then the figures are the broker's and
// the socket's, without the device's probe.
func BenchmarkGrant(b *testing.B) {
	open, what := func(string) (*os.File, error) {
		fd, err := unix.MemfdCreate(standInName, unix.MFD_CLOEXEC)
		return os.NewFile(uintptr(fd), standInName), err
	}, "a stand-in descriptor: this host has no /dev/kvm"
	if kvmtest.Present() {
		open, what = openKVM, "/dev/kvm, probed with a test VM each"
	}
	f := startBrokerWith(b, nil, open)
	for i := 0; i < b.N; i++ {
		seq := grants(b, f, 1, 500)
		conc := grants(b, f, 100, 10)
		fmt.Printf("broker KVM grants (%s): sequential p50 %.3f ms p99 %.3f ms (%d); 100 clients at once p50 %.3f ms p99 %.3f ms (%d), no errors\n",
			what, pct(seq, 50), pct(seq, 99), len(seq), pct(conc, 50), pct(conc, 99), len(conc))
		b.ReportMetric(pct(conc, 99), "p99-ms@100")
	}
}

// grants runs clients goroutines that each ask rounds times, and returns
// every grant's time in ms; any error fails.
func grants(b *testing.B, f *fixture, clients, rounds int) []float64 {
	var (
		mu  sync.Mutex
		out []float64
		wg  sync.WaitGroup
	)
	start := make(chan struct{})
	for c := 0; c < clients; c++ {
		wg.Go(func() {
			<-start
			for r := 0; r < rounds; r++ {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				t0 := time.Now()
				l, err := fdpass.Ask(ctx, f.cfg.Socket, fdpass.Request{Version: fdpass.Version, VM: fmt.Sprintf("bench-%d", c), KVM: true})
				d := time.Since(t0)
				cancel()
				if err != nil {
					b.Errorf("grant: %v", err)
					return
				}
				l.Close()
				mu.Lock()
				out = append(out, float64(d.Microseconds())/1000)
				mu.Unlock()
			}
		})
	}
	close(start)
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	return out
}

func pct(xs []float64, p int) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}
