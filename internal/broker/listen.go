package broker

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Listen creates the socket: its folder (0755), no stale socket left in the
// way, the configured mode and group. A socket another broker answers on is
// left alone and reported.
func Listen(cfg Config) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o755); err != nil {
		return nil, err
	}
	if err := removeStale(cfg.Socket); err != nil {
		return nil, err
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: cfg.Socket, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(cfg.Socket, cfg.SocketMode); err != nil {
		l.Close()
		return nil, err
	}
	if cfg.SocketGroup >= 0 {
		if err := os.Chown(cfg.Socket, -1, cfg.SocketGroup); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unixpacket", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: %w", path, errAnotherBroker)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: %w", path, err)
	}
	return os.Remove(path)
}

// Notify sends a state line to systemd's notify socket, when there is one
// ($NOTIFY_SOCKET, Type=notify units). It reports whether it sent.
func Notify(state string) (bool, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return false, nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:] // abstract socket
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return false, err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err == nil, err
}
