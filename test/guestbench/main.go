// Command guestbench runs in the test guest (scripts/guest-fixture.sh puts
// it in the initramfs; swarmvm.diskbench=MIB starts it) and measures the
// guest's disks with direct I/O, as the guest sees them: sequential writes
// and reads of MIB MiB in 4 MiB blocks, then 4 KiB writes and reads at
// random places in that range from 8 threads at once. Each of the four
// passes runs ROUNDS times on every disk, the disks taking turns within a
// round (a busy moment of the host then falls on all of them alike), and
// the median counts (one pass of a fast disk is short enough for a
// moment's noise to move it). It prints one line per disk:
//
//	SWARMVM-GUEST-DISK dev=… mib=… rounds=… write_s=… read_s=… randwrite_iops=… randread_iops=… write_all=…,… read_all=… randwrite_all=… randread_all=…
//
// the *_all fields being every round's figure in order, so that disks can
// be weighed round by round.
//
// Static, standard library only: the guest has busybox and nothing else.
package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	seqBlock  = 4 << 20
	randBlock = 4 << 10
	start     = 16 << 20 // the first 16 MiB hold the other tests' marks
	threads   = 8
	randOps   = 4096 // in all, per direction
)

func main() {
	if len(os.Args) < 4 {
		fail(fmt.Errorf("usage: guestbench MIB ROUNDS DEVICE..."))
	}
	mib, err := strconv.Atoi(os.Args[1])
	if err != nil || mib < 4 {
		fail(fmt.Errorf("MIB %q: want a number of MiB, at least 4", os.Args[1]))
	}
	rounds, err := strconv.Atoi(os.Args[2])
	if err != nil || rounds < 1 {
		fail(fmt.Errorf("ROUNDS %q: want a number, at least 1", os.Args[2]))
	}
	var disks []*os.File
	for _, dev := range os.Args[3:] {
		f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
		if err != nil {
			fail(err)
		}
		disks = append(disks, f)
	}
	size := int64(mib) << 20
	// The buffers are made once: the guest has little memory.
	seqBuf = aligned(seqBlock, 'B')
	for t := range randBufs {
		randBufs[t] = aligned(randBlock, byte('a'+t))
	}
	// secs[pass][disk][round]
	passes := []func(*os.File) error{
		func(f *os.File) error { return seq(f, size, true) },
		func(f *os.File) error { return seq(f, size, false) },
		func(f *os.File) error { return random(f, size, true) },
		func(f *os.File) error { return random(f, size, false) },
	}
	secs := make([][][]float64, len(passes))
	for p, pass := range passes {
		secs[p] = make([][]float64, len(disks))
		for r := range rounds {
			for i := range disks {
				d := (i + r) % len(disks) // who goes first changes each round
				secs[p][d] = append(secs[p][d], timed(func() error { return pass(disks[d]) }))
			}
			// a sign of life for whoever waits on the serial console
			fmt.Printf("SWARMVM-GUEST-DISK-PASS %d/%d round %d/%d\n", p+1, len(passes), r+1, rounds)
		}
	}
	for d, f := range disks {
		w, r, rw, rr := secs[0][d], secs[1][d], secs[2][d], secs[3][d]
		fmt.Printf("SWARMVM-GUEST-DISK dev=%s mib=%d rounds=%d write_s=%.3f read_s=%.3f randwrite_iops=%.0f randread_iops=%.0f write_all=%s read_all=%s randwrite_all=%s randread_all=%s\n",
			filepath.Base(f.Name()), mib, rounds, median(w), median(r), randOps/median(rw), randOps/median(rr),
			list(w, 1), list(r, 1), list(rw, randOps), list(rr, randOps))
	}
}

// median of a pass's seconds (the upper one of an even count).
func median(t []float64) float64 {
	t = slices.Sorted(slices.Values(t))
	return t[len(t)/2]
}

// list is each round's figure: seconds when per is 1, else per/seconds.
func list(t []float64, per float64) string {
	var s []string
	for _, x := range t {
		if per == 1 {
			s = append(s, strconv.FormatFloat(x, 'f', 3, 64))
		} else {
			s = append(s, strconv.FormatFloat(per/x, 'f', 0, 64))
		}
	}
	return strings.Join(s, ",")
}

func timed(run func() error) float64 {
	t := time.Now()
	if err := run(); err != nil {
		fail(err)
	}
	return time.Since(t).Seconds()
}

// aligned is a buffer direct I/O takes: page-aligned, from mmap.
func aligned(n int, fill byte) []byte {
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		fail(err)
	}
	for i := range b {
		b[i] = fill
	}
	return b
}

// The passes' buffers: one for the sequential passes, one per thread for
// the random ones.
var (
	seqBuf   []byte
	randBufs [threads][]byte
)

func seq(f *os.File, size int64, write bool) error {
	b := seqBuf
	for off := int64(0); off < size; off += seqBlock {
		var err error
		if write {
			_, err = f.WriteAt(b, start+off)
		} else {
			_, err = f.ReadAt(b, start+off)
		}
		if err != nil {
			return err
		}
	}
	if write {
		return f.Sync()
	}
	return nil
}

func random(f *os.File, size int64, write bool) error {
	var wg sync.WaitGroup
	errs := make(chan error, threads)
	for t := range threads {
		wg.Go(func() {
			b := randBufs[t]
			rng := rand.New(rand.NewPCG(uint64(t), 42))
			for range randOps / threads {
				off := start + rng.Int64N(size/randBlock)*randBlock
				var err error
				if write {
					_, err = f.WriteAt(b, off)
				} else {
					_, err = f.ReadAt(b, off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	if write {
		return f.Sync()
	}
	return nil
}

func fail(err error) {
	fmt.Println("SWARMVM-GUEST-DISK error=" + strconv.Quote(err.Error()))
	os.Exit(1)
}
