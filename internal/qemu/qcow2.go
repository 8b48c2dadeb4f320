package qemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// The qcow2 header (docs/interop/qcow2.txt in QEMU's sources), big-endian.
const (
	qcow2Magic        = 0x514649fb // "QFI\xfb"
	qcow2V2HeaderLen  = 72
	qcow2IncompatData = 1 << 2 // the guest's data is in an external file
	qcow2ExtEnd       = 0
	qcow2ExtDataFile  = 0x44415441 // the external data file's name
	qcow2MaxHeader    = 64 << 10   // what is read: header and extensions
	qcow2MaxName      = 1023       // QEMU's limit for a backing file's name
)

// ErrNotQCOW2 is an image without qcow2's magic number.
var ErrNotQCOW2 = errors.New("not a qcow2 image")

// ReadQCOW2 reads what the runner needs of a qcow2 image from its header,
// without starting qemu-img: its virtual size, and whether it reaches
// beyond its file (a backing file; an external data file, by the header's
// flag or its name). It reports ErrNotQCOW2 for any other format, which
// qemu-img info then names. The result reads like Info's, Format "qcow2".
func ReadQCOW2(path string) (ImageInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return ImageInfo{}, err
	}
	defer f.Close()
	return readQCOW2(f)
}

// readQCOW2 is ReadQCOW2 on an open image: its header, and the backing
// file's name where the header says it is.
func readQCOW2(f io.ReaderAt) (ImageInfo, error) {
	var info ImageInfo
	buf := make([]byte, qcow2MaxHeader)
	n, err := io.ReadFull(io.NewSectionReader(f, 0, qcow2MaxHeader), buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		if errors.Is(err, io.EOF) {
			return info, ErrNotQCOW2
		}
		return info, err
	}
	buf = buf[:n]
	be := binary.BigEndian
	if len(buf) < qcow2V2HeaderLen || be.Uint32(buf) != qcow2Magic {
		return info, ErrNotQCOW2
	}
	version := be.Uint32(buf[4:])
	if version != 2 && version != 3 {
		return info, fmt.Errorf("qcow2 version %d, which QEMU does not know", version)
	}
	info.Format, info.VirtualSize = "qcow2", int64(be.Uint64(buf[24:]))
	if off, size := be.Uint64(buf[8:]), be.Uint32(buf[16:]); off != 0 {
		name, err := readAt(f, int64(off), min(size, qcow2MaxName))
		if err != nil {
			return info, fmt.Errorf("qcow2 backing file name: %w", err)
		}
		info.BackingFile = name
		if name == "" {
			info.BackingFile = "(unnamed)"
		}
	}
	extAt := qcow2V2HeaderLen
	if version == 3 {
		if len(buf) < 104 {
			return info, fmt.Errorf("qcow2 version 3 header cut short")
		}
		if be.Uint64(buf[72:])&qcow2IncompatData != 0 {
			info.Specific.Data.DataFile = "(named in the image)"
		}
		extAt = int(be.Uint32(buf[100:]))
	}
	for extAt+8 <= len(buf) {
		typ, l := be.Uint32(buf[extAt:]), int(be.Uint32(buf[extAt+4:]))
		data := extAt + 8
		if typ == qcow2ExtEnd || data+l > len(buf) {
			break
		}
		if typ == qcow2ExtDataFile {
			// Any such extension is refused, even with an empty name,
			// which must not undo what the incompatible bit said (found
			// by FuzzQCOW2Header).
			info.Specific.Data.DataFile = string(buf[data : data+l])
			if l == 0 {
				info.Specific.Data.DataFile = "(an empty name in the image)"
			}
		}
		extAt = data + (l+7)/8*8
	}
	return info, nil
}

func readAt(f io.ReaderAt, off int64, n uint32) (string, error) {
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		return "", err
	}
	return string(b), nil
}
