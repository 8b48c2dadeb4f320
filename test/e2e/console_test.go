package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
	"github.com/coder/websocket"

	"github.com/swarmvm/swarmvm/internal/console"
)

// A VM deployed with a console serves its screen on the published port of
// its node: `swarmvm console` prints the address with a ticket; with it, a
// websocket client completes the RFB handshake with QEMU's display and gets
// a framebuffer update that is not blank, and Chromium shows noVNC
// connected; `swarmvm console --serial` types into the guest's shell and
// reads the answer, unless its ticket is view-only; without a ticket, with another
// VM's, an expired one or one signed with another key, every path answers
// 401, and the runner audits each refusal. The key reaches the task as a
// secret only the VM's uid can read, and never appears in its log.
func TestWebConsole(t *testing.T) {
	e := newSwarmEnv(t)
	e.label(true)
	keys := t.TempDir()
	t.Setenv("SWARMVM_CONSOLE_KEYS", keys)
	name := fmt.Sprintf("e2e-con-%d", time.Now().UnixNano()%100000)
	e.removeAfter(name)
	port := freePort(t)
	args := e.vmArgs(name, "tcg", "--console-port", fmt.Sprint(port), "--env", "KERNEL_CMDLINE=console=tty0 console=ttyS0 swarmvm.shell=1")
	out, code := e.swarmvm(append([]string{"deploy", "--wait", "90s"}, args...)...)
	if code != 0 {
		t.Fatalf("deploy: exit %d\n%s", code, out)
	}
	contains(t, "deploy output", out, "console key made in "+filepath.Join(keys, name+".key"))
	waitFor(t, "the web console", func() bool { return strings.Contains(serviceLogs(name), "web console ready") })

	out, code = e.swarmvm("console", name, "--ttl", "5m")
	if code != 0 {
		t.Fatalf("swarmvm console: exit %d\n%s", code, out)
	}
	t.Logf("swarmvm console:\n%s", out)
	var consoleURL *url.URL
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "http://") {
			consoleURL, _ = url.Parse(strings.TrimSpace(line))
		}
	}
	if consoleURL == nil || consoleURL.Port() != fmt.Sprint(port) || consoleURL.Query().Get("ticket") == "" {
		t.Fatalf("no console address with a ticket on port %d in:\n%s", port, out)
	}
	base := "http://" + consoleURL.Host

	// The page: the ticket is traded for a one-use session, no cookie is
	// set, and noVNC's viewer is served.
	jar := &cookieJar{}
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second}
	resp, err := hc.Get(consoleURL.String())
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), "noVNC") || !strings.Contains(resp.Request.URL.String(), "/vnc.html") || len(jar.cs) != 0 {
		t.Errorf("console page: %d at %s, cookies %v; want noVNC's viewer and no cookie", resp.StatusCode, resp.Request.URL, jar.cs)
	}

	// The display, through the websocket, with the ticket (as swarmvm
	// console --serial gives it).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws://"+consoleURL.Host+console.WebsocketPath+"?ticket="+consoleURL.Query().Get("ticket"), &websocket.DialOptions{
		Subprotocols: []string{"binary"},
	})
	if err != nil {
		t.Fatalf("websocket: %v", err)
	}
	conn := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	w, h, lit := rfbFirstFrame(t, conn)
	conn.Close()
	t.Logf("RFB: %dx%d framebuffer, %d of its bytes not zero", w, h, lit)
	// The guest's kernel writes its messages on the screen too (console=tty0):
	// lines of text, not a cursor alone.
	if w == 0 || h == 0 || lit < 10000 {
		t.Errorf("framebuffer %dx%d with %d bytes lit: want the guest's screen of text", w, h, lit)
	}

	// A person's browser: the same address opens noVNC, which connects
	// and draws the guest's screen. Then the browser visits another
	// service on another port of this host (as a tenant's web server
	// would be): it gets no cookie, nothing of the console's. (Before, the
	// ticket's cookie went along, and opened an input session there.)
	otherService, seen := cookieRecorder(t)
	lit, png, href := browserConsole(t, consoleURL.String(), otherService)
	shot := filepath.Join(os.TempDir(), "swarmvm-web-console.png")
	os.WriteFile(shot, png, 0o644)
	t.Logf("Chromium: noVNC connected, %d pixels of its canvas lit; screenshot %s", lit, shot)
	if lit < 5000 {
		t.Errorf("noVNC's canvas has %d pixels lit: blank, or a cursor alone", lit)
	}
	if got := seen(); got != "visited, no cookie" {
		t.Errorf("another service on this host, visited after the console: %s", got)
	}
	if strings.Contains(href, consoleURL.Query().Get("ticket")) {
		t.Errorf("the ticket stayed in the browser's address: %s", href)
	}
	// A view-only ticket in the browser: noVNC connects (its handshake
	// went through the view-only filter) and shows the screen.
	viewOut, code := e.swarmvm("console", name, "--ttl", "5m", "--view-only")
	var viewURL string
	for _, line := range strings.Split(viewOut, "\n") {
		if strings.HasPrefix(line, "http://") {
			viewURL = strings.TrimSpace(line)
		}
	}
	if code != 0 || viewURL == "" {
		t.Fatalf("swarmvm console --view-only: exit %d\n%s", code, viewOut)
	}
	vlit, _, vhref := browserConsole(t, viewURL, otherService)
	t.Logf("Chromium with a view-only ticket: noVNC connected, %d pixels lit (%s)", vlit, vhref)
	if vlit < 5000 || !strings.Contains(vhref, "view_only=true") {
		t.Errorf("view-only in noVNC: %d pixels lit at %s; want the screen, view only", vlit, vhref)
	}

	// The serial console: a command typed through swarmvm console --serial
	// runs in the guest's shell and its output comes back; the log on the
	// volume has it too. A view-only ticket's keystrokes are refused.
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "SWARMVM-GUEST-SHELL", 120*time.Second)
	cmd := exec.Command(swarmvmBin(t), "console", name, "--serial")
	cmd.Stdin = strings.NewReader("echo SWARMVM-SERIAL-$((6*7))\n")
	serialOut, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(serialOut), "SWARMVM-SERIAL-42") {
		t.Errorf("swarmvm console --serial: %v; output lacks the command's answer:\n%s", err, serialOut)
	}
	waitFile(t, filepath.Join(e.storage, "logs", name+".serial.log"), "SWARMVM-SERIAL-42", 10*time.Second)
	// The same in the browser: the serial page (xterm.js), typed into.
	var serialURL string
	for _, line := range strings.Split(out, "\n") {
		if u, ok := strings.CutPrefix(line, "serial console: "); ok {
			serialURL = strings.TrimSpace(u)
		}
	}
	if serialURL == "" {
		t.Fatalf("swarmvm console printed no serial page address:\n%s", out)
	}
	if text, state := browserSerial(t, serialURL, "echo SWARMVM-WEB-$((5*5))\n", "SWARMVM-WEB-25"); !strings.Contains(text, "SWARMVM-WEB-25") {
		logs, _ := exec.Command("docker", "service", "logs", "--raw", name).CombinedOutput()
		var consoleLines []string
		for _, l := range strings.Split(string(logs), "\n") {
			if strings.Contains(l, "console") || strings.Contains(l, "serial") {
				consoleLines = append(consoleLines, l)
			}
		}
		t.Errorf("the serial page's terminal lacks the command's answer (page status %q):\n%s\nthe runner's console lines:\n%s", state, tail(text, 2000), strings.Join(consoleLines, "\n"))
	}
	cmd = exec.Command(swarmvmBin(t), "console", name, "--serial", "--view-only")
	cmd.Stdin = strings.NewReader("echo SWARMVM-VIEWER-$((7*7))\n")
	serialOut, err = cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(serialOut), "the ticket grants view only") {
		t.Errorf("view-only serial typing: %v\n%s; want it refused", err, serialOut)
	}
	time.Sleep(2 * time.Second)
	if log, _ := os.ReadFile(filepath.Join(e.storage, "logs", name+".serial.log")); strings.Contains(string(log), "SWARMVM-VIEWER-49") {
		t.Error("a view-only ticket's command ran in the guest")
	}

	// Refusals.
	key, err := os.ReadFile(filepath.Join(keys, name+".key"))
	if err != nil {
		t.Fatal(err)
	}
	other := make([]byte, len(key))
	for kind, ticket := range map[string]string{
		"none":        "",
		"another VM":  console.Mint(key, name+"x", console.View, time.Now().Add(time.Minute)),
		"expired":     console.Mint(key, name, console.View, time.Now().Add(-time.Second)),
		"another key": console.Mint(other, name, console.View, time.Now().Add(time.Minute)),
	} {
		for _, path := range []string{"/", console.WebsocketPath} {
			u := base + path
			if ticket != "" {
				u += "?ticket=" + ticket
			}
			resp, err := http.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s ticket, %s: %d, want 401", kind, path, resp.StatusCode)
			}
		}
	}
	logs := serviceLogs(name)
	if n := strings.Count(logs, `msg="console refused"`); n < 8 {
		t.Errorf("%d refusals in the runner's log, want 8", n)
	}
	contains(t, "runner log", logs, `msg="console opened"`, "ticket expired", "ticket for another VM", "not signed with this VM's console key", `msg="serial input refused"`)
	if strings.Contains(logs, string(key)) || strings.Contains(logs, consoleURL.Query().Get("ticket")) {
		t.Error("the runner's log holds the key or a ticket")
	}
	// In the task: the key is the VM uid's alone.
	st, err := execIn(containerOf(name), "stat", "-c", "%u:%g %a", "/run/secrets/swarmvm-console")
	if err != nil || !strings.HasSuffix(strings.TrimSpace(st), "10001 400") {
		t.Errorf("the key in the task: %q, %v; want 0400, the VM's uid and group 10001", st, err)
	}
}

func execIn(container string, args ...string) (string, error) {
	out, err := exec.Command("docker", append([]string{"exec", container}, args...)...).CombinedOutput()
	return string(out), err
}

// freePort is a TCP port nothing listens on now.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// rfbFirstFrame speaks RFB 3.8 with no authentication (the ticket is the
// authentication), asks for the whole screen in raw encoding and returns
// the screen's size and how many bytes of the first update are not zero.
func rfbFirstFrame(t *testing.T, c net.Conn) (w, h, lit int) {
	t.Helper()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	read := func(n int) []byte {
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			t.Fatalf("RFB: reading %d bytes: %v", n, err)
		}
		return b
	}
	if v := string(read(12)); !strings.HasPrefix(v, "RFB 003.") {
		t.Fatalf("RFB greeting %q", v)
	}
	c.Write([]byte("RFB 003.008\n"))
	types := read(int(read(1)[0]))
	if !strings.ContainsRune(string(types), 1) {
		t.Fatalf("RFB security types %v lack None", types)
	}
	c.Write([]byte{1})
	if res := binary.BigEndian.Uint32(read(4)); res != 0 {
		t.Fatalf("RFB security result %d", res)
	}
	c.Write([]byte{1}) // shared
	init := read(24)
	w, h = int(binary.BigEndian.Uint16(init[0:])), int(binary.BigEndian.Uint16(init[2:]))
	bpp := int(init[4]) / 8
	read(int(binary.BigEndian.Uint32(init[20:]))) // the desktop's name
	req := []byte{3, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(req[6:], uint16(w))
	binary.BigEndian.PutUint16(req[8:], uint16(h))
	c.Write(req)
	for {
		msg := read(1)[0]
		if msg != 0 {
			t.Fatalf("RFB message type %d before the framebuffer update", msg)
		}
		read(1)
		rects := int(binary.BigEndian.Uint16(read(2)))
		for i := 0; i < rects; i++ {
			hd := read(12)
			rw, rh := int(binary.BigEndian.Uint16(hd[4:])), int(binary.BigEndian.Uint16(hd[6:]))
			if enc := int32(binary.BigEndian.Uint32(hd[8:])); enc != 0 {
				t.Fatalf("RFB rectangle encoding %d, want raw", enc)
			}
			for _, b := range read(rw * rh * bpp) {
				if b != 0 {
					lit++
				}
			}
		}
		return w, h, lit
	}
}

// cookieJar keeps cookies for any host, for one test's client.
type cookieJar struct{ cs []*http.Cookie }

func (j *cookieJar) SetCookies(_ *url.URL, cs []*http.Cookie) { j.cs = append(j.cs, cs...) }
func (j *cookieJar) Cookies(*url.URL) []*http.Cookie          { return j.cs }

// cookieRecorder is another web service on this host, on a port of its
// own; seen says whether it was visited and what cookies came with it.
func cookieRecorder(t *testing.T) (string, func() string) {
	t.Helper()
	var mu sync.Mutex
	got := "not visited"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		got = "visited, no cookie"
		if c := r.Header.Get("Cookie"); c != "" {
			got = "visited with cookies: " + c
		}
		io.WriteString(w, "<title>another service</title>")
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/", func() string { mu.Lock(); defer mu.Unlock(); return got }
}

// browserConsole opens the console address in Debian's Chromium, headless,
// waits for noVNC to say it is connected, and returns how many pixels of
// its canvas are not black, a screenshot and the address the browser
// shows. Then it visits next in the same browser.
func browserConsole(t *testing.T, address, next string) (lit int, png []byte, href string) {
	t.Helper()
	bctx := newBrowser(t)
	if _, err := chromedp.Run(bctx, chromedp.Navigate(address)); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	for connected := false; !connected; {
		var err error
		connected, err = chromedp.Run(bctx, chromedp.Evaluate[bool](`document.documentElement.classList.contains("noVNC_connected")`))
		if err != nil {
			t.Fatalf("noVNC never said it was connected: %v", err)
		}
		if !connected {
			time.Sleep(200 * time.Millisecond)
		}
	}
	// The first frames arrive just after the connection.
	const count = `(() => { const c = document.querySelector("canvas"); if (!c || !c.width) return 0;
		const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data; let n = 0;
		for (let i = 0; i < d.length; i += 4) if (d[i] | d[i+1] | d[i+2]) n++; return n; })()`
	for deadline := time.Now().Add(20 * time.Second); lit == 0 && time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		var err error
		if lit, err = chromedp.Run(bctx, chromedp.Evaluate[int](count)); err != nil {
			t.Fatalf("reading noVNC's canvas: %v", err)
		}
	}
	png, err := chromedp.Run(bctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if href, err = chromedp.Run(bctx, chromedp.Evaluate[string](`location.href`)); err != nil {
		t.Fatalf("reading the address: %v", err)
	}
	if _, err := chromedp.Run(bctx, chromedp.Navigate(next)); err != nil {
		t.Fatalf("chromium, to %s: %v", next, err)
	}
	return lit, png, href
}

// newBrowser starts Debian's Chromium, headless, for the rest of the test.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	const chromium = "/usr/bin/chromium"
	if _, err := os.Stat(chromium); err != nil {
		t.Fatalf("%s: %v (scripts/install.sh chromium installs it)", chromium, err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-sync", true),
		chromedp.WindowSize(1024, 768),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, cancelBrowser := chromedp.NewContext(actx)
	bctx, cancel := context.WithTimeout(bctx, 90*time.Second)
	t.Cleanup(func() { cancel(); cancelBrowser(); cancelAlloc() })
	return bctx
}

// browserSerial opens the serial page, types line into xterm.js as a
// person would, and returns the terminal's text once want shows in it.
func browserSerial(t *testing.T, address, line, want string) (text, state string) {
	t.Helper()
	bctx := newBrowser(t)
	if _, err := chromedp.Run(bctx, chromedp.Navigate(address)); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	if _, err := chromedp.Run(bctx, chromedp.WaitReady(chromedp.CSS(".serial_connected .xterm-helper-textarea"))); err != nil {
		t.Fatalf("the serial page never connected: %v", err)
	}
	const read = `(() => { const b = term.buffer.active; let s = "";
		for (let i = 0; i < b.length; i++) { const l = b.getLine(i); if (l) s += l.translateToString(true) + "\n"; } return s; })()`
	// As a person would: wait to see the guest's shell on the screen (the
	// console's backlog), then type.
	waitText := func(what string) bool {
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
			var err error
			if text, err = chromedp.Run(bctx, chromedp.Evaluate[string](read)); err != nil {
				t.Fatalf("reading the terminal: %v", err)
			}
			if strings.Contains(text, what) {
				return true
			}
		}
		return false
	}
	status := func() string {
		s, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.getElementById("status").textContent`))
		return s
	}
	if !waitText("SWARMVM-GUEST-SHELL") {
		return text, "before typing, the guest's shell never showed: " + status()
	}
	if _, err := chromedp.Run(bctx, chromedp.Focus(chromedp.CSS(".xterm-helper-textarea"))); err != nil {
		t.Fatalf("focus: %v", err)
	}
	if _, err := chromedp.Run(bctx, typeKeys(line)); err != nil {
		t.Fatalf("typing: %v", err)
	}
	waitText(want)
	return text, status()
}

// typeKeys presses each key as a keyboard does: a keyDown carrying its
// text, then a keyUp. (chromedp's SendKeys adds a separate char event,
// which xterm.js takes as a second key press.)
func typeKeys(keys string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		for _, r := range keys {
			evs := kb.Encode(r)
			down, up := *evs[0], *evs[len(evs)-1]
			if len(evs) == 3 {
				down.Text, down.UnmodifiedText = evs[1].Text, evs[1].UnmodifiedText
			}
			for _, ev := range []input.DispatchKeyEventParams{down, up} {
				if _, err := cdp.Call(ctx, t, input.DispatchKeyEvent, ev); err != nil {
					return err
				}
			}
		}
		return nil
	})
}
