package runner

import (
	"bytes"
	"log/slog"
	"regexp"

	"github.com/swarmvm/swarmvm/internal/config"
)

// firmwareWatch reads the serial console as it passes to the log file and
// says in the runner's log when the UEFI firmware could not boot: OVMF's
// boot manager prints that on the console only, where an operator reading
// `docker service logs` would not look. Lines are examined whole, up to
// maxLine bytes; the rest of a longer line is skipped.
type firmwareWatch struct {
	log    *slog.Logger
	secure bool
	line   []byte
	skip   bool
}

const maxLine = 1024

var (
	bootFailed    = regexp.MustCompile(`BdsDxe: failed to (?:load|start) (Boot[0-9A-Fa-f]{4}) "([^"]*)".*: ([^:]+)$`)
	nothingToBoot = []byte("BdsDxe: No bootable option or device was found")
)

func newFirmwareWatch(log *slog.Logger, bootMode string) *firmwareWatch {
	return &firmwareWatch{log: log, secure: bootMode == config.BootUEFISecure}
}

func (w *firmwareWatch) Write(p []byte) (int, error) {
	for rest := p; len(rest) > 0; {
		i := bytes.IndexByte(rest, '\n')
		part := rest
		if i >= 0 {
			part = rest[:i]
		}
		if !w.skip {
			if len(w.line)+len(part) > maxLine {
				w.skip, w.line = true, w.line[:0]
			} else {
				w.line = append(w.line, part...)
			}
		}
		if i < 0 {
			break
		}
		if !w.skip {
			w.examine(bytes.TrimRight(w.line, "\r"))
		}
		w.line, w.skip = w.line[:0], false
		rest = rest[i+1:]
	}
	return len(p), nil
}

func (w *firmwareWatch) examine(line []byte) {
	if !bytes.Contains(line, []byte("BdsDxe: ")) {
		return
	}
	if m := bootFailed.FindSubmatch(line); m != nil {
		reason := string(bytes.TrimSpace(m[3]))
		attrs := []any{"entry", string(m[1]), "device", string(m[2]), "reason", reason}
		if w.secure && reason == "Access Denied" {
			attrs = append(attrs, "meaning", "Secure Boot refused the bootloader: it is not signed by a key in the VM's db (Microsoft's, under BOOT_MODE=uefi-secure) — boot a signed one (shim, Windows Boot Manager), or use BOOT_MODE=uefi")
		}
		w.log.Warn("firmware could not boot an entry (from the serial console)", attrs...)
		return
	}
	if bytes.Contains(line, nothingToBoot) {
		w.log.Warn("firmware found nothing it could boot (from the serial console): check the disk and ISO_PATH, and under uefi-secure that the bootloader is signed")
	}
}
