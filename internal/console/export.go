package console

import (
	"encoding/hex"
	"strconv"
	"time"
)

// An export ticket opens a VM's pull-mode backup export (an NBD server of
// QEMU's behind TLS with a pre-shared key) until it expires. The ticket is
// a TLS-PSK identity and its key: the identity names the VM, the export
// and its end; the key is the identity signed with the VM's console key.
// Whoever mints it (swarmvm backup export, where the key is) and the
// runner (which has the key as a Swarm secret) derive the same key
// without it ever being sent; QEMU accepts no other.

// ExportUser is the TLS-PSK identity of export id of vm, open until until.
func ExportUser(vm, id string, until time.Time) string {
	return "swarmvm-export." + vm + "." + id + "." + strconv.FormatInt(until.Unix(), 10)
}

// ExportKey is the pre-shared key of an export's identity: distinct from
// every console ticket's signature (those sign bodies that start "v1.").
func ExportKey(key []byte, user string) []byte {
	return sign(key, "export/"+user)
}

// PSKLine is a key as GnuTLS's PSK files (QEMU's keys.psk, libnbd's
// tls-psk-file) hold it: identity:hex-key.
func PSKLine(user string, psk []byte) string {
	return user + ":" + hex.EncodeToString(psk) + "\n"
}
