package runner

import (
	"log/slog"
	"net"
	"sync"
	"time"
)

// The console port's bounds: connections held at once, from one address,
// and how long a request's header may take. A flood of idle connections
// (15,000 grew the runner from 14 MB to 230–300 MB and took all its
// descriptors, and in a tight memory limit the VM went with it) now waits
// in the kernel's listen backlog, or is closed at once.
const (
	consoleConns      = 128
	consoleConnsPerIP = 48
	consoleHeaderWait = 5 * time.Second
	consoleIdle       = 30 * time.Second
	consoleMaxHeader  = 8 << 10
)

// limitListener holds at most max connections at once, and perIP from one
// address: past max it stops accepting (the backlog keeps the rest, none of
// the runner's descriptors); past perIP it closes the connection at once.
type limitListener struct {
	net.Listener
	slots chan struct{}
	perIP int
	log   *slog.Logger

	mu      sync.Mutex
	byIP    map[string]int
	refused int       // closed for perIP since the last audit line
	said    time.Time // when that line was last written
}

func newLimitListener(l net.Listener, max, perIP int, log *slog.Logger) *limitListener {
	return &limitListener{Listener: l, slots: make(chan struct{}, max), perIP: perIP, log: log, byIP: map[string]int{}}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		l.slots <- struct{}{}
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.slots
			return nil, err
		}
		ip, _, _ := net.SplitHostPort(c.RemoteAddr().String())
		if !l.enter(ip) {
			<-l.slots
			c.Close()
			continue
		}
		return &limitConn{Conn: c, leave: func() { l.leave(ip); <-l.slots }}, nil
	}
}

func (l *limitListener) enter(ip string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byIP[ip] >= l.perIP {
		l.refused++
		if time.Since(l.said) > time.Second { // a line a second, with the count
			l.log.Warn("console refused", "remote", ip, "reason", "too many connections from this address", "limit", l.perIP, "refused", l.refused)
			l.said, l.refused = time.Now(), 0
		}
		return false
	}
	l.byIP[ip]++
	return true
}

func (l *limitListener) leave(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byIP[ip]--; l.byIP[ip] <= 0 {
		delete(l.byIP, ip)
	}
}

// limitConn gives its slot back when closed, once.
type limitConn struct {
	net.Conn
	once  sync.Once
	leave func()
}

func (c *limitConn) Close() error {
	c.once.Do(c.leave)
	return c.Conn.Close()
}
