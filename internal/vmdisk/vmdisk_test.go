package vmdisk

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
)

// cfgOn is the VM's configuration in a storage folder, as a task on node
// sees it, with home as its home.
func cfgOn(t *testing.T, store, home, node string) config.Config {
	t.Helper()
	fw := t.TempDir()
	os.WriteFile(filepath.Join(fw, "CODE.fd"), make([]byte, 3653632), 0o644)
	os.WriteFile(filepath.Join(fw, "VARS.fd"), bytes.Repeat([]byte{0xAA}, 540672), 0o644)
	os.MkdirAll(filepath.Join(store, "images"), 0o755)
	env := map[string]string{"VM_NAME": "vm1", "STORAGE_DIR": store, "HOME_NODE": home, "NODE_ID": node, "NODE_HOSTNAME": node + "-host",
		"OVMF_CODE": filepath.Join(fw, "CODE.fd"), "OVMF_VARS_TEMPLATE": filepath.Join(fw, "VARS.fd")}
	cfg := config.FromEnv(func(k string) string { return env[k] })
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v %s", name, args, err, out)
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// Import: a raw image with data becomes the VM's qcow2 (0600, checked) and
// gets its NVRAM; a second import, an image with a backing file and an
// import off the home are refused, leaving nothing behind.
func TestImport(t *testing.T) {
	store := t.TempDir()
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "cloud.raw")
	os.WriteFile(src, append(make([]byte, 8<<20), []byte("IMPORTED-MARK")...), 0o644)
	var log syncBuf
	cfg := cfgOn(t, store, "n1", "n1")
	if err := Import(ctx, cfg, src, "", &log); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	for _, f := range []string{cfg.ImagePath, cfg.OVMFVars} {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v", f, fi, err)
		}
	}
	back := filepath.Join(t.TempDir(), "back.raw")
	run(t, "qemu-img", "convert", "-O", "raw", cfg.ImagePath, back)
	if b, _ := os.ReadFile(back); !bytes.HasPrefix(b[8<<20:], []byte("IMPORTED-MARK")) {
		t.Error("imported disk lacks the source's data")
	}
	if !strings.Contains(log.String(), "converting: 100%") || !strings.Contains(log.String(), "checked clean") {
		t.Errorf("log:\n%s", log.String())
	}
	before, _ := os.ReadFile(cfg.ImagePath)
	if err := Import(ctx, cfg, src, "", &log); err == nil || !strings.Contains(err.Error(), "never overwrites") {
		t.Errorf("second import: %v", err)
	}
	if after, _ := os.ReadFile(cfg.ImagePath); !bytes.Equal(before, after) {
		t.Error("the second import changed the disk")
	}

	other := cfgOn(t, t.TempDir(), "n1", "n1")
	overlay := filepath.Join(t.TempDir(), "overlay.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", src, "-F", "raw", overlay)
	if err := Import(ctx, other, overlay, "", &log); err == nil || !strings.Contains(err.Error(), "backing file") {
		t.Errorf("image with a backing file: %v", err)
	}
	offHome := cfgOn(t, t.TempDir(), "n1", "n2")
	if err := Import(ctx, offHome, src, "", &log); err == nil || !strings.Contains(err.Error(), "not the VM's home") {
		t.Errorf("import off the home node: %v", err)
	}
	for _, c := range []config.Config{other, offHome} {
		if m, _ := filepath.Glob(filepath.Join(c.StorageDir, "images", "*")); len(m) > 0 {
			t.Errorf("a refused import left %v", m)
		}
	}
}

// A move's transfer: the receiver gets byte-identical files under the VM's
// names (a stale copy there set aside), only from a sender with the same
// key; the sender holds QEMU's lock while it reads.
func TestTransfer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := cfgOn(t, t.TempDir(), "n1", "n1")
	dst := cfgOn(t, t.TempDir(), "n1", "n2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", src.ImagePath, "64M")
	run(t, "qemu-io", "-f", "qcow2", src.ImagePath, "-c", "write -P 0x5a 1M 4M")
	os.WriteFile(src.OVMFVars, bytes.Repeat([]byte{0x42}, 540672), 0o600)
	os.WriteFile(dst.ImagePath, []byte("stale"), 0o600)
	// TPM=on: the TPM's state goes along, into a 0700 folder.
	src.TPM, dst.TPM = true, true
	os.Mkdir(src.TPMState, 0o700)
	os.WriteFile(filepath.Join(src.TPMState, tpmFile), bytes.Repeat([]byte{0x7e}, 1370), 0o600)
	// The cloud-init key goes along: on the new home the guest keeps its
	// instance-id.
	os.WriteFile(src.SeedKeyPath(), []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	keyDir := t.TempDir()
	key, err := NewMoveKey("vm1")
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(keyDir, "key.pem")
	os.WriteFile(keyFile, key, 0o400)
	other, _ := NewMoveKey("vm1")
	otherFile := filepath.Join(keyDir, "other.pem")
	os.WriteFile(otherFile, other, 0o400)

	addr := freePort(t)
	var rlog, slog syncBuf
	done := make(chan error, 1)
	go func() { done <- Receive(ctx, dst, addr, keyFile, &rlog) }()

	// A sender without the key is refused, and the receiver waits on.
	sctx, scancel := context.WithTimeout(ctx, 3*time.Second)
	if err := Send(sctx, src, addr, otherFile, 0, &slog); err == nil {
		t.Fatal("a sender with another key was accepted")
	}
	scancel()
	if err := Send(ctx, src, addr, keyFile, 0, &slog); err != nil {
		t.Fatalf("send: %v\n%s\nreceiver:\n%s", err, slog.String(), rlog.String())
	}
	if err := <-done; err != nil {
		t.Fatalf("receive: %v\n%s", err, rlog.String())
	}
	for _, pair := range [][2]string{{src.ImagePath, dst.ImagePath}, {src.OVMFVars, dst.OVMFVars},
		{filepath.Join(src.TPMState, tpmFile), filepath.Join(dst.TPMState, tpmFile)}, {src.SeedKeyPath(), dst.SeedKeyPath()}} {
		a, _ := os.ReadFile(pair[0])
		b, err := os.ReadFile(pair[1])
		if err != nil || sha256.Sum256(a) != sha256.Sum256(b) {
			t.Errorf("%s differs from %s: %v", pair[1], pair[0], err)
		}
	}
	if fi, err := os.Stat(dst.SeedKeyPath()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the cloud-init key on the receiver: %v %v", fi, err)
	}
	if fi, err := os.Stat(dst.TPMState); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the TPM's folder on the receiver: %v %v", fi, err)
	}
	stale, _ := filepath.Glob(dst.ImagePath + ".stale-*")
	if b, _ := os.ReadFile(stale[0]); len(stale) != 1 || string(b) != "stale" {
		t.Errorf("stale copy not set aside: %v", stale)
	}
	if m, _ := filepath.Glob(filepath.Join(dst.StorageDir, "images", "*.incoming*")); len(m) > 0 {
		t.Errorf("temporaries left: %v", m)
	}
	t.Logf("sender:\n%s\nreceiver:\n%s", slog.String(), rlog.String())

	// Receiving onto the home, or sending from elsewhere, is refused.
	if err := Receive(ctx, src, freePort(t), keyFile, &rlog); err == nil || !strings.Contains(err.Error(), "is the VM's home") {
		t.Errorf("receive on the home: %v", err)
	}
	if err := Send(ctx, dst, addr, keyFile, 0, &slog); err == nil || !strings.Contains(err.Error(), "not the VM's home") {
		t.Errorf("send from a node that is not home: %v", err)
	}
}

// A sender refuses a disk a QEMU has open for writing.
func TestSendRefusesDiskInUse(t *testing.T) {
	src := cfgOn(t, t.TempDir(), "n1", "n1")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", src.ImagePath, "16M")
	w := exec.Command("qemu-io", "-f", "qcow2", src.ImagePath, "-c", "sleep 60000")
	w.Start()
	defer func() { w.Process.Kill(); w.Wait() }()
	time.Sleep(300 * time.Millisecond)
	keyFile := filepath.Join(t.TempDir(), "k.pem")
	key, _ := NewMoveKey("vm1")
	os.WriteFile(keyFile, key, 0o400)
	var log syncBuf
	err := Send(context.Background(), src, freePort(t), keyFile, 0, &log)
	if err == nil || !strings.Contains(err.Error(), "stop the VM before moving it") {
		t.Errorf("send of a disk in use: %v", err)
	}
}

// Set aside renames the VM's files off the home (its disk's check stamp
// goes), and refuses on it.
func TestSetAside(t *testing.T) {
	store := t.TempDir()
	cfg := cfgOn(t, store, "n1", "n2")
	os.WriteFile(cfg.ImagePath, []byte("disk"), 0o600)
	os.WriteFile(config.CheckedStamp(cfg.ImagePath), []byte("{}"), 0o600)
	var log syncBuf
	if err := SetAside(cfg, false, time.Now(), &log); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cfg.ImagePath); !os.IsNotExist(err) {
		t.Error("disk still under its name")
	}
	if _, err := os.Stat(config.CheckedStamp(cfg.ImagePath)); !os.IsNotExist(err) {
		t.Error("the disk's check stamp stayed behind")
	}
	if m, _ := filepath.Glob(cfg.ImagePath + ".moved-*"); len(m) != 1 {
		t.Errorf("set aside: %v", m)
	}
	home := cfgOn(t, store, "n1", "n1")
	if err := SetAside(home, true, time.Now(), &log); err == nil {
		t.Error("set aside on the home node")
	}
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Each side of a transfer waits only so long for the other: a receiver
// without a sender, or a sender without a receiver, ends by itself.
func TestPeerWaitBounded(t *testing.T) {
	defer func(d time.Duration) { peerWait = d }(peerWait)
	peerWait = 500 * time.Millisecond
	keyFile := filepath.Join(t.TempDir(), "k.pem")
	key, _ := NewMoveKey("vm1")
	os.WriteFile(keyFile, key, 0o400)
	var log syncBuf
	dst := cfgOn(t, t.TempDir(), "n1", "n2")
	if err := Receive(context.Background(), dst, freePort(t), keyFile, &log); err == nil || !strings.Contains(err.Error(), "no sender") {
		t.Errorf("receiver without a sender: %v", err)
	}
	src := cfgOn(t, t.TempDir(), "n1", "n1")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", src.ImagePath, "16M")
	if err := Send(context.Background(), src, freePort(t), keyFile, 0, &log); err == nil || !strings.Contains(err.Error(), "no receiver") {
		t.Errorf("sender without a receiver: %v", err)
	}
}

// A copy whose bytes do not match the checksum sent after them is refused,
// and nothing of it is installed: the VM's names on the receiver keep what
// they had, and no temporary is left. The sender here holds the transfer's
// key (a peer the TLS lets in) and sends a disk with one byte flipped on
// the way, after its true checksum.
func TestReceiveRefusesChecksumMismatch(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dst := cfgOn(t, t.TempDir(), "n1", "n2")
	os.WriteFile(dst.ImagePath, []byte("what was here"), 0o600)
	keyFile := filepath.Join(t.TempDir(), "key.pem")
	key, _ := NewMoveKey("vm1")
	os.WriteFile(keyFile, key, 0o400)
	disk := filepath.Join(t.TempDir(), "src.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", disk, "16M")
	run(t, "qemu-io", "-f", "qcow2", disk, "-c", "write -P 0x5a 0 1M")
	data, _ := os.ReadFile(disk)
	sum := sha256.Sum256(data)
	// The guest's data ends the file: a flipped byte there leaves a qcow2
	// that qemu-img check finds clean, so only the checksum can refuse it.
	data[len(data)-1] ^= 0xff

	addr := freePort(t)
	var rlog syncBuf
	done := make(chan error, 1)
	go func() { done <- Receive(ctx, dst, addr, keyFile, &rlog) }()
	tc, err := tlsConfig(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := dialRetry(ctx, addr, tc, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	h := header{VM: "vm1"}
	h.Files = append(h.Files, struct {
		Role string `json:"role"`
		Size int64  `json:"size"`
	}{roleDisk, int64(len(data))})
	hb, _ := json.Marshal(h)
	conn.Write(append(append(append(hb, '\n'), data...), sum[:]...))
	answer, _ := bufio.NewReader(conn).ReadString('\n')
	err = <-done
	if err == nil || !strings.Contains(err.Error(), "checksum mismatch") || !strings.Contains(answer, "checksum mismatch") {
		t.Fatalf("receive: %v, answer %q; want the copy refused for its checksum", err, answer)
	}
	if b, _ := os.ReadFile(dst.ImagePath); string(b) != "what was here" {
		t.Errorf("the receiver's %s changed: %q", dst.ImagePath, b)
	}
	if m, _ := filepath.Glob(filepath.Join(dst.StorageDir, "images", "*.incoming*")); len(m) > 0 {
		t.Errorf("temporaries left: %v", m)
	}
}

// The receiver of a move puts the TPM's state only into the VM's own 0700
// folder: an images/<vm>.tpm of another uid, or a link, is refused and
// nothing is installed. (Before: it took the existing folder, reopened its
// temporary by name, and 6 of 6 tries ended with the other uid's file
// installed as the TPM.)
func TestReceiveRefusesForeignTPMFolder(t *testing.T) {
	for _, plant := range []string{"another uid's folder", "a link"} {
		t.Run(plant, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			src := cfgOn(t, t.TempDir(), "n1", "n1")
			dst := cfgOn(t, t.TempDir(), "n1", "n2")
			src.TPM, dst.TPM = true, true
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", src.ImagePath, "16M")
			os.Mkdir(src.TPMState, 0o700)
			os.WriteFile(filepath.Join(src.TPMState, tpmFile), bytes.Repeat([]byte{0x7e}, 1370), 0o600)
			if plant == "a link" {
				os.Symlink(t.TempDir(), dst.TPMState)
			} else {
				os.Mkdir(dst.TPMState, 0o700)
				os.Chown(dst.TPMState, 4242, 4242)
			}
			keyFile := filepath.Join(t.TempDir(), "key.pem")
			key, _ := NewMoveKey("vm1")
			os.WriteFile(keyFile, key, 0o400)
			addr := freePort(t)
			var rlog, slog syncBuf
			done := make(chan error, 1)
			go func() { done <- Receive(ctx, dst, addr, keyFile, &rlog) }()
			if err := Send(ctx, src, addr, keyFile, 0, &slog); err == nil || !strings.Contains(err.Error(), "is not this VM's own 0700 folder") {
				t.Errorf("send: %v, want the receiver's refusal", err)
			}
			<-done
			if _, err := os.Stat(dst.ImagePath); !os.IsNotExist(err) {
				t.Errorf("the disk was installed though the TPM's folder was refused: %v", err)
			}
			if _, err := os.Lstat(filepath.Join(dst.TPMState, tpmFile)); !os.IsNotExist(err) {
				t.Errorf("the TPM's state was written into the refused folder: %v", err)
			}
		})
	}
}

// A connection that says nothing does not hold the receiver up: its
// handshake runs off the accept loop and is cut off after handshakeWait,
// and the real sender meanwhile gets through. (Before: the handshake ran
// on the loop without a deadline, and the sender waited behind it.)
func TestReceiverNotStalledBySilentPeer(t *testing.T) {
	defer func(d time.Duration) { handshakeWait = d }(handshakeWait)
	handshakeWait = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := cfgOn(t, t.TempDir(), "n1", "n1")
	dst := cfgOn(t, t.TempDir(), "n1", "n2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", src.ImagePath, "16M")
	keyFile := filepath.Join(t.TempDir(), "key.pem")
	key, _ := NewMoveKey("vm1")
	os.WriteFile(keyFile, key, 0o400)
	addr := freePort(t)
	var rlog, slog syncBuf
	done := make(chan error, 1)
	go func() { done <- Receive(ctx, dst, addr, keyFile, &rlog) }()
	var silent net.Conn
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var err error
		if silent, err = net.Dial("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	defer silent.Close()
	sctx, scancel := context.WithTimeout(ctx, handshakeWait/2)
	defer scancel()
	if err := Send(sctx, src, addr, keyFile, 0, &slog); err != nil {
		t.Fatalf("the sender behind a silent connection: %v\n%s", err, rlog.String())
	}
	if err := <-done; err != nil {
		t.Fatalf("receive: %v", err)
	}
	silent.SetReadDeadline(time.Now().Add(2 * handshakeWait))
	if _, err := silent.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the silent connection was not cut off: %v", err)
	}
}
