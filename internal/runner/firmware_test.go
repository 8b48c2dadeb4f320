package runner

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// OVMF's own words, as a Secure Boot firmware printed them on the serial
// console for an unsigned shim (escape sequences and all), fed in pieces.
func TestFirmwareWatch(t *testing.T) {
	console := "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0)\r\n" +
		"BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied\r\n" +
		"BdsDxe: No bootable option or device was found.\r\n" +
		strings.Repeat("x", 3*maxLine) + " BdsDxe: failed to load Boot0009 \"hidden\" from X: Not Found\n" +
		"BdsDxe: Press any key to enter the Boot Manager Menu.\r\n"
	for _, mode := range []string{"uefi-secure", "uefi"} {
		var out bytes.Buffer
		w := newFirmwareWatch(slog.New(slog.NewTextHandler(&out, nil)), mode)
		for b := []byte(console); len(b) > 0; {
			n := min(7, len(b))
			w.Write(b[:n])
			b = b[n:]
		}
		got := out.String()
		for _, want := range []string{`entry=Boot0001 device="UEFI Misc Device" reason="Access Denied"`, "firmware found nothing it could boot"} {
			if !strings.Contains(got, want) {
				t.Errorf("%s: log lacks %q:\n%s", mode, want, got)
			}
		}
		if strings.Contains(got, "Boot0009") || strings.Count(got, "level=WARN") != 2 {
			t.Errorf("%s: want exactly the two findings (an over-long line is skipped):\n%s", mode, got)
		}
		if secure := strings.Contains(got, "Secure Boot refused the bootloader"); secure != (mode == "uefi-secure") {
			t.Errorf("%s: Secure Boot named %v:\n%s", mode, secure, got)
		}
	}
}
