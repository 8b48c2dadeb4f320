package console

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// CookieName carries the ticket from the page to its websocket.
const CookieName = "swarmvm_console"

// WebsocketPath is where the VNC bridge answers (noVNC's default path).
const WebsocketPath = "/websockify"

// SerialPath is where the serial console answers, as a websocket of raw
// bytes both ways.
const SerialPath = "/serial"

// Server serves one VM's console.
type Server struct {
	VM        string
	Key       []byte
	VNCSocket string // QEMU's VNC display, a unix socket
	Serial    *Serial
	Static    string // a folder of noVNC's files; "" serves none
	XTerm     string // a folder with xterm.js and xterm.css, for the serial page
	MaxOpen   int    // consoles open at once; more are refused
	Log       *slog.Logger
	Now       func() time.Time // time.Now when nil

	mu   sync.Mutex
	open int
}

// Open is how many consoles are connected now.
func (s *Server) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

func (s *Server) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// ServeHTTP answers every request only with a valid ticket, taken from the
// query (`?ticket=`, as `swarmvm console` prints it) or from the cookie the
// first answer set. A ticket in the query is moved into the cookie and the
// browser sent on to the viewer, so that the ticket leaves the address bar.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	raw, fromQuery := r.URL.Query().Get("ticket"), true
	if raw == "" {
		fromQuery = false
		if c, err := r.Cookie(CookieName); err == nil {
			raw = c.Value
		}
	}
	tk, err := Verify(s.Key, s.VM, raw, s.now())
	if raw == "" {
		err = errors.New("no ticket")
	}
	if err != nil {
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "path", r.URL.Path, "reason", err.Error())
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, "401 unauthorized: this console needs a ticket; run swarmvm console "+s.VM, http.StatusUnauthorized)
		return
	}
	if fromQuery {
		http.SetCookie(w, &http.Cookie{
			Name: CookieName, Value: raw, Path: "/", Expires: tk.Expires,
			HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil,
		})
		switch r.URL.Path {
		case "/":
			http.Redirect(w, r, "/vnc.html?autoconnect=true&resize=scale&path="+WebsocketPath[1:], http.StatusSeeOther)
			return
		case SerialPage:
			http.Redirect(w, r, SerialPage, http.StatusSeeOther)
			return
		}
	}
	switch r.URL.Path {
	case WebsocketPath:
		s.bridge(w, r, tk)
		return
	case SerialPath:
		s.serial(w, r, tk)
		return
	case SerialPage:
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(serialPage)
		return
	}
	if name, ok := strings.CutPrefix(r.URL.Path, "/xterm/"); ok && s.XTerm != "" && (name == "xterm.js" || name == "xterm.css") {
		w.Header().Set("Cache-Control", "no-store")
		http.ServeFile(w, r, filepath.Join(s.XTerm, name))
		return
	}
	s.static(w, r)
}

// SerialPage is the serial console in the browser (xterm.js).
const SerialPage = "/serial.html"

//go:embed web/serial.html
var serialPage []byte

func (s *Server) static(w http.ResponseWriter, r *http.Request) {
	if s.Static == "" {
		http.Error(w, "no web viewer in this image; connect a websocket VNC client to "+WebsocketPath, http.StatusNotFound)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	http.FileServer(http.Dir(s.Static)).ServeHTTP(w, r)
}

// enter counts a console in, unless MaxOpen are open; leave counts it out.
func (s *Server) enter(w http.ResponseWriter, r *http.Request) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.MaxOpen > 0 && s.open >= s.MaxOpen {
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "reason", fmt.Sprintf("%d consoles open, the most allowed", s.MaxOpen))
		http.Error(w, "too many consoles open", http.StatusServiceUnavailable)
		return 0, false
	}
	s.open++
	return s.open, true
}

func (s *Server) leave() {
	s.mu.Lock()
	s.open--
	s.mu.Unlock()
}

// bridge joins the websocket to QEMU's VNC socket until either side ends,
// or the ticket expires. A view ticket's stream goes through viewOnly.
func (s *Server) bridge(w http.ResponseWriter, r *http.Request, tk Ticket) {
	n, ok := s.enter(w, r)
	if !ok {
		return
	}
	defer s.leave()
	vnc, err := net.DialTimeout("unix", s.VNCSocket, 5*time.Second)
	if err != nil {
		s.Log.Error("console: QEMU's display does not answer", "socket", s.VNCSocket, "err", err)
		http.Error(w, "the VM's display is not available", http.StatusBadGateway)
		return
	}
	defer vnc.Close()
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"binary"}})
	if err != nil {
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "reason", err.Error())
		return
	}
	ctx, cancel := context.WithDeadline(r.Context(), tk.Expires)
	defer cancel()
	conn := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	defer conn.Close()
	s.Log.Info("console opened", "remote", r.RemoteAddr, "what", "screen", "grant", string(tk.Grant), "open", n, "expires", tk.Expires.UTC().Format(time.RFC3339))
	began := time.Now()
	done := make(chan struct{}, 2)
	go func() { io.Copy(conn, vnc); done <- struct{}{} }()
	go func() {
		if tk.Grant == Input {
			io.Copy(vnc, conn)
		} else if err := viewOnly(vnc, conn); err != nil && !errors.Is(err, io.EOF) && ctx.Err() == nil {
			s.Log.Warn("console closed", "remote", r.RemoteAddr, "reason", err.Error())
		}
		done <- struct{}{}
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
	s.Log.Info("console closed", "remote", r.RemoteAddr, "what", "screen", "after", time.Since(began).Round(time.Second).String())
}

// serial attaches a websocket to the guest's serial console: the latest
// output, then what follows; what the client sends is typed into the
// guest if the ticket grants input, and ends the console if not.
func (s *Server) serial(w http.ResponseWriter, r *http.Request, tk Ticket) {
	if s.Serial == nil {
		http.Error(w, "no serial console", http.StatusNotFound)
		return
	}
	n, ok := s.enter(w, r)
	if !ok {
		return
	}
	defer s.leave()
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"binary"}})
	if err != nil {
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "reason", err.Error())
		return
	}
	defer ws.CloseNow()
	ctx, cancel := context.WithDeadline(r.Context(), tk.Expires)
	defer cancel()
	backlog, out, detach := s.Serial.attach()
	defer detach()
	s.Log.Info("console opened", "remote", r.RemoteAddr, "what", "serial", "grant", string(tk.Grant), "open", n, "expires", tk.Expires.UTC().Format(time.RFC3339))
	began := time.Now()
	go func() {
		defer cancel()
		for {
			_, data, err := ws.Read(ctx)
			if err != nil {
				return
			}
			if tk.Grant != Input {
				s.Log.Warn("serial input refused", "remote", r.RemoteAddr, "reason", "the ticket grants view only", "bytes", len(data))
				ws.Close(websocket.StatusPolicyViolation, "this ticket does not grant input")
				return
			}
			if err := s.Serial.type_(data); err != nil {
				s.Log.Error("serial input", "err", err)
				return
			}
		}
	}()
	if len(backlog) > 0 {
		if err := ws.Write(ctx, websocket.MessageBinary, backlog); err != nil {
			return
		}
	}
	for {
		select {
		case p, ok := <-out:
			if !ok {
				s.Log.Warn("console closed", "remote", r.RemoteAddr, "what", "serial", "reason", "the client did not keep up with the guest's output")
				ws.Close(websocket.StatusTryAgainLater, "too slow")
				return
			}
			if err := ws.Write(ctx, websocket.MessageBinary, p); err != nil {
				return
			}
		case <-ctx.Done():
			s.Log.Info("console closed", "remote", r.RemoteAddr, "what", "serial", "after", time.Since(began).Round(time.Second).String())
			return
		}
	}
}

// LoadKey reads a console key file; the variable names it in errors.
func LoadKey(variable, path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: cannot read the console key %s: %v — deploy the VM with a console (swarmvm deploy --console-port) so that it gets its key as a Swarm secret", variable, path, err)
	}
	if len(key) < MinKeyBytes {
		return nil, fmt.Errorf("%s: the console key %s has %d bytes, fewer than %d — make one with: head -c 32 /dev/urandom > %s", variable, path, len(key), MinKeyBytes, filepath.Base(path))
	}
	return key, nil
}
