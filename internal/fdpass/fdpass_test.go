package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// pair is a connected SOCK_SEQPACKET socket pair.
func pair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func openFD(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func devNulls(t *testing.T, n int) []*os.File {
	t.Helper()
	var fs []*os.File
	for i := 0; i < n; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		fs = append(fs, f)
	}
	return fs
}

// Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC), so that none
// reaches a program the receiver starts unless it hands it on by name:
// the runner starts qemu-img and swtpm beside QEMU.
func TestReceivedDescriptorsAreCloseOnExec(t *testing.T) {
	a, b := pair(t)
	sent := devNulls(t, 3)
	defer Close(sent)
	if err := Send(a, []byte("fds"), sent...); err != nil {
		t.Fatal(err)
	}
	_, files, err := Recv(b, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer Close(files)
	if len(files) != 3 {
		t.Fatalf("received %d descriptors, want 3", len(files))
	}
	for _, f := range files {
		flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("received descriptor %d: F_GETFD = %#x, %v; want FD_CLOEXEC (MSG_CMSG_CLOEXEC not used)", f.Fd(), flags, err)
		}
		if target, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd())); target != os.DevNull {
			t.Errorf("received descriptor %d is %q, want %s", f.Fd(), target, os.DevNull)
		}
	}
}

// The KVM ioctls answer on a descriptor that crossed the socket.
func TestKVMDescriptorWorksAfterPassing(t *testing.T) {
	kvmtest.Require(t)
	a, b := pair(t)
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("/dev/kvm: %v", err)
	}
	if err := Send(a, []byte("kvm"), kvm); err != nil {
		t.Fatal(err)
	}
	kvm.Close() // the receiver's copy must stand on its own
	msg, files, err := Recv(b, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer Close(files)
	if string(msg) != "kvm" {
		t.Errorf("message %q", msg)
	}
	v, err := unix.IoctlRetInt(int(files[0].Fd()), 0xAE00) // KVM_GET_API_VERSION
	if err != nil || v != 12 {
		t.Fatalf("KVM_GET_API_VERSION on the received descriptor = %d, %v; want 12", v, err)
	}
}

// Every way a receive can fail closes what arrived: the process's
// descriptor count is back to where it was.
func TestFailuresCloseEveryReceivedDescriptor(t *testing.T) {
	cases := []struct {
		name  string
		send  func(t *testing.T, c *net.UnixConn)
		want  int
		error error
	}{
		{"more descriptors than the control buffer (MSG_CTRUNC)", func(t *testing.T, c *net.UnixConn) {
			fs := devNulls(t, MaxFDs+3)
			defer Close(fs)
			if err := Send(c, []byte("x"), fs...); err != nil {
				t.Fatal(err)
			}
		}, 1, ErrCtrunc},
		{"extra descriptors", func(t *testing.T, c *net.UnixConn) {
			fs := devNulls(t, 3)
			defer Close(fs)
			if err := Send(c, []byte("x"), fs...); err != nil {
				t.Fatal(err)
			}
		}, 1, ErrUnexpected},
		{"descriptors where none are expected", func(t *testing.T, c *net.UnixConn) {
			fs := devNulls(t, 1)
			defer Close(fs)
			if err := Send(c, []byte("x"), fs...); err != nil {
				t.Fatal(err)
			}
		}, 0, ErrUnexpected},
		{"oversized message with descriptors", func(t *testing.T, c *net.UnixConn) {
			fs := devNulls(t, 2)
			defer Close(fs)
			if _, _, err := c.WriteMsgUnix(make([]byte, MaxMessage+100), unix.UnixRights(int(fs[0].Fd()), int(fs[1].Fd())), nil); err != nil {
				t.Fatal(err)
			}
		}, 2, ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, b := pair(t)
			base := openFD(t)
			tc.send(t, a)
			_, files, err := Recv(b, tc.want)
			if !errors.Is(err, tc.error) {
				t.Fatalf("Recv error %v, want %v", err, tc.error)
			}
			if files != nil {
				t.Errorf("files returned with an error")
			}
			if n := openFD(t); n != base {
				t.Errorf("%d descriptors open after the failed receive, %d before", n, base)
			}
		})
	}
}

func TestEOFAndDeadline(t *testing.T) {
	a, b := pair(t)
	b.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, _, err := Recv(b, 0); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("stalled peer: %v, want a deadline error", err)
	}
	b.SetReadDeadline(time.Time{})
	a.Close()
	if _, _, err := Recv(b, 0); !errors.Is(err, io.EOF) {
		t.Fatalf("closed peer: %v, want io.EOF", err)
	}
}

func TestPeer(t *testing.T) {
	a, _ := pair(t)
	p, err := Peer(a)
	if err != nil {
		t.Fatal(err)
	}
	if p.PID != os.Getpid() || p.UID != os.Getuid() || p.GID != os.Getgid() {
		t.Errorf("peer %+v, want pid %d uid %d gid %d", p, os.Getpid(), os.Getuid(), os.Getgid())
	}
}

func TestDecodeRequest(t *testing.T) {
	good := `{"version":1,"vm":"web-1","kvm":true,"tap":{"bridge":"br0"},"vhost_net":true}`
	r, err := DecodeRequest([]byte(good))
	if err != nil || r.VM != "web-1" || !r.KVM || r.TAP.Bridge != "br0" || !r.VhostNet {
		t.Fatalf("good request: %+v, %v", r, err)
	}
	bad := map[string]string{
		"not json":        `{"version":1,`,
		"unknown field":   `{"version":1,"vm":"a","kvm":true,"device":"/dev/sda"}`,
		"version 2":       `{"version":2,"vm":"a","kvm":true}`,
		"no version":      `{"vm":"a","kvm":true}`,
		"vm with slash":   `{"version":1,"vm":"../a","kvm":true}`,
		"empty vm":        `{"version":1,"vm":"","kvm":true}`,
		"bridge too long": `{"version":1,"vm":"a","tap":{"bridge":"abcdefghijklmnopq"}}`,
		"bridge with /":   `{"version":1,"vm":"a","tap":{"bridge":"br/0"}}`,
		"nothing":         `{"version":1,"vm":"a"}`,
		"vhost alone":     `{"version":1,"vm":"a","kvm":true,"vhost_net":true}`,
		"trailing":        `{"version":1,"vm":"a","kvm":true} {}`,
	}
	for name, in := range bad {
		if _, err := DecodeRequest([]byte(in)); err == nil {
			t.Errorf("%s: accepted %s", name, in)
		}
	}
}

// Ask against a scripted broker: the lease hands over what was granted,
// refuses a reply whose descriptors do not match what it names, and turns
// refusals into RefusedError.
func TestAsk(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "b.sock")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	replies := []func(c *net.UnixConn){
		func(c *net.UnixConn) {
			f := devNulls(t, 1)
			defer Close(f)
			b, _ := Encode(Response{Version: 1, OK: true, FDs: []string{FDKVM}})
			Send(c, b, f...)
		},
		func(c *net.UnixConn) {
			b, _ := Encode(Response{Version: 1, OK: false, Error: "peer uid 4242 not allowed"})
			Send(c, b)
		},
		func(c *net.UnixConn) {
			f := devNulls(t, 2)
			defer Close(f)
			b, _ := Encode(Response{Version: 1, OK: true, FDs: []string{FDKVM}})
			Send(c, b, f...)
		},
	}
	go func() {
		for _, reply := range replies {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			if _, _, err := Recv(c, 0); err == nil {
				reply(c)
			}
			defer c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	base := openFD(t)
	lease, err := Ask(ctx, sock, Request{VM: "a", KVM: true})
	if err != nil {
		t.Fatal(err)
	}
	kvm := lease.Take(FDKVM)
	if kvm == nil || lease.Take(FDTAP) != nil {
		t.Fatal("lease did not hand over exactly the KVM descriptor")
	}
	kvm.Close()
	lease.Close()
	var refused *RefusedError
	if _, err := Ask(ctx, sock, Request{VM: "a", KVM: true}); !errors.As(err, &refused) || !strings.Contains(refused.Reason, "4242") {
		t.Fatalf("refusal: %v", err)
	}
	if _, err := Ask(ctx, sock, Request{VM: "a", KVM: true}); !errors.Is(err, ErrUnexpected) {
		t.Fatalf("mismatched reply: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	if n := openFD(t); n != base {
		t.Errorf("%d descriptors open, %d before", n, base)
	}
}
