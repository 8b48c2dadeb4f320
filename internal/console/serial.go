package console

import (
	"io"
	"sync"
)

// backlogBytes of the guest's latest output greet a client that attaches,
// so that a prompt printed before it came is on its screen.
const backlogBytes = 64 << 10

// clientQueue is how many chunks of output a client may lag behind; one
// that lags more is cut off rather than slowing the guest's console.
const clientQueue = 256

// Serial fans the guest's serial console out to the clients attached to
// it, and passes on input for the guest from those whose ticket grants it.
// The capped log on the volume gets everything, attached or not: the
// runner writes the guest's output to both.
type Serial struct {
	input io.Writer // QEMU's stdin, the serial port's receive side

	mu      sync.Mutex
	backlog []byte
	clients map[chan []byte]struct{}
	inMu    sync.Mutex
}

// NewSerial makes a hub whose input goes to in.
func NewSerial(in io.Writer) *Serial {
	return &Serial{input: in, clients: map[chan []byte]struct{}{}}
}

// Write takes the guest's output. It never blocks and never fails.
func (s *Serial) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.backlog = append(s.backlog, p...)
	if over := len(s.backlog) - backlogBytes; over > 0 {
		s.backlog = append(s.backlog[:0], s.backlog[over:]...)
	}
	for ch := range s.clients {
		select {
		case ch <- append([]byte(nil), p...):
		default: // too slow: cut off
			delete(s.clients, ch)
			close(ch)
		}
	}
	return len(p), nil
}

// attach returns the latest output and a channel of what follows, closed
// when the client is cut off or detaches.
func (s *Serial) attach() (backlog []byte, out chan []byte, detach func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out = make(chan []byte, clientQueue)
	s.clients[out] = struct{}{}
	return append([]byte(nil), s.backlog...), out, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.clients[out]; ok {
			delete(s.clients, out)
			close(out)
		}
	}
}

// type_ sends keystrokes to the guest; one client's are never interleaved
// with another's within a message.
func (s *Serial) type_(p []byte) error {
	s.inMu.Lock()
	defer s.inMu.Unlock()
	_, err := s.input.Write(p)
	return err
}
