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
	for name, ticket := range map[string]string{
		"no ticket":        "",
		"another VM's":     Mint(key, "web-2", View, now.Add(time.Minute)),
		"expired":          Mint(key, "web-1", View, now.Add(-time.Second)),
		"another key":      Mint(bytes.Repeat([]byte{9}, 32), "web-1", View, now.Add(time.Minute)),
		"garbage":          "abc",
		"expired (cookie)": "cookie:" + Mint(key, "web-1", View, now.Add(-time.Second)),
	} {
		t.Run(name, func(t *testing.T) {
			for _, path := range []string{"/", WebsocketPath, "/vnc.html"} {
				req, _ := http.NewRequest("GET", ts.URL+path, nil)
				if c, ok := strings.CutPrefix(ticket, "cookie:"); ok {
					req.AddCookie(&http.Cookie{Name: CookieName, Value: c})
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
	if n := strings.Count(audit.String(), `msg="console refused"`); n != 18 {
		t.Errorf("%d refusals audited, want 18:\n%s", n, audit.String())
	}
}

// A ticket in the address moves into a cookie, and the websocket opened
// with that cookie reaches the display; the count of open consoles
// follows, and is bounded.
func TestServerBridgesWithTicket(t *testing.T) {
	now := time.Now()
	ts, s, audit := testServer(t, now)
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	req, _ := http.NewRequest("GET", ts.URL+"/?ticket="+ticket, nil)
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == CookieName {
			cookie = c
		}
	}
	if resp.StatusCode != http.StatusSeeOther || cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode || cookie.Value != ticket {
		t.Fatalf("status %d, cookie %+v; want a redirect setting an HttpOnly, SameSite=Strict cookie", resp.StatusCode, cookie)
	}
	if loc := resp.Header.Get("Location"); !strings.HasPrefix(loc, "/vnc.html?") || strings.Contains(loc, ticket) {
		t.Errorf("redirect to %q: want the viewer, without the ticket", loc)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hdr := http.Header{"Cookie": {CookieName + "=" + ticket}}
	dial := func() (*websocket.Conn, error) {
		c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+WebsocketPath, &websocket.DialOptions{HTTPHeader: hdr, Subprotocols: []string{"binary"}})
		return c, err
	}
	var conns []*websocket.Conn
	for i := 0; i < 2; i++ {
		c, err := dial()
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
	if _, err := dial(); err == nil {
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
	if !strings.Contains(audit.String(), `msg="console opened"`) || !strings.Contains(audit.String(), "2 consoles open, the most allowed") {
		t.Errorf("audit:\n%s", audit.String())
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

// The serial page: a ticket in its address moves into the cookie and out
// of the address; with the cookie the page and xterm.js are served, and
// nothing else of that folder.
func TestServerSerialPage(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.XTerm = t.TempDir()
	os.WriteFile(filepath.Join(s.XTerm, "xterm.js"), []byte("// xterm"), 0o644)
	os.WriteFile(filepath.Join(s.XTerm, "secret.txt"), []byte("no"), 0o644)
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	get := func(path string, cookie bool) *http.Response {
		req, _ := http.NewRequest("GET", ts.URL+path, nil)
		if cookie {
			req.AddCookie(&http.Cookie{Name: CookieName, Value: ticket})
		}
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := get(SerialPage+"?ticket="+ticket, false)
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != SerialPage || len(resp.Cookies()) != 1 {
		t.Errorf("serial page with a ticket: %d to %q, cookies %v", resp.StatusCode, resp.Header.Get("Location"), resp.Cookies())
	}
	resp = get(SerialPage, true)
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(page), `"/serial"`) || !strings.Contains(string(page), "/xterm/xterm.js") {
		t.Errorf("serial page: %d\n%s", resp.StatusCode, page)
	}
	resp = get("/xterm/xterm.js", true)
	js, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(js) != "// xterm" {
		t.Errorf("xterm.js: %d %q", resp.StatusCode, js)
	}
	if resp := get("/xterm/secret.txt", true); resp.StatusCode == 200 {
		b, _ := io.ReadAll(resp.Body)
		if string(b) == "no" {
			t.Error("another file of the xterm folder was served")
		}
	}
	if resp := get(SerialPage, false); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("serial page without a ticket: %d", resp.StatusCode)
	}
}

// A websocket opened from another origin's page is refused, whatever its
// ticket: a page elsewhere that the browser would send the cookie from
// cannot drive the console. The console's own origin is served.
func TestServerRefusesCrossOriginWebsocket(t *testing.T) {
	now := time.Now()
	ts, s, _ := testServer(t, now)
	s.Serial = NewSerial(io.Discard)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ticket := Mint(key, "web-1", Input, now.Add(time.Minute))
	for _, path := range []string{WebsocketPath, SerialPath} {
		for origin, ok := range map[string]bool{"http://evil.example": false, "http://" + strings.TrimPrefix(ts.URL, "http://"): true} {
			hdr := http.Header{"Cookie": {CookieName + "=" + ticket}, "Origin": {origin}}
			c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+path, &websocket.DialOptions{HTTPHeader: hdr, Subprotocols: []string{"binary"}})
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
