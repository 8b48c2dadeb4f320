// Command guestwriter runs in the test guest (scripts/guest-fixture.sh puts
// it in the initramfs) and proves what a backup holds.
//
//	guestwriter write DEV OFFSET_MIB BLOCKS
//
// writes 1 MiB blocks to DEV from OFFSET_MIB on, block 0 to BLOCKS-1, then
// again from 0 in the next round, without pause and forever. Every 64-byte
// line of a block says its round and number, so a block that is partly of
// one round and partly of another (a cluster a backup missed) is seen.
// Each write is direct and durable (O_DIRECT|O_DSYNC) before it prints
//
//	SWARMVM-GUEST-WROTE round=R block=K
//
// so that a line printed before a backup's point is in the backup.
//
//	guestwriter verify DEV OFFSET_MIB BLOCKS
//
// reads the blocks back and prints the last block written, the one a
// backup's point fell after:
//
//	SWARMVM-GUEST-VERIFY ok round=R block=K
//
// or SWARMVM-GUEST-VERIFY bad … when a block is torn, of the wrong number,
// or the rounds do not run as one writer leaves them (a run of round R,
// then the rest of round R-1).
//
// Static, standard library only: the guest has busybox and nothing else.
package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"unsafe"
)

const (
	block = 1 << 20
	line  = 64
)

func main() {
	if len(os.Args) != 5 {
		fail("usage: guestwriter write|verify DEV OFFSET_MIB BLOCKS")
	}
	off, err1 := strconv.Atoi(os.Args[3])
	n, err2 := strconv.Atoi(os.Args[4])
	if err1 != nil || err2 != nil || off < 0 || n < 1 {
		fail("OFFSET_MIB and BLOCKS: numbers, BLOCKS at least 1")
	}
	flag := os.O_RDONLY
	if os.Args[1] == "write" {
		flag = os.O_RDWR | syscall.O_DSYNC
	}
	f, err := os.OpenFile(os.Args[2], flag|syscall.O_DIRECT, 0)
	if err != nil {
		fail(err.Error())
	}
	buf := aligned(block)
	switch os.Args[1] {
	case "write":
		write(f, buf, int64(off)<<20, n)
	case "verify":
		verify(f, buf, int64(off)<<20, n)
	default:
		fail("write or verify")
	}
}

// aligned is a buffer O_DIRECT accepts (4 KiB aligned).
func aligned(size int) []byte {
	b := make([]byte, size+4096)
	a := int(uintptr(unsafe.Pointer(&b[0])) & 4095)
	if a != 0 {
		a = 4096 - a
	}
	return b[a : a+size]
}

func header(round, k int) []byte {
	h := fmt.Sprintf("SWARMVM-BLOCK round=%08d block=%04d", round, k)
	return append([]byte(h), append(bytes.Repeat([]byte{'.'}, line-1-len(h)), '\n')...)
}

func write(f *os.File, buf []byte, off int64, n int) {
	for round := 1; ; round++ {
		for k := 0; k < n; k++ {
			h := header(round, k)
			for i := 0; i < block; i += line {
				copy(buf[i:], h)
			}
			if _, err := f.WriteAt(buf, off+int64(k)*block); err != nil {
				fail(err.Error())
			}
			fmt.Printf("SWARMVM-GUEST-WROTE round=%d block=%d\n", round, k)
		}
	}
}

func verify(f *os.File, buf []byte, off int64, n int) {
	rounds := make([]int, n)
	for k := 0; k < n; k++ {
		if _, err := f.ReadAt(buf, off+int64(k)*block); err != nil {
			fail(err.Error())
		}
		first := buf[:line]
		if bytes.Equal(first, make([]byte, line)) {
			if !bytes.Equal(buf, make([]byte, block)) {
				bad("block %d: zeros, then data", k)
			}
			continue // never written
		}
		for i := line; i < block; i += line {
			if !bytes.Equal(buf[i:i+line], first) {
				bad("block %d: torn at byte %d: %q then %q", k, i, bytes.TrimRight(first, ".\n"), bytes.TrimRight(buf[i:i+line], ".\n\x00"))
			}
		}
		var r, got int
		if _, err := fmt.Sscanf(string(first), "SWARMVM-BLOCK round=%d block=%d", &r, &got); err != nil || got != k {
			bad("block %d: header %q", k, bytes.TrimRight(first, ".\n"))
		}
		rounds[k] = r
	}
	// One writer leaves round R on blocks 0..p-1 and R-1 on the rest.
	p := 1
	for p < n && rounds[p] == rounds[0] {
		p++
	}
	for k := p; k < n; k++ {
		if rounds[k] != rounds[0]-1 {
			bad("rounds %v: not one writer's", rounds)
		}
	}
	if rounds[0] == 0 {
		bad("nothing written")
	}
	fmt.Printf("SWARMVM-GUEST-VERIFY ok round=%d block=%d\n", rounds[0], p-1)
}

func bad(format string, args ...any) {
	fmt.Printf("SWARMVM-GUEST-VERIFY bad "+format+"\n", args...)
	os.Exit(1)
}

func fail(msg string) {
	fmt.Printf("SWARMVM-GUEST-VERIFY error %s\n", msg)
	os.Exit(2)
}
