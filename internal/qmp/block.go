package qmp

import (
	"context"
	"errors"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Bitmap is a dirty bitmap of a drive, from query-block.
type Bitmap struct {
	Name         string `json:"name"`
	Count        int64  `json:"count"` // dirty bytes
	Granularity  int64  `json:"granularity"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"` // not saved properly (QEMU was killed): unusable
}

// Drive is a drive of query-block with what a backup needs: its image's
// size and its dirty bitmaps.
type Drive struct {
	Device   string `json:"device"`
	Inserted *struct {
		NodeName string   `json:"node-name"`
		ReadOnly bool     `json:"ro"`
		Driver   string   `json:"drv"`
		Bitmaps  []Bitmap `json:"dirty-bitmaps"`
		Image    struct {
			VirtualSize int64 `json:"virtual-size"`
		} `json:"image"`
	} `json:"inserted"`
}

// QueryDrives lists the VM's drives with their sizes and dirty bitmaps.
func (c *Client) QueryDrives(ctx context.Context) ([]Drive, error) {
	var d []Drive
	return d, c.Execute(ctx, "query-block", nil, &d)
}

// FDInfo is what add-fd says it did.
type FDInfo struct {
	FDSetID int `json:"fdset-id"`
	FD      int `json:"fd"`
}

// AddFD hands QEMU a descriptor (SCM_RIGHTS on the monitor's socket) into
// the fd set id, which QEMU then opens as /dev/fdset/<id>; the caller
// still owns f.
func (c *Client) AddFD(ctx context.Context, id int, f *os.File, opaque string) (FDInfo, error) {
	var out FDInfo
	args := map[string]any{"fdset-id": id, "opaque": opaque}
	return out, c.execute(ctx, "add-fd", args, &out, unix.UnixRights(int(f.Fd())))
}

// RemoveFDSet closes every descriptor of the fd set that QEMU no longer
// uses, and the set with them.
func (c *Client) RemoveFDSet(ctx context.Context, id int) error {
	return c.Execute(ctx, "remove-fd", map[string]any{"fdset-id": id}, nil)
}

// Action is one action of a transaction.
type Action struct {
	Type string         `json:"type"`
	Data map[string]any `json:"data"`
}

// Transaction runs the actions at one point, all or none.
func (c *Client) Transaction(ctx context.Context, actions ...Action) error {
	return c.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
}

// Job is a block job of query-jobs.
type Job struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Status   string `json:"status"` // created, running, paused, ready, concluded, …
	Current  int64  `json:"current-progress"`
	Total    int64  `json:"total-progress"`
	ErrorMsg string `json:"error"`
}

// QueryJobs lists the block jobs.
func (c *Client) QueryJobs(ctx context.Context) ([]Job, error) {
	var j []Job
	return j, c.Execute(ctx, "query-jobs", nil, &j)
}

// FDSetPath is how QEMU names a descriptor of an fd set.
func FDSetPath(id int) string { return "/dev/fdset/" + strconv.Itoa(id) }

// errNoUnix is the error for descriptors on a session that is not over a
// unix socket.
var errNoUnix = errors.New("qmp: descriptors need a unix socket session")

// GetFD hands QEMU a descriptor (SCM_RIGHTS) under a name that commands
// taking a socket address of type fd then use; the caller still owns f.
func (c *Client) GetFD(ctx context.Context, name string, f *os.File) error {
	return c.execute(ctx, "getfd", map[string]any{"fdname": name}, nil, unix.UnixRights(int(f.Fd())))
}

// CloseFD drops a descriptor handed over with GetFD that QEMU holds still.
func (c *Client) CloseFD(ctx context.Context, name string) error {
	return c.Execute(ctx, "closefd", map[string]any{"fdname": name}, nil)
}
