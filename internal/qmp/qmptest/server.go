// Package qmptest is a scripted QMP peer for tests: it speaks the server side
// of the protocol over one end of a net.Pipe, answers commands from handlers,
// and can emit events or raw bytes, or go silent, whenever a test wants.
package qmptest

import (
	"bufio"
	"encoding/json"
	"net"
	"sync"
)

// Greeting is what QEMU 10.0 sends first.
const Greeting = `{"QMP": {"version": {"qemu": {"micro": 13, "minor": 0, "major": 10}, "package": "Debian 1:10.0.13"}, "capabilities": ["oob"]}}`

// Request is one command the fake received.
type Request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// Handler answers one command: either a value for "return" or a non-empty
// error class. With Reply set to false the fake stays silent.
type Handler func(req Request) Reply

// Reply is a handler's answer.
type Reply struct {
	Return     any
	ErrorClass string
	ErrorDesc  string
	Silent     bool
}

// Server is the fake. Zero handlers answer every command with {}.
type Server struct {
	conn     net.Conn
	mu       sync.Mutex
	handlers map[string]Handler
	received []Request
	writeMu  sync.Mutex
}

// New returns the fake and the client's end of the pipe. The fake sends
// its greeting and serves until the pipe closes.
func New(handlers map[string]Handler) (*Server, net.Conn) {
	server, client := net.Pipe()
	s := &Server{conn: server, handlers: handlers}
	go s.serve()
	return s, client
}

// NewSilent returns a fake that never says anything, not even a greeting.
func NewSilent() (*Server, net.Conn) {
	server, client := net.Pipe()
	return &Server{conn: server}, client
}

func (s *Server) serve() {
	if err := s.WriteRaw(Greeting + "\r\n"); err != nil {
		return
	}
	sc := bufio.NewScanner(s.conn)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var req Request
		if json.Unmarshal(sc.Bytes(), &req) != nil {
			continue
		}
		s.mu.Lock()
		s.received = append(s.received, req)
		h := s.handlers[req.Execute]
		s.mu.Unlock()
		rep := Reply{Return: map[string]any{}}
		if h != nil {
			rep = h(req)
		}
		if rep.Silent {
			continue
		}
		msg := map[string]any{"id": req.ID}
		if rep.ErrorClass != "" {
			msg["error"] = map[string]string{"class": rep.ErrorClass, "desc": rep.ErrorDesc}
		} else {
			msg["return"] = rep.Return
		}
		if s.WriteJSON(msg) != nil {
			return
		}
	}
}

// Received lists the commands seen so far.
func (s *Server) Received() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.received...)
}

// Event sends an asynchronous event.
func (s *Server) Event(name string, data any) error {
	return s.WriteJSON(map[string]any{
		"event": name, "data": data,
		"timestamp": map[string]int64{"seconds": 1700000000, "microseconds": 5},
	})
}

// WriteJSON sends one message.
func (s *Server) WriteJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.WriteRaw(string(b) + "\r\n")
}

// WriteRaw sends bytes as they are, for truncated or malformed streams.
func (s *Server) WriteRaw(raw string) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	_, err := s.conn.Write([]byte(raw))
	return err
}

// Close ends the fake's side of the pipe.
func (s *Server) Close() error { return s.conn.Close() }
