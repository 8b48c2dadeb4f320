package fdpass

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/swarmvm/swarmvm/internal/config"
)

// Version is the wire format's version. A broker refuses any other.
const Version = 1

// Descriptor names, in the order a grant attaches them.
const (
	FDKVM      = "kvm"
	FDTAP      = "tap"
	FDVhostNet = "vhost-net"
)

// Request asks the broker for descriptors for one VM. The connection that
// carries it is the lease: what the broker created for it lives until the
// connection closes.
type Request struct {
	Version  int         `json:"version"`
	VM       string      `json:"vm"`
	KVM      bool        `json:"kvm,omitempty"`
	TAP      *TAPRequest `json:"tap,omitempty"`
	VhostNet bool        `json:"vhost_net,omitempty"`
}

// TAPRequest asks for a TAP device attached to a host bridge.
type TAPRequest struct {
	Bridge string `json:"bridge"`
}

// Response is the broker's answer. On success, the descriptors named in FDs
// are attached in that order.
type Response struct {
	Version int      `json:"version"`
	OK      bool     `json:"ok"`
	Error   string   `json:"error,omitempty"`
	FDs     []string `json:"fds,omitempty"`
	TAP     *TAPInfo `json:"tap,omitempty"`
	Notes   []string `json:"notes,omitempty"`
}

// TAPInfo describes a granted TAP.
type TAPInfo struct {
	Name   string `json:"name"`
	Bridge string `json:"bridge"`
	MAC    string `json:"mac"`
}

// DecodeRequest parses and checks a request strictly: known fields only,
// this version, a valid VM name and bridge name, and something asked for.
func DecodeRequest(b []byte) (Request, error) {
	var r Request
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return r, fmt.Errorf("malformed request: %v", err)
	}
	if dec.More() {
		return r, fmt.Errorf("malformed request: trailing data")
	}
	switch {
	case r.Version != Version:
		return r, fmt.Errorf("unsupported protocol version %d (this broker speaks %d)", r.Version, Version)
	case !config.ValidVMName(r.VM):
		return r, fmt.Errorf("invalid vm name %q", r.VM)
	case r.TAP != nil && !config.ValidIfName(r.TAP.Bridge):
		return r, fmt.Errorf("invalid bridge name %q", r.TAP.Bridge)
	case r.VhostNet && r.TAP == nil:
		return r, fmt.Errorf("vhost_net asked for without a tap")
	case !r.KVM && r.TAP == nil:
		return r, fmt.Errorf("nothing asked for")
	}
	return r, nil
}

// Encode renders a message, refusing one over MaxMessage.
func Encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxMessage {
		return nil, ErrTooLarge
	}
	return b, nil
}

// LeaseRequest is what a lease-holder may send on its lease after the
// grant: today one question, the counters of the TAP the lease made.
type LeaseRequest struct {
	Version int  `json:"version"`
	Stats   bool `json:"stats,omitempty"`
}

// LeaseReply answers a LeaseRequest.
type LeaseReply struct {
	Version int       `json:"version"`
	Error   string    `json:"error,omitempty"`
	TAP     *TAPStats `json:"tap,omitempty"`
}

// TAPStats are a TAP's counters as the host's kernel keeps them: what the
// TAP received is what the guest sent.
type TAPStats struct {
	RxBytes   uint64 `json:"rx_bytes"`
	RxPackets uint64 `json:"rx_packets"`
	RxErrors  uint64 `json:"rx_errors"`
	RxDropped uint64 `json:"rx_dropped"`
	TxBytes   uint64 `json:"tx_bytes"`
	TxPackets uint64 `json:"tx_packets"`
	TxErrors  uint64 `json:"tx_errors"`
	TxDropped uint64 `json:"tx_dropped"`
}

// DecodeLeaseRequest parses a lease-holder's request strictly.
func DecodeLeaseRequest(b []byte) (LeaseRequest, error) {
	var r LeaseRequest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return r, fmt.Errorf("malformed lease request: %v", err)
	}
	switch {
	case dec.More():
		return r, fmt.Errorf("malformed lease request: trailing data")
	case r.Version != Version:
		return r, fmt.Errorf("unsupported protocol version %d (this broker speaks %d)", r.Version, Version)
	case !r.Stats:
		return r, fmt.Errorf("nothing asked for")
	}
	return r, nil
}
