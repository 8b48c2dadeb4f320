package console

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

var key = bytes.Repeat([]byte{7}, 32)

func TestTicket(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	good := Mint(key, "web-1", View, now.Add(time.Minute))
	if tk, err := Verify(key, "web-1", good, now); err != nil || tk.VM != "web-1" || tk.Grant != View {
		t.Fatalf("Verify(good) = %+v, %v", tk, err)
	}
	flipped := []byte(good)
	flipped[3] ^= 1
	cases := []struct {
		name, vm, ticket string
		key              []byte
		now              time.Time
		want             error
	}{
		{"another VM's", "web-2", good, key, now, ErrOtherVM},
		{"expired", "web-1", good, key, now.Add(time.Minute), ErrExpired},
		{"another key", "web-1", good, bytes.Repeat([]byte{8}, 32), now, ErrSignature},
		{"altered", "web-1", string(flipped), key, now, ErrSignature},
		{"no signature", "web-1", strings.Split(good, ".")[0], key, now, ErrMalformed},
		{"not base64", "web-1", "!!.??", key, now, ErrMalformed},
		{"signed but another grant", "web-1", Mint(key, "web-1", "root", now.Add(time.Minute)), key, now, ErrMalformed},
		{"huge", "web-1", strings.Repeat("A", 5000) + ".x", key, now, ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Verify(tc.key, tc.vm, tc.ticket, tc.now); !errors.Is(err, tc.want) {
				t.Errorf("Verify = %v, want %v", err, tc.want)
			}
		})
	}
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

// fakeDisplay stands in for QEMU's VNC socket: it sends the RFB greeting
// and echoes what it gets. QEMU's real display is tested end to end
// (test/e2e TestWebConsole).
func fakeDisplay(t *testing.T) string {
	sock := filepath.Join(t.TempDir(), "vnc.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.Write([]byte("RFB 003.008\n"))
				io.Copy(c, c)
			}()
		}
	}()
	return sock
}

func testServer(t *testing.T, now time.Time) (*httptest.Server, *Server, *syncBuf) {
	audit := &syncBuf{}
	s := &Server{VM: "web-1", Key: key, VNCSocket: fakeDisplay(t), MaxOpen: 2,
		Log: slog.New(slog.NewTextHandler(audit, nil)), Now: func() time.Time { return now }}
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return ts, s, audit
}

func TestServerRefusesWithoutValidTicket(t *testing.T) {
	now := time.Now()
	ts, _, audit := testServer(t, now)
	valid := Mint(key, "web-1", Input, now.Add(time.Minute))
	for name, ticket := range map[string]string{
		"no ticket":    "",
		"another VM's": Mint(key, "web-2", View, now.Add(time.Minute)),
		"expired":      Mint(key, "web-1", View, now.Add(-time.Second)),
		"another key":  Mint(bytes.Repeat([]byte{9}, 32), "web-1", View, now.Add(time.Minute)),
		"garbage":      "abc",
		// A cookie is never read: a browser sends it to every port.
		"valid, in a cookie": "cookie:" + valid,
		"a made-up session":  "session:AAAAAAAAAAAAAAAAAAAAAA",
	} {
		t.Run(name, func(t *testing.T) {
			for _, path := range []string{"/", WebsocketPath, SerialPath} {
				req, _ := http.NewRequest("GET", ts.URL+path, nil)
				if c, ok := strings.CutPrefix(ticket, "cookie:"); ok {
					req.AddCookie(&http.Cookie{Name: "swarmvm_console", Value: c})
				} else if id, ok := strings.CutPrefix(ticket, "session:"); ok {
					req.URL.RawQuery = "s=" + id
				} else if ticket != "" {
					req.URL.RawQuery = "ticket=" + ticket
				}
				resp, err := http.DefaultTransport.RoundTrip(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusUnauthorized || len(resp.Cookies()) != 0 {
					t.Errorf("%s: status %d, cookies %v; want 401 and no cookie", path, resp.StatusCode, resp.Cookies())
				}
			}
		})
	}
	if n := strings.Count(audit.String(), `msg="console refused"`); n != 21 {
		t.Errorf("%d refusals audited, want 21:\n%s", n, audit.String())
	}
}

// exchange opens the address swarmvm console prints (path?ticket=) and
// returns where the console sends the browser, checking that it sets no
// cookie, keeps the ticket out of the address and forbids a Referer.
func exchange(t *testing.T, base, path, ticket string) *url.URL {
	t.Helper()
	req, _ := http.NewRequest("GET", base+path+"?ticket="+ticket, nil)
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, _ := url.Parse(resp.Header.Get("Location"))
	if resp.StatusCode != http.StatusSeeOther || loc == nil || len(resp.Cookies()) != 0 || strings.Contains(loc.String(), ticket) || resp.Header.Get("Referrer-Policy") != "no-referrer" {
		t.Fatalf("%s with a ticket: status %d to %v, cookies %v, Referrer-Policy %q; want a redirect without the ticket, no cookie, no referrer",
			path, resp.StatusCode, loc, resp.Cookies(), resp.Header.Get("Referrer-Policy"))
	}
	return loc
}

// The ticket in the address is traded for a one-use session (no cookie);
// the viewer's websocket opened with it reaches the display, once; the
// count of open consoles follows, and is bounded.
func TestServerBridgesWithTicket(t *testing.T) {
	now := time.Now()
	ts, s, audit := testServer(t, now)
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	loc := exchange(t, ts.URL, "/", ticket)
	wsPath := loc.Query().Get("path")
	if loc.Path != "/vnc.html" || loc.Query().Get("autoconnect") != "true" || !strings.HasPrefix(wsPath, "websockify?s=") {
		t.Fatalf("redirect to %s: want noVNC's viewer, its websocket path carrying a session", loc)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	wsBase := "ws" + strings.TrimPrefix(ts.URL, "http") + "/"
	dial := func(rel string) (*websocket.Conn, error) {
		c, _, err := websocket.Dial(ctx, wsBase+rel, &websocket.DialOptions{Subprotocols: []string{"binary"}})
		return c, err
	}
	var conns []*websocket.Conn
	for _, rel := range []string{wsPath, WebsocketPath[1:] + "?ticket=" + ticket} { // the browser's, and swarmvm's way
		c, err := dial(rel)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		_, msg, err := c.Read(ctx)
		if err != nil || string(msg) != "RFB 003.008\n" {
			t.Fatalf("first message %q, %v; want the display's greeting", msg, err)
		}
		if err := c.Write(ctx, websocket.MessageBinary, []byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, msg, err := c.Read(ctx); err != nil || string(msg) != "ping" {
			t.Fatalf("echo %q, %v", msg, err)
		}
	}
	if s.Open() != 2 {
		t.Errorf("open consoles %d, want 2", s.Open())
	}
	if _, err := dial(WebsocketPath[1:] + "?ticket=" + ticket); err == nil {
		t.Error("a third console opened past MaxOpen 2")
	}
	for _, c := range conns {
		c.Close(websocket.StatusNormalClosure, "")
	}
	deadline := time.Now().Add(3 * time.Second)
	for s.Open() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s.Open() != 0 {
		t.Errorf("open consoles %d after both closed", s.Open())
	}
	if _, err := dial(wsPath); err == nil {
		t.Error("a session opened a second console")
	}
	if open, opened, refused := s.Counts(); open != 0 || opened != 2 || refused != 2 {
		t.Errorf("counts: %d open, %d opened, %d refused; want 0, 2, 2 (one past MaxOpen, one reused session)", open, opened, refused)
	}
	if !strings.Contains(audit.String(), `msg="console opened"`) || !strings.Contains(audit.String(), "2 consoles open, the most allowed") ||
		!strings.Contains(audit.String(), "used already") {
		t.Errorf("audit:\n%s", audit.String())
	}
	// A view ticket's viewer says so to noVNC (the display drops its input
	// anyway: TestServerViewTicketDropsKeys).
	if v := exchange(t, ts.URL, "/", Mint(key, "web-1", View, now.Add(time.Minute))); v.Query().Get("view_only") != "true" {
		t.Errorf("a view ticket's viewer: %s", v)
	}
}

// The viewer's files are served to anyone: they are Debian's noVNC, the
// same for every VM, and open nothing without a session.
func TestServerStaticNeedsNoTicket(t *testing.T) {
	ts, s, _ := testServer(t, time.Now())
	s.Static = t.TempDir()
	os.WriteFile(filepath.Join(s.Static, "vnc.html"), []byte("<title>noVNC</title>"), 0o644)
	resp, err := http.Get(ts.URL + "/vnc.html")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), "noVNC") || len(resp.Cookies()) != 0 {
		t.Errorf("vnc.html without a ticket: %d %q", resp.StatusCode, b)
	}
}

// With a view ticket, what the client sends reaches the display without
// its keys (the fake display echoes what it gets).
func TestServerViewTicketDropsKeys(t *testing.T) {
	now := time.Now()
	ts, _, _ := testServer(t, now)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ticket := Mint(key, "web-1", View, now.Add(time.Minute))
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+WebsocketPath+"?ticket="+ticket, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	conn := websocket.NetConn(ctx, c, websocket.MessageBinary)
	greeting := make([]byte, 12)
	if _, err := io.ReadFull(conn, greeting); err != nil {
		t.Fatal(err)
	}
	hello := "RFB 003.008\n\x01\x01"
	update := "\x03\x00\x00\x00\x00\x00\x04\x00\x03\x00"
	conn.Write([]byte(hello + "\x04\x01\x00\x00\x00\x00\x00\x41" + update))
	echo := make([]byte, len(hello)+len(update))
	if _, err := io.ReadFull(conn, echo); err != nil {
		t.Fatal(err)
	}
	if string(echo) != hello+update {
		t.Errorf("the display got %q, want the handshake and the update request only", echo)
	}
}

// The serial console: a client gets the latest output, then what follows;
// an input ticket's keystrokes reach the guest; a view ticket's end the
// console, audited, and reach nothing.
func TestServerSerial(t *testing.T) {
	now := time.Now()
	ts, s, audit := testServer(t, now)
	typed := &syncBuf{}
	s.Serial = NewSerial(typed)
	s.Serial.Write([]byte("login: "))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dial := func(g Grant) *websocket.Conn {
		c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+SerialPath+"?ticket="+Mint(key, "web-1", g, now.Add(time.Minute)), nil)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	in := dial(Input)
	defer in.CloseNow()
	if _, msg, err := in.Read(ctx); err != nil || string(msg) != "login: " {
		t.Fatalf("first message %q, %v; want the backlog", msg, err)
	}
	in.Write(ctx, websocket.MessageBinary, []byte("root\n"))
	deadline := time.Now().Add(3 * time.Second)
	for typed.String() != "root\n" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if typed.String() != "root\n" {
		t.Errorf("the guest got %q, want root\\n", typed.String())
	}
	s.Serial.Write([]byte("# "))
	if _, msg, err := in.Read(ctx); err != nil || string(msg) != "# " {
		t.Errorf("next message %q, %v", msg, err)
	}

	view := dial(View)
	defer view.CloseNow()
	view.Read(ctx) // the backlog
	view.Write(ctx, websocket.MessageBinary, []byte("reboot\n"))
	_, _, err := view.Read(ctx)
	if websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
		t.Errorf("view ticket typing: %v, want the console closed for policy", err)
	}
	time.Sleep(100 * time.Millisecond)
	if strings.Contains(typed.String(), "reboot") {
		t.Error("a view ticket's keystrokes reached the guest")
	}
	if !strings.Contains(audit.String(), "serial input refused") {
		t.Errorf("refusal not audited:\n%s", audit.String())
	}
}

// The serial page: its address's ticket is traded for a one-use session
// (no cookie), which the page gives its websocket; the page and xterm.js
// are served, and nothing else of that folder.
func TestServerSerialPage(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.Serial = NewSerial(io.Discard)
	s.Serial.Write([]byte("login: "))
	s.XTerm = t.TempDir()
	os.WriteFile(filepath.Join(s.XTerm, "xterm.js"), []byte("// xterm"), 0o644)
	os.WriteFile(filepath.Join(s.XTerm, "secret.txt"), []byte("no"), 0o644)
	get := func(path string) *http.Response {
		resp, err := http.Get(ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	loc := exchange(t, ts.URL, SerialPage, Mint(key, "web-1", Input, now.Add(time.Minute)))
	if loc.Path != SerialPage || loc.Query().Get("s") == "" {
		t.Fatalf("serial page with a ticket: to %s, want the page with a session", loc)
	}
	resp := get(loc.String())
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), `"/serial" + location.search`) || !strings.Contains(string(page), "/xterm/xterm.js") {
		t.Errorf("serial page: %d\n%s", resp.StatusCode, page)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+SerialPath+"?"+loc.RawQuery, nil)
	if err != nil {
		t.Fatalf("the page's websocket: %v", err)
	}
	if _, msg, err := c.Read(ctx); err != nil || string(msg) != "login: " {
		t.Errorf("the page's websocket: %q, %v", msg, err)
	}
	c.CloseNow()
	resp = get("/xterm/xterm.js")
	js, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(js) != "// xterm" {
		t.Errorf("xterm.js: %d %q", resp.StatusCode, js)
	}
	if resp := get("/xterm/secret.txt"); resp.StatusCode == 200 {
		b, _ := io.ReadAll(resp.Body)
		if string(b) == "no" {
			t.Error("another file of the xterm folder was served")
		}
	}
}

// A websocket opened from another origin's page is refused, whatever it
// carries: a page elsewhere cannot drive the console. The console's own
// origin is served.
func TestServerRefusesCrossOriginWebsocket(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.Serial = NewSerial(io.Discard)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	for _, path := range []string{WebsocketPath, SerialPath} {
		for origin, ok := range map[string]bool{"http://evil.example": false, "http://" + strings.TrimPrefix(ts.URL, "http://"): true} {
			hdr := http.Header{"Origin": {origin}}
			c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+path+"?ticket="+ticket, &websocket.DialOptions{HTTPHeader: hdr, Subprotocols: []string{"binary"}})
			if c != nil {
				c.CloseNow()
			}
			switch {
			case ok && err != nil:
				t.Errorf("%s from its own origin %s: %v", path, origin, err)
			case !ok && (err == nil || resp == nil || resp.StatusCode != http.StatusForbidden):
				t.Errorf("%s from %s: err %v, response %v; want 403", path, origin, err, resp)
			}
		}
	}
}

// A console closes when its ticket expires, however busy it is: the screen
// and the serial console alike. (Checked against the wall clock: the test
// server's Now only decides whether a ticket is valid when it is shown.)
func TestConsoleClosesAtTicketExpiry(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.Serial = NewSerial(io.Discard)
	ticket := Mint(key, "web-1", Input, now.Add(1500*time.Millisecond))
	tk, err := Verify(key, "web-1", ticket, now)
	if err != nil {
		t.Fatal(err)
	}
	expires := tk.Expires // tickets carry whole seconds
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, path := range []string{WebsocketPath, SerialPath} {
		c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+path+"?ticket="+ticket, &websocket.DialOptions{Subprotocols: []string{"binary"}})
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		defer c.CloseNow()
		var ended time.Time
		for {
			if path == WebsocketPath { // the display echoes: keep the console busy
				if err := c.Write(ctx, websocket.MessageBinary, []byte("ping")); err != nil {
					ended = time.Now()
					break
				}
			} else {
				s.Serial.Write([]byte("tick "))
			}
			if _, _, err := c.Read(ctx); err != nil {
				ended = time.Now()
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if ended.Before(expires) {
			t.Errorf("%s closed at %v, before its ticket expired", path, ended.Sub(now))
		}
		if ctx.Err() != nil {
			t.Errorf("%s still open 20 s after its ticket expired at %v", path, expires.Sub(now))
		}
		t.Logf("%s closed %v after its ticket expired", path, ended.Sub(expires).Round(time.Millisecond))
	}
}

// When the VM moves to its next task, End closes every open console with
// the reason (a close frame the pages show: going away) and refuses new
// ones with it.
func TestConsolesEndWhenTheVMMoves(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.Serial = NewSerial(io.Discard)
	s.Serial.Write([]byte("login: "))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	var conns []*websocket.Conn
	for _, path := range []string{WebsocketPath, SerialPath} {
		c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+path+"?ticket="+ticket, &websocket.DialOptions{Subprotocols: []string{"binary"}})
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		defer c.CloseNow()
		conns = append(conns, c)
	}
	conns[1].Read(ctx) // the serial backlog: both are open
	const why = "the VM moved to its next task: open the console again"
	s.End(why)
	for i, c := range conns {
		for {
			_, _, err := c.Read(ctx)
			if err == nil {
				continue // what was on its way
			}
			var ce websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway || ce.Reason != why {
				t.Errorf("console %d ended with %v, want going away: %q", i, err, why)
			}
			break
		}
	}
	_, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+SerialPath+"?ticket="+ticket, nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a console opened after the end: %v %v", resp, err)
	}
}
