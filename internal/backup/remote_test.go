package backup

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/vmdisk"
)

// A backup for a repository on another node, over loopback: the stopped
// VM's disk is backed up into the staging folder, sent under the
// transfer's mutual TLS, checked and kept by the receiver (listed, with
// the manifest the sender wrote), and the staging folder is left empty.
func TestSendReceive(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (the repository's ownership rules); the test command runs as root")
	}
	store, repo := t.TempDir(), t.TempDir()
	os.MkdirAll(filepath.Join(store, "images"), 0o755)
	env := map[string]string{"VM_NAME": "vm-r", "STORAGE_DIR": store}
	cfg := config.FromEnv(func(k string) string { return env[k] })
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", cfg.ImagePath, "8M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	if out, err := exec.Command("qemu-io", "-c", "write -P 0x5a 1M 2M", cfg.ImagePath).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	pem, err := vmdisk.NewMoveKey("vm-r")
	if err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(t.TempDir(), "key.pem")
	os.WriteFile(key, pem, 0o600)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()

	got := make(chan error, 1)
	go func() {
		_, err := Receive(context.Background(), cfg, repo, addr, key, io.Discard)
		got <- err
	}()
	var out bytes.Buffer
	m, err := Send(context.Background(), cfg, Options{Node: "n1", FullEvery: DefaultFullEvery}, addr, key, &out)
	if err != nil {
		t.Fatalf("send: %v\n%s", err, out.String())
	}
	if err := <-got; err != nil {
		t.Fatalf("receive: %v", err)
	}
	list, err := List(repo, "vm-r")
	if err != nil || len(list) != 1 || list[0].ID != m.ID || list[0].Mode != "full" {
		t.Fatalf("listed %+v, %v; sent %s", list, err, m.ID)
	}
	if err := checkFiles(list[0], ""); err != nil {
		t.Error(err)
	}
	if des := staged(cfg); len(des) != 0 {
		t.Errorf("staging folder not emptied: %v", des)
	}
	// One backup of the VM at a time on its node: a second one finds the
	// staging folder's lock held, and touches nothing.
	release, err := lock(Stage(cfg), "vm-r")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Send(context.Background(), cfg, Options{}, addr, key, io.Discard); err == nil || !strings.Contains(err.Error(), "a backup of vm-r is running") {
		t.Errorf("a second backup while one holds the staging folder: %v", err)
	}
	release()
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", filepath.Join(list[0].Dir, DiskFile), cfg.ImagePath).CombinedOutput(); err != nil {
		t.Errorf("the received disk is not the VM's: %v %s", err, out)
	}

	// The repository's side goes away in the middle (the network cut, its
	// node lost): the sender fails saying so, and keeps nothing staged.
	go func() {
		conn, err := vmdisk.Accept(context.Background(), addr, key, io.Discard)
		if err != nil {
			got <- err
			return
		}
		w := bufio.NewWriter(conn)
		writeLine(w, offer{Newest: m.ID, Length: 1})
		io.CopyN(io.Discard, conn, 4096)
		conn.Close()
		got <- nil
	}()
	out.Reset()
	if _, err := Send(context.Background(), cfg, Options{Node: "n1"}, addr, key, &out); err == nil || !strings.Contains(err.Error(), "repository's side") {
		t.Errorf("send to a receiver that went away: %v\n%s", err, out.String())
	}
	<-got
	if des := staged(cfg); len(des) != 0 {
		t.Errorf("staging folder not emptied after a cut transfer: %v", des)
	}
	if list, _ := List(repo, "vm-r"); len(list) != 1 {
		t.Errorf("the repository lists %d backups after a cut transfer, want the 1 before", len(list))
	}
}

// What a sender may not send: another VM's backup, a name leaving the
// folder, a parent other than the newest backup, a file that does not
// match its checksum, a stream cut short. Each is refused, and nothing is
// left in the repository's folder.
func TestReceiveRefuses(t *testing.T) {
	data := []byte("disk bytes")
	good := func() Manifest {
		return Manifest{Version: ManifestVersion, VM: "vm-r", ID: "20261205T120000Z-aaaaaa", Mode: "full",
			Files: []File{{Name: DiskFile, Role: "disk", Size: int64(len(data)), SHA256: fmt.Sprintf("%x", sha(data))}}}
	}
	for what, c := range map[string]struct {
		edit func(*Manifest)
		body []byte
		want string
	}{
		"ok":                {func(*Manifest) {}, data, ""},
		"another VM":        {func(m *Manifest) { m.VM = "other" }, data, `a backup of "other"`},
		"an id with a path": {func(m *Manifest) { m.ID = "../x" }, data, "backup id"},
		"a file name path": {func(m *Manifest) {
			m.Files = append(m.Files, File{Name: "../../etc/x", SHA256: strings.Repeat("0", 64)})
		}, data, "refused"},
		"a foreign parent": {func(m *Manifest) { m.Parent = "20261205T110000Z-bbbbbb" }, data, "not the newest backup here"},
		"a wrong checksum": {func(*Manifest) {}, []byte("DISK BYTES"), "does not match its manifest"},
		"cut short":        {func(*Manifest) {}, data[:4], "stopped after 4 of 10 bytes"},
	} {
		dir := t.TempDir()
		m := good()
		c.edit(&m)
		raw, _ := json.Marshal(m)
		line, _ := json.Marshal(sending{Manifest: raw})
		stream := append(append(line, '\n'), c.body...)
		_, err := receiveBackup(bufio.NewReader(bytes.NewReader(stream)), "vm-r", dir, "", io.Discard)
		des, _ := os.ReadDir(dir)
		switch {
		case c.want == "" && (err != nil || len(des) != 1 || des[0].Name() != m.ID):
			t.Errorf("%s: %v, left %v", what, err, des)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || len(des) != 0):
			t.Errorf("%s: %v (want %q), left %v", what, err, c.want, des)
		}
	}
}

func sha(b []byte) []byte {
	s := sha256.Sum256(b)
	return s[:]
}

// staged lists the staging folder but its lock.
func staged(cfg config.Config) []string {
	des, _ := os.ReadDir(Stage(cfg))
	var names []string
	for _, de := range des {
		if de.Name() != lockName {
			names = append(names, de.Name())
		}
	}
	return names
}
