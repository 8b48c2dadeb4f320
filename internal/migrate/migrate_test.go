package migrate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/control"
	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// A ticket holds for its node, until its end, with a valid id; anything
// else is no ticket (the runner boots the VM as usual).
func TestReadTicket(t *testing.T) {
	store := t.TempDir()
	os.MkdirAll(filepath.Join(store, "images"), 0o755)
	cfg := config.FromEnv(func(k string) string { return map[string]string{"VM_NAME": "vm-t", "STORAGE_DIR": store}[k] })
	now := time.Now()
	if err := WriteTicket(cfg, Ticket{ID: "m-1", Node: "n2", Until: now.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(TicketPath(store, "vm-t")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the ticket file: %v %v", fi, err)
	}
	if tk, ok := ReadTicket(store, "vm-t", "n2", now); !ok || tk.ID != "m-1" {
		t.Errorf("the ticket for n2: %+v %v", tk, ok)
	}
	for what, read := range map[string]func() bool{
		"another node":  func() bool { _, ok := ReadTicket(store, "vm-t", "n3", now); return ok },
		"no node":       func() bool { _, ok := ReadTicket(store, "vm-t", "", now); return ok },
		"after its end": func() bool { _, ok := ReadTicket(store, "vm-t", "n2", now.Add(2*time.Minute)); return ok },
		"another VM":    func() bool { _, ok := ReadTicket(store, "vm-u", "n2", now); return ok },
	} {
		if read() {
			t.Errorf("a ticket for %s", what)
		}
	}
	WriteTicket(cfg, Ticket{ID: "../x", Node: "n2", Until: now.Add(time.Minute)})
	if _, ok := ReadTicket(store, "vm-t", "n2", now); ok {
		t.Error("a ticket with an id that is not one")
	}
}

// runnerSide plays a runner's control socket at path: each request is
// handed to serve with its descriptors; its reply is sent back.
func runnerSide(t *testing.T, path string, serve func(control.Request, []*os.File) control.Reply) {
	t.Helper()
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				msg, files, err := fdpass.Recv(c, fdpass.AnyFDs)
				if err != nil {
					return // a probe
				}
				req, err := control.Decode(msg)
				r := control.Reply{Error: "bad request"}
				if err == nil {
					r = serve(req, files)
				}
				r.Version = control.Version
				b, _ := fdpass.Encode(r)
				fdpass.Send(c, b)
			}()
		}
	}()
}

// The stream between the two jobs, over loopback under the migration's
// mutual TLS, with both runners played on their sockets: what the source
// writes reaches the target byte for byte, the target is told the source's
// figures only after the stream, and a source that fails tells the target
// so (the target then does not start the guest).
func TestSendReceive(t *testing.T) {
	pem, err := vmdisk.NewMoveKey("vm-m")
	if err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(t.TempDir(), "key.pem")
	os.WriteFile(key, pem, 0o600)
	stream := bytes.Repeat([]byte("guest memory "), 1<<18) // 3.25 MiB: many frames
	for _, fail := range []bool{false, true} {
		src, dst := t.TempDir(), t.TempDir()
		for _, d := range []string{src, dst} {
			os.MkdirAll(filepath.Join(d, "images"), 0o755)
		}
		cfgOf := func(store string) config.Config {
			return config.FromEnv(func(k string) string {
				return map[string]string{"VM_NAME": "vm-m", "STORAGE_DIR": store, "NODE_ID": "n-" + filepath.Base(store)}[k]
			})
		}
		// The source runner: writes the stream into the descriptor, closes
		// it as QEMU does at the end, and answers.
		runnerSide(t, control.Path(src, "vm-m"), func(req control.Request, files []*os.File) control.Reply {
			defer fdpass.Close(files)
			if req.Op != control.OpMigrate || len(files) != 1 {
				return control.Reply{Error: "want migrate"}
			}
			if fail {
				files[0].Write(stream[:1000])
				return control.Reply{Error: "the migration failed: a test"}
			}
			files[0].Write(stream)
			return control.Reply{OK: true, Downtime: 42 * time.Millisecond, TotalTime: time.Second, Transferred: int64(len(stream))}
		})
		// The target runner: reads the stream to its end, then takes the
		// end's word.
		got := make(chan []byte, 1)
		done := make(chan *control.Sent, 1)
		runnerSide(t, InPath(dst, "vm-m"), func(req control.Request, files []*os.File) control.Reply {
			switch req.Op {
			case control.OpMigrateIn:
				go func() {
					b, _ := io.ReadAll(files[0])
					files[0].Close()
					got <- b
				}()
				return control.Reply{OK: true}
			case control.OpMigrateDone:
				done <- req.Sent
				return control.Reply{OK: true}
			}
			return control.Reply{Error: "unexpected"}
		})
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close()
		until := time.Now().Add(time.Minute)
		recvErr := make(chan error, 1)
		var rlog bytes.Buffer
		go func() { recvErr <- Receive(context.Background(), cfgOf(dst), addr, key, "m-1", until, &rlog) }()
		var slog bytes.Buffer
		sendErr := Send(context.Background(), cfgOf(src), addr, key, "m-1", until, &slog)
		rerr := <-recvErr
		sent := <-done
		b := <-got
		if fail {
			if sendErr == nil || !strings.Contains(sendErr.Error(), "runs on here") || rerr == nil || sent.OK || !strings.Contains(sent.Error, "a test") {
				t.Errorf("a failed source: send %v, receive %v, the target told %+v", sendErr, rerr, sent)
			}
			continue
		}
		if sendErr != nil || rerr != nil {
			t.Fatalf("send %v\n%s\nreceive %v\n%s", sendErr, slog.String(), rerr, rlog.String())
		}
		if sha256.Sum256(b) != sha256.Sum256(stream) {
			t.Errorf("the target read %d bytes, not the %d the source wrote", len(b), len(stream))
		}
		if !sent.OK || sent.Downtime != 42*time.Millisecond || sent.Transferred != int64(len(stream)) {
			j, _ := json.Marshal(sent)
			t.Errorf("the target was told %s", j)
		}
		if _, err := os.Stat(TicketPath(dst, "vm-m")); !os.IsNotExist(err) {
			t.Errorf("the receiver left the ticket: %v", err)
		}
	}
}
