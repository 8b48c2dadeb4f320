package vmdisk

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/poll"
	"github.com/swarmvm/swarmvm/internal/preflight"
	"github.com/swarmvm/swarmvm/internal/qemu"
)

// A move's two tasks share one key pair, made for that move and handed to
// both as a Swarm secret (which Swarm keeps encrypted and gives only to
// their containers). Each side proves it holds it, and checks that the
// other shows the same certificate: no one else can send a VM's disk to
// the receiver or read it from the sender, whatever the network.

// NewMoveKey makes a fresh key pair and self-signed certificate, as PEM.
func NewMoveKey(vm string) ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "swarmvm move " + vm},
		DNSNames: []string{"swarmvm-move"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})...), nil
}

// tlsConfig accepts exactly the peer that shows the transfer's
// certificate.
func tlsConfig(keyFile string) (*tls.Config, error) {
	b, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("move key: %w", err)
	}
	cert, err := tls.X509KeyPair(b, b)
	if err != nil {
		return nil, fmt.Errorf("move key: %w", err)
	}
	mine := cert.Certificate[0]
	pin := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) != 1 || !bytes.Equal(raw[0], mine) {
			return errors.New("the peer does not hold this move's key")
		}
		return nil
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13,
		ClientAuth:            tls.RequireAnyClientCert,
		InsecureSkipVerify:    true, // no CA: the pin below is the whole check
		VerifyPeerCertificate: pin,
	}, nil
}

// header opens a transfer: the files that follow, in order, each followed
// by its SHA-256.
type header struct {
	VM    string `json:"vm"`
	Files []struct {
		Role string `json:"role"` // disk, nvram, tpm or cloud-init-key: the receiver names them itself
		Size int64  `json:"size"`
	} `json:"files"`
}

type reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

const maxHeader = 4 << 10

// peerWait bounds how long each side waits for the other to appear: a
// task whose peer is gone (its move cancelled or killed) ends by itself.
var peerWait = 15 * time.Minute

// Send streams the VM's files from its home node to the receiver at peer
// (host:port), holding QEMU's image lock on each while it reads, so that no
// QEMU can write them meanwhile. rate limits the bytes a second (0: no
// limit). It returns once the receiver has checked and installed the copy.
func Send(ctx context.Context, cfg config.Config, peer, keyFile string, rate int64, log io.Writer) error {
	if err := onHome(cfg); err != nil {
		return err
	}
	tc, err := tlsConfig(keyFile)
	if err != nil {
		return err
	}
	var h header
	h.VM = cfg.Name
	var open []*os.File
	defer func() {
		for _, f := range open {
			f.Close()
		}
	}()
	for _, vf := range vmFiles(cfg) {
		f, err := os.Open(vf.path)
		if errors.Is(err, os.ErrNotExist) && vf.role != roleDisk {
			continue // a VM that never started has no NVRAM, TPM state or key yet
		}
		if err != nil {
			return err
		}
		open = append(open, f)
		// The disk's lock keeps its QEMU, and so its swtpm, from starting.
		if vf.role == roleDisk || vf.role == roleNVRAM {
			if err := qemu.LockRead(f); err != nil {
				return fmt.Errorf("%w — stop the VM before moving it", err)
			}
		}
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		h.Files = append(h.Files, struct {
			Role string `json:"role"`
			Size int64  `json:"size"`
		}{vf.role, fi.Size()})
	}
	conn, err := dialRetry(ctx, peer, tc, log)
	if err != nil {
		return err
	}
	defer conn.Close()
	return sendOn(conn, h, open, rate, log)
}

func dialRetry(ctx context.Context, peer string, tc *tls.Config, log io.Writer) (*tls.Conn, error) {
	d := tls.Dialer{Config: tc, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	ctx, cancel := context.WithTimeout(ctx, peerWait)
	defer cancel()
	var conn net.Conn
	var last error
	err := poll.Until(ctx, time.Second, func(ctx context.Context) (bool, error) {
		conn, last = d.DialContext(ctx, "tcp", peer)
		return last == nil, nil
	})
	if err != nil {
		return nil, fmt.Errorf("no receiver at %s: %w", peer, cmp.Or(last, err))
	}
	fmt.Fprintf(log, "connected to %s\n", peer)
	return conn.(*tls.Conn), nil
}

func sendOn(conn *tls.Conn, h header, open []*os.File, rate int64, log io.Writer) error {
	w := bufio.NewWriterSize(conn, 1<<20)
	hb, _ := json.Marshal(h)
	w.Write(append(hb, '\n'))
	var total int64
	for _, f := range h.Files {
		total += f.Size
	}
	m := newMeter("sending", total, rate, log)
	buf := make([]byte, 1<<20)
	for i, f := range open {
		sum := sha256.New()
		n, err := io.CopyBuffer(io.MultiWriter(w, sum), &meteredReader{r: io.LimitReader(f, h.Files[i].Size), m: m}, buf)
		if err == nil && n != h.Files[i].Size {
			err = fmt.Errorf("%s changed size while being read", f.Name())
		}
		if err != nil {
			return fmt.Errorf("send %s: %w", f.Name(), err)
		}
		w.Write(sum.Sum(nil))
		fmt.Fprintf(log, "sent %s: %d bytes, sha256 %x\n", f.Name(), n, sum.Sum(nil))
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(conn, maxHeader)).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("no answer from the receiver: %w", err)
	}
	var r reply
	if err := json.Unmarshal(line, &r); err != nil || !r.OK {
		return fmt.Errorf("the receiver refused the copy: %s", r.Error)
	}
	fmt.Fprintln(log, "the receiver checked and installed the copy")
	return nil
}

// Receive takes one transfer on listen (":port") onto this node, which
// must not be the VM's home: each file is written under a temporary name,
// its checksum compared, the disk checked with qemu-img, and only then are
// they given the VM's names. Files already under those names here (a copy
// left from before, which does not count) are set aside first, never
// overwritten.
func Receive(ctx context.Context, cfg config.Config, listen, keyFile string, log io.Writer) error {
	if err := offHome(cfg); err != nil {
		return err
	}
	log = &lockedWriter{w: log}
	conn, err := Accept(ctx, listen, keyFile, log)
	if err != nil {
		return err
	}
	err = receiveOn(ctx, cfg, conn, log)
	r := reply{OK: err == nil}
	if err != nil {
		r.Error = err.Error()
	}
	b, _ := json.Marshal(r)
	conn.Write(append(b, '\n'))
	conn.Close()
	return err
}

// Accept listens on listen (":port") for the one peer that holds the
// transfer's key (a move's, a backup's), and returns its connection once
// its TLS handshake is done; it stops listening then.
func Accept(ctx context.Context, listen, keyFile string, log io.Writer) (net.Conn, error) {
	tc, err := tlsConfig(keyFile)
	if err != nil {
		return nil, err
	}
	l, err := tls.Listen("tcp", listen, tc)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	if _, ok := log.(*lockedWriter); !ok {
		log = &lockedWriter{w: log} // the handshakes log from their own goroutines
	}
	fmt.Fprintf(log, "waiting for the sender on %s\n", listen)
	sender := make(chan net.Conn, 1)
	go acceptSender(ctx, l, log, sender)
	select {
	case conn := <-sender:
		return conn, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("no sender: %w", ctx.Err())
	case <-time.After(peerWait):
		return nil, fmt.Errorf("no sender within %v", peerWait)
	}
}

// Dial connects to the peer at peer (host:port) that holds the transfer's
// key, trying again until it answers or peerWait ends.
func Dial(ctx context.Context, peer, keyFile string, log io.Writer) (*tls.Conn, error) {
	tc, err := tlsConfig(keyFile)
	if err != nil {
		return nil, err
	}
	return dialRetry(ctx, peer, tc, log)
}

// handshakeWait bounds each connection's TLS handshake: a peer that
// connects and says nothing is cut off, and holds up no one meanwhile.
var handshakeWait = 10 * time.Second

// acceptSender takes connections until l closes, each handshake on its own
// and within handshakeWait, and hands the first sender that completes one
// on: a silent or refused connection cannot stall the receiver.
func acceptSender(ctx context.Context, l net.Listener, log io.Writer, sender chan<- net.Conn) {
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			tc := conn.(*tls.Conn)
			tc.SetDeadline(time.Now().Add(handshakeWait))
			if err := tc.HandshakeContext(ctx); err != nil {
				fmt.Fprintf(log, "refused a connection from %s: %v\n", conn.RemoteAddr(), err)
				conn.Close()
				return
			}
			tc.SetDeadline(time.Time{})
			select {
			case sender <- conn:
			default: // another sender was first
				fmt.Fprintf(log, "refused a second sender from %s\n", conn.RemoteAddr())
				conn.Close()
			}
		}()
	}
}

// lockedWriter lets the handshakes' goroutines log to one writer.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func receiveOn(ctx context.Context, cfg config.Config, conn net.Conn, log io.Writer) error {
	br := bufio.NewReaderSize(conn, 1<<20)
	line, err := br.ReadSlice('\n')
	if err != nil || len(line) > maxHeader {
		return fmt.Errorf("bad header: %v", err)
	}
	var h header
	if err := json.Unmarshal(line, &h); err != nil || h.VM != cfg.Name || len(h.Files) == 0 || len(h.Files) > 4 {
		return fmt.Errorf("bad header for VM %s: %q", cfg.Name, line)
	}
	dest := map[string]string{}
	for _, vf := range vmFiles(cfg) {
		dest[vf.role] = vf.path
	}
	seen := map[string]bool{}
	var temps, finals []string
	defer func() {
		for _, t := range temps {
			os.Remove(t)
		}
	}()
	var total int64
	for _, f := range h.Files {
		total += f.Size
	}
	m := newMeter("receiving", total, 0, log)
	for i, f := range h.Files {
		final := dest[f.Role]
		if final == "" || seen[f.Role] || f.Size < 0 || (i == 0) != (f.Role == roleDisk) {
			return fmt.Errorf("bad file %d in the header: %+v", i, f)
		}
		seen[f.Role] = true
		if err := destFolder(cfg, f.Role, final); err != nil {
			return err
		}
		tmp, err := receiveFile(br, final, f.Size, m)
		if tmp != "" {
			temps = append(temps, tmp)
		}
		if err != nil {
			return err
		}
		finals = append(finals, final)
	}
	res, err := (qemu.Img{}).Check(ctx, temps[0])
	if err == nil && res.Corruptions+res.CheckErrors > 0 {
		err = fmt.Errorf("%d corruptions, %d check errors", res.Corruptions, res.CheckErrors)
	}
	if err != nil {
		return fmt.Errorf("the copied disk failed qemu-img check: %w", err)
	}
	fmt.Fprintln(log, "the copied disk is clean (qemu-img check)")
	return install(temps, finals, log)
}

// destFolder makes, or checks, the folder a received file goes into: the
// folders below the storage root one level at a time, each root's or this
// VM's (preflight.MkdirOwn), and the TPM's state folder the VM's own 0700
// folder, as the runner makes it. A TPM folder of another uid, or a link,
// is refused: its owner would get the TPM's whole state.
func destFolder(cfg config.Config, role, final string) error {
	variable := map[string]string{roleDisk: "IMAGE_PATH", roleNVRAM: "OVMF_VARS", roleTPM: "TPM_STATE", roleKey: "IMAGE_PATH"}[role]
	dir := filepath.Dir(final)
	if role == roleTPM {
		dir = filepath.Dir(cfg.TPMState) // the state folder itself is made 0700 below
	}
	if err := preflight.MkdirOwn(cfg.StorageDir, variable, dir, 0o750); err != nil {
		return err
	}
	if role != roleTPM {
		return nil
	}
	if err := os.Mkdir(cfg.TPMState, 0o700); err == nil || !errors.Is(err, os.ErrExist) {
		return err
	}
	var st unix.Stat_t
	if err := unix.Lstat(cfg.TPMState, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != os.Geteuid() || st.Mode&0o777 != 0o700 {
		return fmt.Errorf("TPM_STATE %s is here already and is not this VM's own 0700 folder (%s, uid %d, mode %#o): remove it if it is not this VM's, and move again",
			cfg.TPMState, map[bool]string{true: "a folder", false: "not a folder"}[st.Mode&unix.S_IFMT == unix.S_IFDIR], st.Uid, st.Mode&0o7777)
	}
	return nil
}

// receiveFile writes size bytes to a new file beside final, through the
// descriptor that made it (never reopened by name), and checks the SHA-256
// that follows them.
func receiveFile(r io.Reader, final string, size int64, m *meter) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(final), "."+filepath.Base(final)+".incoming-*")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	defer f.Close()
	sum := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(f, sum), &meteredReader{r: r, m: m}, size); err != nil {
		return tmp, fmt.Errorf("receive %s: %w", final, err)
	}
	want := make([]byte, sha256.Size)
	if _, err := io.ReadFull(r, want); err != nil {
		return tmp, fmt.Errorf("receive %s: %w", final, err)
	}
	if got := sum.Sum(nil); !bytes.Equal(got, want) {
		return tmp, fmt.Errorf("%s: checksum mismatch (sent %x, received %x)", final, want, got)
	}
	if err := f.Sync(); err != nil {
		return tmp, err
	}
	fmt.Fprintf(m.log, "received %s: %d bytes, sha256 %x\n", final, size, want)
	return tmp, nil
}

// install gives the checked temporaries the VM's names, setting aside what
// held those names on this node.
func install(temps, finals []string, log io.Writer) error {
	now := time.Now()
	for i, final := range finals {
		if _, err := os.Lstat(final); err == nil {
			aside, err := SetAsideFile(final, "stale", now)
			if err != nil {
				return err
			}
			fmt.Fprintf(log, "an older copy here was set aside: %s\n", aside)
		}
		if err := qemu.Publish(temps[i], final); err != nil {
			return err
		}
		fmt.Fprintf(log, "installed %s\n", final)
	}
	return nil
}
