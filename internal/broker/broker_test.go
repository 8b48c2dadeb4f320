package broker

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/fdpass"
	"github.com/swarmvm/swarmvm/internal/kvmtest"
)

// TestMain doubles as helper processes: a client under another uid, a
// broker inside a network namespace, a frame sniffer on a bridge.
func TestMain(m *testing.M) {
	switch os.Getenv("BROKER_TEST_HELPER") {
	case "client":
		helperClient()
	case "broker":
		helperBroker()
	case "sniff":
		helperSniff()
	case "flood":
		helperFlood()
	case "ask-tap":
		helperAskTAP()
	case "bad-flood":
		helperBadFlood()
	case "hold":
		helperHold()
	case "count":
		helperCount()
	case "churn":
		helperChurn()
	}
	os.Exit(m.Run())
}

// helperBadFlood sends bad requests, each with a 4 KB VM name, as fast as
// it can for two seconds, and prints how many.
func helperBadFlood() {
	// Just under the size limit: the broker reads it whole.
	name := "../" + strings.Repeat("\x1bx", 560)
	msg, _ := json.Marshal(map[string]any{"version": 1, "vm": name, "kvm": true})
	n := 0
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); n++ {
		c, err := net.Dial("unixpacket", os.Getenv("SOCK"))
		if err != nil {
			continue
		}
		c.Write(msg)
		c.SetReadDeadline(time.Now().Add(time.Second))
		c.Read(make([]byte, 8192))
		c.Close()
	}
	fmt.Print(n)
	os.Exit(0)
}

// helperHold opens connections that send nothing and says, for each,
// whether the broker admitted it (no answer yet) or refused it at once.
func helperHold() {
	var held []net.Conn
	n, _ := strconv.Atoi(os.Getenv("CONNS"))
	for i := 0; i < n; i++ {
		c, err := net.Dial("unixpacket", os.Getenv("SOCK"))
		if err != nil {
			fmt.Println("dial:", err)
			continue
		}
		held = append(held, c)
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		b := make([]byte, 4096)
		if n, err := c.Read(b); err == nil {
			fmt.Printf("refused %s\n", b[:n])
		} else {
			fmt.Println("held")
		}
	}
	time.Sleep(1500 * time.Millisecond)
	os.Exit(0)
}

func helperClient() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := fdpass.Ask(ctx, os.Getenv("SOCK"), fdpass.Request{VM: "intruder", KVM: true})
	fmt.Print(err)
	os.Exit(0)
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// records parses the audit lines written so far.
func (s *syncBuf) records(t testing.TB) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(s.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("audit line is not JSON: %q", sc.Text())
		}
		out = append(out, m)
	}
	return out
}

type fixture struct {
	t      testing.TB
	cfg    Config
	audit  *syncBuf
	cancel context.CancelFunc
	b      *Broker
	done   chan error
}

// openDir is a folder other users may enter (t.TempDir's parent is 0700).
func openDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "broker-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startBroker starts a broker whose KVM grants are a stand-in: a memfd
// named standInName. What the tests of peers, limits, floods and TAPs
// measure does not depend on what the granted descriptor is, and they must
// run on hosts without KVM; TestGrantKVM grants the real device.
func startBroker(t testing.TB, mod func(*Config)) *fixture {
	t.Helper()
	return startBrokerWith(t, mod, func(string) (*os.File, error) {
		fd, err := unix.MemfdCreate(standInName, unix.MFD_CLOEXEC)
		if err != nil {
			return nil, err
		}
		return os.NewFile(uintptr(fd), standInName), nil
	})
}

const standInName = "kvm-stand-in"

// isStandIn reports whether f is a descriptor startStandIn's broker made.
func isStandIn(f *os.File) bool {
	target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	return err == nil && strings.HasPrefix(target, "/memfd:"+standInName+" ")
}

func startBrokerWith(t testing.TB, mod func(*Config), open func(string) (*os.File, error)) *fixture {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Socket = filepath.Join(openDir(t), "broker.sock")
	cfg.SocketMode, cfg.SocketGroup = 0o666, -1
	cfg.AllowUIDs = []int{os.Getuid()}
	cfg.RequestTimeout = 300 * time.Millisecond
	cfg.MaxPerPeer, cfg.MaxPerUID = 1000, 1000
	if mod != nil {
		mod(&cfg)
	}
	l, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, cfg: cfg, audit: &syncBuf{}, done: make(chan error, 1)}
	f.b = New(cfg, slog.New(slog.NewJSONHandler(f.audit, nil)), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	f.b.openKVM = open
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	go func() { f.done <- f.b.Serve(ctx, l) }()
	t.Cleanup(f.stop)
	// Serving (and its link watch set up) before the test counts the
	// broker's descriptors: one request, refused, waits for that.
	f.raw([]byte(`{"version":1,"vm":"ready"}`))
	// The broker answers before it lets go of the connection: a test
	// that counts connections must not find this one still held.
	f.idle()
	return f
}

// idle waits until the broker holds no admitted connection.
func (f *fixture) idle() {
	f.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for f.b.Conns() != 0 {
		if time.Now().After(deadline) {
			f.t.Fatalf("the broker still holds %d connections", f.b.Conns())
		}
		time.Sleep(time.Millisecond)
	}
}

func (f *fixture) stop() {
	f.cancel()
	<-f.done
	f.b.Wait()
	f.done <- nil
}

func (f *fixture) ask(req fdpass.Request) (*fdpass.Lease, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return fdpass.Ask(ctx, f.cfg.Socket, req)
}

// raw connects and sends bytes (and descriptors) as they are, then reads
// the broker's answer.
func (f *fixture) raw(msg []byte, files ...*os.File) (fdpass.Response, error) {
	c, err := net.Dial("unixpacket", f.cfg.Socket)
	if err != nil {
		return fdpass.Response{}, err
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	var oob []byte
	if len(files) > 0 {
		oob = unix.UnixRights(int(files[0].Fd()))
	}
	if msg != nil || oob != nil {
		if _, _, err := uc.WriteMsgUnix(msg, oob, nil); err != nil {
			return fdpass.Response{}, err
		}
	}
	uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, fs, err := fdpass.Recv(uc, 0)
	fdpass.Close(fs)
	if err != nil {
		return fdpass.Response{}, err
	}
	var r fdpass.Response
	return r, json.Unmarshal(b, &r)
}

// lastAudit waits for an audit record satisfying pred.
func (f *fixture) lastAudit(pred func(map[string]any) bool) map[string]any {
	f.t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		recs := f.audit.records(f.t)
		for i := len(recs) - 1; i >= 0; i-- {
			if pred(recs[i]) {
				return recs[i]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.t.Fatalf("no matching audit record in:\n%s", f.audit.String())
	return nil
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settle waits until descriptors and goroutines are back to a baseline.
func settle(t *testing.T, fds, goroutines int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, g := countFDs(t), runtime.NumGoroutine()
		if f <= fds && g <= goroutines {
			t.Logf("descriptors %d (baseline %d), goroutines %d (baseline %d)", f, fds, g, goroutines)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("descriptors %d (baseline %d), goroutines %d (baseline %d): not back to baseline", f, fds, g, goroutines)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestGrantKVM(t *testing.T) {
	kvmtest.Require(t)
	f := startBrokerWith(t, nil, openKVM)
	lease, err := f.ask(fdpass.Request{VM: "web-1", KVM: true})
	if err != nil {
		t.Fatal(err)
	}
	kvm := lease.Take(fdpass.FDKVM)
	defer kvm.Close()
	if v, err := unix.IoctlRetInt(int(kvm.Fd()), 0xAE00); err != nil || v != 12 {
		t.Fatalf("KVM_GET_API_VERSION on the granted descriptor = %d, %v", v, err)
	}
	rec := f.lastAudit(func(m map[string]any) bool { return m["result"] == "granted" })
	if rec["vm"] != "web-1" || rec["what"] != "kvm" || rec["peer_uid"] != float64(os.Getuid()) || rec["peer_pid"] != float64(os.Getpid()) || rec["time"] == nil {
		t.Errorf("audit record %v", rec)
	}
	lease.Close()
	f.lastAudit(func(m map[string]any) bool { return m["result"] == "lease-ended" && m["vm"] == "web-1" })
}

func TestRefusals(t *testing.T) {
	f := startBroker(t, func(c *Config) { c.Bridges = []string{"br-allowed"} })
	devnull, _ := os.Open(os.DevNull)
	defer devnull.Close()
	cases := []struct {
		name   string
		msg    []byte
		files  []*os.File
		reason string
	}{
		{"malformed", []byte(`{"version":1,`), nil, "malformed request"},
		{"unknown field", []byte(`{"version":1,"vm":"a","kvm":true,"path":"/dev/sda"}`), nil, "unknown field"},
		{"bad version", []byte(`{"version":7,"vm":"a","kvm":true}`), nil, "unsupported protocol version 7"},
		{"bad vm name", []byte(`{"version":1,"vm":"../etc","kvm":true}`), nil, "invalid vm name"},
		{"oversized", bytes.Repeat([]byte("x"), fdpass.MaxMessage+1), nil, "request larger than 4096 bytes"},
		{"descriptors sent to the broker", []byte(`{"version":1,"vm":"a","kvm":true}`), []*os.File{devnull}, "descriptors sent to the broker"},
		{"bridge not allowed", []byte(`{"version":1,"vm":"a","tap":{"bridge":"docker0"}}`), nil, `bridge "docker0" is not allowed`},
		{"bridge missing", []byte(`{"version":1,"vm":"a","tap":{"bridge":"br-allowed"}}`), nil, `bridge "br-allowed" does not exist on this node`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fds := countFDs(t)
			resp, err := f.raw(tc.msg, tc.files...)
			if err != nil {
				t.Fatal(err)
			}
			if resp.OK || !strings.Contains(resp.Error, tc.reason) || len(resp.FDs) != 0 {
				t.Fatalf("response %+v, want a refusal with %q", resp, tc.reason)
			}
			f.lastAudit(func(m map[string]any) bool {
				return m["result"] == "refused" && strings.Contains(fmt.Sprint(m["detail"]), tc.reason)
			})
			settle(t, fds, 1<<20)
		})
	}
}

func TestStalledClientIsCutOff(t *testing.T) {
	f := startBroker(t, nil)
	c, err := net.Dial("unixpacket", f.cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	began := time.Now()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _, err := fdpass.Recv(c.(*net.UnixConn), 0)
	if err != nil || !strings.Contains(string(b), "no request within 300ms") {
		t.Fatalf("stalled client got %q, %v", b, err)
	}
	if _, _, err := fdpass.Recv(c.(*net.UnixConn), 0); err == nil {
		t.Error("connection still open after the refusal")
	}
	t.Logf("stalled client cut off after %v", time.Since(began).Round(time.Millisecond))
}

// helperForOthers copies the test binary where other uids may run it (the
// build cache is root's alone).
func helperForOthers(t *testing.T) string {
	t.Helper()
	self, _ := os.Executable()
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(openDir(t), "helper")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

func TestDisallowedPeer(t *testing.T) {
	f := startBroker(t, nil)
	bin := helperForOthers(t)
	ask := func(uid, gid uint32) string {
		cmd := exec.Command(bin)
		cmd.Env = []string{"BROKER_TEST_HELPER=client", "SOCK=" + f.cfg.Socket}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("helper: %v", err)
		}
		return string(out)
	}
	if out := ask(4242, 4242); !strings.Contains(out, "broker refused: peer uid 4242 gid 4242 is not allowed") {
		t.Fatalf("client as uid 4242 got %q", out)
	}
	rec := f.lastAudit(func(m map[string]any) bool { return m["result"] == "refused" && m["peer_uid"] == float64(4242) })
	if rec["what"] != "" {
		t.Errorf("audit says something was opened: %v", rec)
	}
	// A VM service under its own uid, in the runner's group: allowed by
	// the default gid.
	if out := ask(10123456, 10001); out != "<nil>" {
		t.Fatalf("client as uid 10123456 gid 10001 got %q, want a grant", out)
	}
}

func TestConnectionLimits(t *testing.T) {
	f := startBroker(t, func(c *Config) { c.MaxPerPeer = 2 })
	var leases []*fdpass.Lease
	for i := 0; i < 2; i++ {
		l, err := f.ask(fdpass.Request{VM: fmt.Sprintf("vm-%d", i), KVM: true})
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	var refused *fdpass.RefusedError
	if _, err := f.ask(fdpass.Request{VM: "vm-3", KVM: true}); !errors.As(err, &refused) || !strings.Contains(refused.Reason, "too many connections from pid") {
		t.Fatalf("third connection from one process: %v", err)
	}
	for _, l := range leases {
		l.Close()
	}
	f.idle()
	l, err := f.ask(fdpass.Request{VM: "vm-4", KVM: true})
	if err != nil {
		t.Fatalf("after leases ended: %v", err)
	}
	l.Close()
}

// A hundred clients at once are served, each gets its own granted
// descriptor, and afterwards the broker holds no more descriptors or
// goroutines than before.
func TestHundredConcurrentClients(t *testing.T) {
	f := startBroker(t, nil)
	// Warm up the runtime's poller and the first connection.
	if l, err := f.ask(fdpass.Request{VM: "warm", KVM: true}); err == nil {
		l.Close()
	}
	time.Sleep(100 * time.Millisecond)
	fds, gs := countFDs(t), runtime.NumGoroutine()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			l, err := f.ask(fdpass.Request{VM: fmt.Sprintf("c-%d", i), KVM: true})
			if err != nil {
				errs <- err
				return
			}
			defer l.Close()
			kvm := l.Take(fdpass.FDKVM)
			if kvm == nil || !isStandIn(kvm) {
				errs <- fmt.Errorf("client %d: granted %v, not the broker's stand-in", i, kvm)
				return
			}
			kvm.Close()
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	settle(t, fds, gs)
	granted := 0
	for _, r := range f.audit.records(t) {
		if r["result"] == "granted" {
			granted++
		}
	}
	// One uid's grants have an audit budget a second (TestAuditBudgetsPerKind):
	// each is audited, or counted in a later line.
	if granted == 0 || granted < 101 && !strings.Contains(f.audit.String(), "more grants and lease ends of uid") {
		waitAudit(t, f, "more grants and lease ends of uid")
	}
}

func TestAnotherBrokerOnTheSocket(t *testing.T) {
	f := startBroker(t, nil)
	if _, err := Listen(f.cfg); !errors.Is(err, errAnotherBroker) {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Socket = filepath.Join(openDir(t), "broker.sock")
	cfg.SocketGroup = -1
	l, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close() // leaves the socket file behind, as a killed broker would
	l2, err := Listen(cfg)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l2.Close()
	fi, _ := os.Stat(filepath.Dir(cfg.Socket))
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("socket folder mode %v", fi.Mode().Perm())
	}
}

func TestNotify(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	if sent, err := Notify("READY=1"); !sent || err != nil {
		t.Fatalf("Notify: %v, %v", sent, err)
	}
	buf := make([]byte, 64)
	l.SetReadDeadline(time.Now().Add(time.Second))
	n, err := l.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("systemd would have read %q, %v", buf[:n], err)
	}
}

// A request replayed on a lease's connection grants nothing more: the
// broker reads it as a question on the lease, refuses it, and audits only
// the one grant.
func TestReplayedRequestGrantsNothing(t *testing.T) {
	f := startBroker(t, nil)
	c, err := net.Dial("unixpacket", f.cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	req := []byte(`{"version":1,"vm":"replay","kvm":true}`)
	for i := 0; i < 3; i++ {
		if err := fdpass.Send(uc, req); err != nil {
			t.Fatal(err)
		}
	}
	uc.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, files, err := fdpass.Recv(uc, fdpass.AnyFDs)
	if err != nil || len(files) != 1 {
		t.Fatalf("first answer: %d descriptors, %v", len(files), err)
	}
	fdpass.Close(files)
	// Each replay is a question on the lease, answered with an error and
	// no descriptor.
	for i := 0; i < 2; i++ {
		msg, more, err := fdpass.Recv(uc, fdpass.AnyFDs)
		fdpass.Close(more)
		if err != nil || len(more) != 0 || !strings.Contains(string(msg), "malformed lease request") {
			t.Fatalf("replay %d answered %q with %d descriptors (%v)", i+1, msg, len(more), err)
		}
	}
	grants := 0
	for _, r := range f.audit.records(t) {
		if r["result"] == "granted" && r["vm"] == "replay" {
			grants++
		}
	}
	if grants != 1 {
		t.Errorf("%d grants audited for one connection", grants)
	}
}

// helperFlood opens connections and never sends a request, as fast as it
// can, until killed: one peer trying to starve the others.
func helperFlood() {
	var held []net.Conn
	for {
		c, err := net.Dial("unixpacket", os.Getenv("SOCK"))
		if err == nil {
			held = append(held, c)
			if len(held) > 64 {
				held[0].Close()
				held = held[1:]
			}
		}
	}
}

// While one peer floods the broker with stalled connections, another is
// still served: the flooder hits its per-peer limit, and the others never
// wait for its requests to time out. Prints the latency figures.
func TestFloodDoesNotStarveOthers(t *testing.T) {
	f := startBroker(t, func(c *Config) {
		c.MaxPerPeer = 4
		c.RequestTimeout = 2 * time.Second
		c.AllowUIDs = []int{os.Getuid()}
	})
	self, _ := os.Executable()
	flood := exec.Command(self)
	flood.Env = []string{"BROKER_TEST_HELPER=flood", "SOCK=" + f.cfg.Socket}
	flooding := time.Now()
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { flood.Process.Kill(); flood.Wait() }()
	time.Sleep(300 * time.Millisecond) // the flood is on
	var lat []time.Duration
	for i := 0; i < 20; i++ {
		began := time.Now()
		var l *fdpass.Lease
		var err error
		// A full listen backlog answers connect with EAGAIN; the runner
		// retries that, and so does this peer.
		for {
			l, err = f.ask(fdpass.Request{VM: fmt.Sprintf("calm-%d", i), KVM: true})
			if !errors.Is(err, syscall.EAGAIN) || time.Since(began) > 5*time.Second {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("request %d during the flood: %v", i, err)
		}
		lat = append(lat, time.Since(began))
		l.Close()
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	records := f.audit.records(t)
	flooded := time.Since(flooding)
	refused, lines := 0, 0
	re := regexp.MustCompile(`and (\d+) more refusals`)
	for _, r := range records {
		if d := fmt.Sprint(r["detail"]); r["result"] == "refused" && strings.Contains(d, "too many connections from pid") {
			lines++
			refused++
			if m := re.FindStringSubmatch(d); m != nil {
				n, _ := strconv.Atoi(m[1])
				refused += n
			}
		}
	}
	fmt.Printf("broker under a flood from one peer: 20 requests from another, latency p50 %v, max %v; flooder refused %d+ times in %d audit lines; broker descriptors %d\n",
		lat[len(lat)/2].Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond), refused, lines, countFDs(t))
	if refused == 0 {
		t.Error("the flooder was never held to its per-peer limit")
	}
	// The audit's rate is bounded, not its count: a busy machine makes the
	// test (and the flood) last longer.
	if most := int(flooded.Seconds()*overLimitPerSec) + 2; lines > most {
		t.Errorf("%d audit lines for one flooding peer in %v (at most %d a second): the audit log can be flooded", lines, flooded.Round(time.Millisecond), overLimitPerSec)
	}
	// The bound that matters: nobody waits for the flooder's stalled
	// requests to time out.
	if lat[len(lat)-1] >= f.cfg.RequestTimeout {
		t.Errorf("a request waited %v, as long as the flooder's request timeout", lat[len(lat)-1])
	}
}

// One uid flooding from many processes is held to its uid's limit,
// whatever their pids, while another uid still gets KVM.
func TestPerUIDLimit(t *testing.T) {
	f := startBroker(t, func(c *Config) {
		c.MaxPerUID, c.MaxPerPeer = 3, 2
		c.AllowUIDs = []int{os.Getuid(), 4242}
		c.RequestTimeout = 3 * time.Second
	})
	bin := helperForOthers(t)
	outs := make(chan []byte, 5)
	for i := 0; i < 5; i++ {
		cmd := exec.Command(bin)
		cmd.Env = []string{"BROKER_TEST_HELPER=hold", "SOCK=" + f.cfg.Socket, "CONNS=1"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
		go func() { out, _ := cmd.CombinedOutput(); outs <- out }()
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // the five processes hold what they got
	l, err := f.ask(fdpass.Request{VM: "other-tenant", KVM: true})
	if err != nil {
		t.Errorf("another uid while uid 4242 is at its limit: %v, want KVM", err)
	} else {
		l.Close()
	}
	var all strings.Builder
	for i := 0; i < 5; i++ {
		all.Write(<-outs)
	}
	if out := all.String(); strings.Count(out, "held") != 3 || strings.Count(out, "too many connections from uid 4242 (limit 3)") != 2 {
		t.Errorf("five processes of uid 4242, one connection each:\n%s", out)
	}
}

// A flood of bad requests from one uid, each with a 4 KB VM name full of
// escape characters, grows the audit log by a bounded amount: a few lines a
// second, the client's strings capped and escaped, the rest counted.
func TestRefusalFloodBoundsTheAudit(t *testing.T) {
	f := startBroker(t, func(c *Config) { c.AllowUIDs = []int{os.Getuid(), 4242} })
	cmd := exec.Command(helperForOthers(t))
	cmd.Env = []string{"BROKER_TEST_HELPER=bad-flood", "SOCK=" + f.cfg.Socket}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	sent, _ := strconv.Atoi(string(out))
	size := len(f.audit.String())
	lines := strings.Count(f.audit.String(), "\n")
	t.Logf("%d bad requests in 2 s: %d audit lines, %d bytes", sent, lines, size)
	if sent < 100 {
		t.Fatalf("only %d requests sent", sent)
	}
	if lines > 3*refusalsPerSecond || size > 64<<10 {
		t.Errorf("%d requests made %d audit lines, %d bytes: the audit log can be flooded", sent, lines, size)
	}
	if strings.Contains(f.audit.String(), "\x1b") {
		t.Error("a raw escape character reached the audit log")
	}
	for _, r := range f.audit.records(t) {
		if vm := fmt.Sprint(r["vm"]); len(vm) > 100 {
			t.Errorf("a client's VM name in the audit: %d bytes", len(vm))
			break
		}
	}
	if !strings.Contains(f.audit.String(), "more refusals of uid 4242") {
		t.Error("the audit does not count the refusals it left out")
	}
}

// Connections are bounded in all, and so is what the broker holds: past
// MaxConns a peer is refused ("too many connections"), and under a flood of
// connections that never send, the broker holds at most MaxConns of them
// (until their request timeout) plus refusalSlots being turned away; the
// kernel's listen backlog keeps the rest, holding none of its descriptors.
func TestTotalConnectionsBounded(t *testing.T) {
	const maxConns = 8
	f := startBroker(t, func(c *Config) { c.MaxConns = maxConns; c.RequestTimeout = 3 * time.Second })
	var leases []*fdpass.Lease
	for i := 0; i < maxConns; i++ {
		l, err := f.ask(fdpass.Request{VM: fmt.Sprintf("vm-%d", i), KVM: true})
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l)
	}
	var refused *fdpass.RefusedError
	if _, err := f.ask(fdpass.Request{VM: "one-more", KVM: true}); !errors.As(err, &refused) || refused.Reason != fmt.Sprintf("too many connections (limit %d)", maxConns) {
		t.Fatalf("a connection past MaxConns: %v, want refused for the total", err)
	}
	for _, l := range leases {
		l.Close()
	}
	f.idle()

	stop := make(chan struct{})
	peak := make(chan int)
	go func() {
		most := 0
		for {
			select {
			case <-stop:
				peak <- most
				return
			default:
			}
			most = max(most, f.b.Held())
			time.Sleep(200 * time.Microsecond)
		}
	}()
	var flood []net.Conn
	dialled := 0
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		c, err := net.Dial("unixpacket", f.cfg.Socket)
		if err != nil { // EAGAIN: the backlog is full, as it should be
			time.Sleep(time.Millisecond)
			continue
		}
		dialled++
		flood = append(flood, c)
	}
	close(stop)
	most := <-peak
	for _, c := range flood {
		c.Close()
	}
	t.Logf("%d silent connections dialled in 1 s; the broker held at most %d at once (bound %d)", dialled, most, maxConns+refusalSlots)
	if most > maxConns+refusalSlots {
		t.Errorf("the broker held %d connections at once, over MaxConns %d + %d refusal slots", most, maxConns, refusalSlots)
	}
	if most <= maxConns || dialled <= maxConns+refusalSlots {
		t.Errorf("the flood did not go past MaxConns (held at most %d, %d dialled): the bound was not put to the test", most, dialled)
	}
}

// A peer whose pid the broker cannot see (pid 0: here the broker runs in a
// pid namespace of its own, as a broker container without --pid host does)
// is held to its uid's limit only, with one warning: the per-process limit
// (here 1) would otherwise count every such peer as one process.
func TestPidZeroPeer(t *testing.T) {
	sock := filepath.Join(openDir(t), "broker.sock")
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = []string{"BROKER_TEST_HELPER=broker", "SOCK=" + sock, "ALLOW_UIDS=" + strconv.Itoa(os.Getuid()),
		"KVM_STAND_IN=1", "MAX_PER_PEER=1", "MAX_PER_UID=3"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	audit, logs := &syncBuf{}, &syncBuf{}
	cmd.Stdout, cmd.Stderr = audit, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("broker audit:\n%s\nbroker log:\n%s", audit, logs)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the broker in its own pid namespace did not listen")
		}
	}
	ask := func(vm string) (*fdpass.Lease, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return fdpass.Ask(ctx, sock, fdpass.Request{VM: vm, KVM: true})
	}
	for i := 0; i < 3; i++ {
		l, err := ask(fmt.Sprintf("vm-%d", i))
		if err != nil {
			t.Fatalf("connection %d from one process seen as pid 0: %v, want a grant (the uid's limit is 3)", i+1, err)
		}
		defer l.Close()
	}
	var refused *fdpass.RefusedError
	if _, err := ask("vm-3"); !errors.As(err, &refused) || !strings.Contains(refused.Reason, fmt.Sprintf("too many connections from uid %d (limit 3)", os.Getuid())) {
		t.Fatalf("a fourth connection: %v, want refused at the uid's limit", err)
	}
	if !strings.Contains(audit.String(), `"peer_pid":0`) || strings.Contains(audit.String(), fmt.Sprintf(`"peer_pid":%d`, os.Getpid())) {
		t.Errorf("the broker saw this process's pid, not 0:\n%s", audit)
	}
	if n := strings.Count(logs.String(), "a peer's pid is not visible"); n != 1 {
		t.Errorf("%d warnings about invisible pids, want 1", n)
	}
}

// Each kind of audit line has its own budget per uid: during a flood of bad
// requests from a uid, that uid's refusal by policy (a bridge it was not
// given) is still audited (before: the flood kept it out); and a flood of
// grants from a uid writes a bounded number of lines, with counts.
func TestAuditBudgetsPerKind(t *testing.T) {
	f := startBroker(t, func(c *Config) { c.AllowUIDs = []int{os.Getuid(), 4242}; c.Bridges = []string{"br-allowed@0"} })
	flood := exec.Command(helperForOthers(t))
	flood.Env = []string{"BROKER_TEST_HELPER=bad-flood", "SOCK=" + f.cfg.Socket}
	flood.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the flood has spent this second's budget
	ask := exec.Command(helperForOthers(t))
	ask.Env = []string{"BROKER_TEST_HELPER=ask-tap", "SOCK=" + f.cfg.Socket, "VM=policy-probe", "BRIDGE=br-allowed"}
	ask.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	out, _ := ask.CombinedOutput()
	flood.Wait()
	if !strings.Contains(string(out), "not open to uid 4242") {
		t.Fatalf("uid 4242 on a bridge given to uid 0: %s", out)
	}
	if !strings.Contains(f.audit.String(), `"vm":"policy-probe"`) {
		t.Errorf("the policy refusal is not in the audit, kept out by the flood of bad requests")
	}

	began := time.Now()
	n := 0
	for ; time.Since(began) < time.Second; n++ {
		l, err := f.ask(fdpass.Request{VM: fmt.Sprintf("g-%d", n), KVM: true})
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
	f.idle()
	grants := strings.Count(f.audit.String(), `"result":"granted"`)
	took := time.Since(began)
	t.Logf("%d grants in %v: %d granted lines", n, took.Round(time.Millisecond), grants)
	if n < 3*refusalsPerSecond {
		t.Fatalf("only %d grants in a second", n)
	}
	if most := int(took.Seconds()+2) * refusalsPerSecond; grants > most {
		t.Errorf("%d grants made %d audit lines, more than %d a second", n, grants, refusalsPerSecond)
	}
	waitAudit(t, f, "more grants and lease ends of uid")
}

func waitAudit(t *testing.T, f *fixture, want string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !strings.Contains(f.audit.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the audit never said %q", want)
		}
		f.ask(fdpass.Request{VM: "late", KVM: true}) // the next second's first line carries the count
		time.Sleep(200 * time.Millisecond)
	}
}

// A lease without a TAP has no counters, and says so; a holder asking in a
// loop is answered at most four times a second, and a malformed question
// gets an error, never the end of the lease.
func TestLeaseStatsWithoutTAP(t *testing.T) {
	f := startBroker(t, nil)
	lease, err := f.ask(fdpass.Request{VM: "web-1", KVM: true})
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Close()
	lease.Take(fdpass.FDKVM).Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	for i := 0; i < 5; i++ {
		if _, err := lease.Stats(ctx); err == nil || !strings.Contains(err.Error(), "this lease has no TAP") {
			t.Fatalf("stats of a KVM lease: %v", err)
		}
	}
	if took := time.Since(start); took < 4*leaseAnswerEvery {
		t.Errorf("5 answers in %v: not spaced by %v", took, leaseAnswerEvery)
	}
	for _, msg := range []string{`{"version":1}`, `{"version":2,"stats":true}`, `{"version":1,"stats":true,"tap":"svm0"}`, `nonsense`} {
		r, err := fdpass.DecodeLeaseRequest([]byte(msg))
		if err == nil {
			t.Errorf("%s decoded as %+v", msg, r)
		}
	}
	select {
	case <-lease.Ended():
		t.Fatal("the broker ended the lease")
	default:
	}
}
