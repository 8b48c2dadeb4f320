package console

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

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

	mu       sync.Mutex
	open     int
	opened   uint64             // consoles connected since the start
	refused  uint64             // refused since the start: no ticket, a bad one, too many open
	sessions map[string]session // one-use handles, by id
	ended    chan struct{}      // closed by End
	endedWhy string
}

// End closes every open console with why, a websocket close frame that
// the pages show, and refuses new ones with it (the VM moved on: its next
// task, on this node or another, serves its consoles).
func (s *Server) End(why string) {
	ended := s.endedCh()
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-ended:
	default:
		s.endedWhy = why
		close(ended)
	}
}

// endedCh is closed once End was called.
func (s *Server) endedCh() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended == nil {
		s.ended = make(chan struct{})
	}
	return s.ended
}

// endedReason is End's why, once it was called.
func (s *Server) endedReason() (string, bool) {
	ended := s.endedCh()
	select {
	case <-ended:
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.endedWhy, true
	default:
		return "", false
	}
}

// A session is what a browser gets for a ticket: a random, one-use handle
// its page gives the websocket, valid for sessionWait (and never past the
// ticket). The ticket itself is never kept by the browser: a cookie would
// go to every service on the host (cookies are not kept apart by port),
// and any of them could open the console with it.
type session struct {
	tk    Ticket
	until time.Time
}

// sessionWait is how long a page has to open its websocket; maxSessions
// bounds the handles not yet used.
const (
	sessionWait = time.Minute
	maxSessions = 64
)

// Open is how many consoles are connected now.
func (s *Server) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

// Counts is how many consoles are connected now, have connected, and were
// refused, since the server started.
func (s *Server) Counts() (open int, opened, refused uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open, s.opened, s.refused
}

func (s *Server) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// ServeHTTP serves the console. The screen's and the serial console's
// websockets answer only with a valid ticket (?ticket=, as swarmvm console
// --serial sends it) or a session a ticket was exchanged for (?s=). The
// address swarmvm console prints (/?ticket= or the serial page's) trades
// its ticket for a one-use session and sends the browser on to the viewer
// with it; the viewer's files are Debian's noVNC and xterm.js, the same
// for every VM, and are served to anyone.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Referrer-Policy", "no-referrer") // no handle in a Referer
	switch path := r.URL.Path; {
	case path == WebsocketPath || path == SerialPath:
		tk, err := s.authorize(r)
		if err != nil {
			s.refuse(w, r, err)
		} else if path == WebsocketPath {
			s.bridge(w, r, tk)
		} else {
			s.serial(w, r, tk)
		}
	case path == "/" || path == SerialPage && r.URL.Query().Has("ticket"):
		s.exchange(w, r)
	case path == SerialPage:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(serialPage)
	default:
		if name, ok := strings.CutPrefix(path, "/xterm/"); ok && s.XTerm != "" && (name == "xterm.js" || name == "xterm.css") {
			http.ServeFile(w, r, filepath.Join(s.XTerm, name))
			return
		}
		s.static(w, r)
	}
}

// exchange trades the ticket in the address for a one-use session and
// sends the browser on: to noVNC's viewer, which opens the websocket with
// it, or to the serial page.
func (s *Server) exchange(w http.ResponseWriter, r *http.Request) {
	raw := r.URL.Query().Get("ticket")
	tk, err := Verify(s.Key, s.VM, raw, s.now())
	if raw == "" {
		err = errors.New("no ticket")
	}
	if err != nil {
		s.refuse(w, r, err)
		return
	}
	id, err := s.newSession(tk)
	if err != nil {
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "path", r.URL.Path, "reason", err.Error())
		http.Error(w, "too many consoles being opened; try again in a minute", http.StatusServiceUnavailable)
		return
	}
	if r.URL.Path == SerialPage {
		http.Redirect(w, r, SerialPage+"?s="+id, http.StatusSeeOther)
		return
	}
	to := "/vnc.html?autoconnect=true&resize=scale&path=" + url.QueryEscape(WebsocketPath[1:]+"?s="+id)
	if tk.Grant == View {
		to += "&view_only=true"
	}
	http.Redirect(w, r, to, http.StatusSeeOther)
}

// authorize finds the ticket behind a websocket: given, or a session's,
// which is used up by this.
func (s *Server) authorize(r *http.Request) (Ticket, error) {
	q := r.URL.Query()
	if raw := q.Get("ticket"); raw != "" {
		return Verify(s.Key, s.VM, raw, s.now())
	}
	id := q.Get("s")
	if id == "" {
		return Ticket{}, errors.New("no ticket")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	se, ok := s.sessions[id]
	delete(s.sessions, id)
	switch {
	case !ok:
		return Ticket{}, errors.New("no such session: used already, or never made")
	case !s.now().Before(se.until):
		return Ticket{}, errors.New("session expired before its websocket was opened")
	}
	return se.tk, nil
}

// newSession makes a one-use session for tk.
func (s *Server) newSession(tk Ticket) (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	id := base64.RawURLEncoding.EncodeToString(b)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for k, se := range s.sessions {
		if !now.Before(se.until) {
			delete(s.sessions, k)
		}
	}
	if len(s.sessions) >= maxSessions {
		return "", fmt.Errorf("%d sessions not yet used, the most allowed", maxSessions)
	}
	if s.sessions == nil {
		s.sessions = map[string]session{}
	}
	until := now.Add(sessionWait)
	if tk.Expires.Before(until) {
		until = tk.Expires
	}
	s.sessions[id] = session{tk: tk, until: until}
	return id, nil
}

// refuse answers 401, and audits why (never the ticket).
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, err error) {
	s.mu.Lock()
	s.refused++
	s.mu.Unlock()
	s.Log.Warn("console refused", "remote", r.RemoteAddr, "path", r.URL.Path, "reason", err.Error())
	http.Error(w, "401 unauthorized: this console needs a ticket; run swarmvm console "+s.VM, http.StatusUnauthorized)
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
	http.FileServer(http.Dir(s.Static)).ServeHTTP(w, r)
}

// enter counts a console in, unless MaxOpen are open; leave counts it out.
func (s *Server) enter(w http.ResponseWriter, r *http.Request) (int, bool) {
	if why, ended := s.endedReason(); ended {
		http.Error(w, why, http.StatusServiceUnavailable)
		return 0, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.MaxOpen > 0 && s.open >= s.MaxOpen {
		s.refused++
		s.Log.Warn("console refused", "remote", r.RemoteAddr, "reason", fmt.Sprintf("%d consoles open, the most allowed", s.MaxOpen))
		http.Error(w, "too many consoles open", http.StatusServiceUnavailable)
		return 0, false
	}
	s.open++
	s.opened++
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
	case <-s.endedCh():
		why, _ := s.endedReason()
		ws.Close(websocket.StatusGoingAway, why)
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
		case <-s.endedCh():
			why, _ := s.endedReason()
			ws.Close(websocket.StatusGoingAway, why)
			s.Log.Info("console closed", "remote", r.RemoteAddr, "what", "serial", "reason", why)
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
