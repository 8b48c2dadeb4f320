// Command guestbench runs in the test guest (scripts/guest-fixture.sh puts
// it in the initramfs; swarmvm.diskbench=MIB starts it) and measures the
// guest's disk with direct I/O, as the guest sees it: sequential writes and
// reads of MIB MiB in 4 MiB blocks, then 4 KiB writes and reads at random
// places in that range from 8 threads at once; each of the four passes
// three times, and the median counts (one pass of a fast disk is short
// enough for a moment's noise to move it). It prints one line:
//
//	SWARMVM-GUEST-DISK mib=… write_s=… read_s=… randwrite_iops=… randread_iops=…
//
// Static, standard library only: the guest has busybox and nothing else.
package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
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
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: guestbench DEVICE MIB"))
	}
	mib, err := strconv.Atoi(os.Args[2])
	if err != nil || mib < 4 {
		fail(fmt.Errorf("MIB %q: want a number of MiB, at least 4", os.Args[2]))
	}
	f, err := os.OpenFile(os.Args[1], os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		fail(err)
	}
	size := int64(mib) << 20
	w := median3(func() error { return seq(f, size, true) })
	r := median3(func() error { return seq(f, size, false) })
	rw := median3(func() error { return random(f, size, true) })
	rr := median3(func() error { return random(f, size, false) })
	fmt.Printf("SWARMVM-GUEST-DISK mib=%d write_s=%.3f read_s=%.3f randwrite_iops=%.0f randread_iops=%.0f\n",
		mib, w, r, randOps/rw, randOps/rr)
}

// median3 is the median of three timed passes.
func median3(run func() error) float64 {
	t := []float64{timed(run), timed(run), timed(run)}
	slices.Sort(t)
	return t[1]
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

func seq(f *os.File, size int64, write bool) error {
	b := aligned(seqBlock, 'B')
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
			b := aligned(randBlock, byte('a'+t))
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
