package qga

import (
	"context"
	"slices"
	"strings"
	"time"
)

// OSInfo is guest-get-osinfo's answer (the fields swarmvm shows).
type OSInfo struct {
	ID            string `json:"id"`
	Name          string `json:"name"`
	PrettyName    string `json:"pretty-name"`
	Version       string `json:"version"`
	VersionID     string `json:"version-id"`
	KernelRelease string `json:"kernel-release"`
}

// String is the OS as a person names it: "Debian GNU/Linux 12 (bookworm)".
func (o OSInfo) String() string {
	switch {
	case o.PrettyName != "":
		return o.PrettyName
	case o.Name != "" && o.Version != "":
		return o.Name + " " + o.Version
	}
	return o.Name
}

// Interface is one entry of guest-network-get-interfaces.
type Interface struct {
	Name        string `json:"name"`
	MAC         string `json:"hardware-address"`
	IPAddresses []struct {
		Type   string `json:"ip-address-type"`
		Addr   string `json:"ip-address"`
		Prefix int    `json:"prefix"`
	} `json:"ip-addresses"`
}

// OSInfo asks the guest what it runs.
func (c *Client) OSInfo(ctx context.Context) (OSInfo, error) {
	var o OSInfo
	return o, c.Call(ctx, "guest-get-osinfo", nil, &o)
}

// Interfaces asks the guest for its network interfaces.
func (c *Client) Interfaces(ctx context.Context) ([]Interface, error) {
	var ifs []Interface
	return ifs, c.Call(ctx, "guest-network-get-interfaces", nil, &ifs)
}

// Addresses are the guest's addresses a person reaches it by: every
// interface's but loopback's, IPv6 link-local ones left out, IPv4 first,
// at most max of them.
func Addresses(ifs []Interface, max int) []string {
	var v4, v6 []string
	for _, i := range ifs {
		if i.Name == "lo" {
			continue
		}
		for _, a := range i.IPAddresses {
			switch {
			case a.Type == "ipv4" && !strings.HasPrefix(a.Addr, "127."):
				v4 = append(v4, a.Addr)
			case a.Type == "ipv6" && a.Addr != "::1" && !strings.HasPrefix(strings.ToLower(a.Addr), "fe80:"):
				v6 = append(v6, a.Addr)
			}
		}
	}
	all := slices.Concat(v4, v6)
	if len(all) > max {
		all = all[:max]
	}
	return all
}

// Shutdown asks the guest to power off (guest-shutdown, mode powerdown).
// The agent does not answer when it obeys.
func (c *Client) Shutdown(ctx context.Context) error {
	return c.Send(ctx, "guest-shutdown", map[string]string{"mode": "powerdown"})
}

// SetTime sets the guest's clock to t (after a pause, or a migration).
func (c *Client) SetTime(ctx context.Context, t time.Time) error {
	return c.Call(ctx, "guest-set-time", map[string]int64{"time": t.UnixNano()}, nil)
}

// Freeze freezes the guest's filesystems and returns how many.
func (c *Client) Freeze(ctx context.Context) (int, error) {
	var n int
	return n, c.Call(ctx, "guest-fsfreeze-freeze", nil, &n)
}

// Thaw thaws them and returns how many were thawed.
func (c *Client) Thaw(ctx context.Context) (int, error) {
	var n int
	return n, c.Call(ctx, "guest-fsfreeze-thaw", nil, &n)
}

// FreezeStatus is "thawed" or "frozen".
func (c *Client) FreezeStatus(ctx context.Context) (string, error) {
	var s string
	return s, c.Call(ctx, "guest-fsfreeze-status", nil, &s)
}

// Filesystem is one entry of guest-get-fsinfo: a mounted filesystem, and
// its size and use where the agent knows them (qemu-ga 5.0 and later).
type Filesystem struct {
	Mountpoint string  `json:"mountpoint"`
	Type       string  `json:"type"`
	UsedBytes  *uint64 `json:"used-bytes"`
	TotalBytes *uint64 `json:"total-bytes"`
}

// Filesystems asks the guest for its mounted filesystems.
func (c *Client) Filesystems(ctx context.Context) ([]Filesystem, error) {
	var fs []Filesystem
	return fs, c.Call(ctx, "guest-get-fsinfo", nil, &fs)
}
