// Package console serves a VM's screen to a browser: QEMU's VNC display on
// a unix socket in the run folder, bridged to a websocket by the runner on
// the container's console port. Nobody gets through without a ticket: a
// short-lived token that names the VM, what it grants and when it expires,
// signed with the VM's console key (a Swarm secret). `swarmvm console`
// mints tickets where the key is; the runner checks them.
package console

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// MinKeyBytes is the shortest console key accepted.
const MinKeyBytes = 32

// Grant is what a ticket allows.
type Grant string

const (
	// View shows the screen and the serial console's output; keys, the
	// pointer and the clipboard are dropped before they reach QEMU, and
	// serial input is refused.
	View Grant = "view"
	// Input also lets the holder act: type on the serial console, and use
	// the screen's keyboard and pointer.
	Input Grant = "input"
)

// ticketVersion starts every ticket, so that the format can change.
const ticketVersion = "v1"

// Mint makes a ticket for vm that grants g until expires.
func Mint(key []byte, vm string, g Grant, expires time.Time) string {
	body := strings.Join([]string{ticketVersion, vm, string(g), strconv.FormatInt(expires.Unix(), 10)}, ".")
	return base64.RawURLEncoding.EncodeToString([]byte(body)) + "." + base64.RawURLEncoding.EncodeToString(sign(key, body))
}

func sign(key []byte, body string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(body))
	return m.Sum(nil)
}

// Errors Verify returns; the server names them in its audit, never to the
// client.
var (
	ErrMalformed = errors.New("malformed ticket")
	ErrSignature = errors.New("ticket not signed with this VM's console key")
	ErrOtherVM   = errors.New("ticket for another VM")
	ErrExpired   = errors.New("ticket expired")
)

// Ticket is what a valid ticket says.
type Ticket struct {
	VM      string
	Grant   Grant
	Expires time.Time
}

// Verify checks t against key for vm at now. The signature is compared in
// constant time, before anything the ticket says is believed.
func Verify(key []byte, vm, t string, now time.Time) (Ticket, error) {
	b64body, b64mac, ok := strings.Cut(t, ".")
	if !ok || len(t) > 1024 {
		return Ticket{}, ErrMalformed
	}
	body, err1 := base64.RawURLEncoding.DecodeString(b64body)
	mac, err2 := base64.RawURLEncoding.DecodeString(b64mac)
	// One spelling per ticket: the decoder skips newlines and ignores the
	// last character's spare bits, so other strings would decode to the
	// same ticket (found by FuzzVerify).
	if err1 != nil || err2 != nil || base64.RawURLEncoding.EncodeToString(body) != b64body || base64.RawURLEncoding.EncodeToString(mac) != b64mac {
		return Ticket{}, ErrMalformed
	}
	if !hmac.Equal(mac, sign(key, string(body))) {
		return Ticket{}, ErrSignature
	}
	f := strings.Split(string(body), ".")
	if len(f) != 4 || f[0] != ticketVersion {
		return Ticket{}, ErrMalformed
	}
	exp, err := strconv.ParseInt(f[3], 10, 64)
	if err != nil {
		return Ticket{}, ErrMalformed
	}
	tk := Ticket{VM: f[1], Grant: Grant(f[2]), Expires: time.Unix(exp, 0)}
	switch {
	case tk.VM != vm:
		return tk, fmt.Errorf("%w (%q)", ErrOtherVM, tk.VM)
	case !now.Before(tk.Expires):
		return tk, fmt.Errorf("%w at %s", ErrExpired, tk.Expires.UTC().Format(time.RFC3339))
	case tk.Grant != View && tk.Grant != Input:
		return tk, ErrMalformed
	}
	return tk, nil
}
