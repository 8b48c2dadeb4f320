package runner

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/status"
)

// NoVNCDir is where the image keeps noVNC's files (taken from Debian's
// novnc package at image build, without its dependencies).
const NoVNCDir = "/usr/share/novnc"

// XTermDir is where the image keeps xterm.js (from Debian's libjs-xterm).
const XTermDir = "/usr/share/javascript/xterm"

// maxConsoles bounds the consoles open at once on one VM.
const maxConsoles = 8

// webConsole is the VM's console server: its key is read and its port
// bound before QEMU starts, so that a bad key or a taken port stops the
// run before anything exists; it serves once the VM runs.
type webConsole struct {
	srv      *console.Server
	l        net.Listener
	log      *slog.Logger
	serialIn *os.File // the runner's end of QEMU's stdin
}

func openConsole(cfg config.Config, log *slog.Logger) (*webConsole, error) {
	if cfg.ConsolePort == 0 {
		return nil, nil
	}
	key, err := console.LoadKey("CONSOLE_KEY_FILE", cfg.ConsoleKeyFile)
	if err != nil {
		return nil, &ExitError{Code: status.ExitConfig, Err: err}
	}
	var tlsConf *tls.Config
	if cfg.ConsoleTLSCert != "" {
		pair, err := tls.LoadX509KeyPair(cfg.ConsoleTLSCert, cfg.ConsoleTLSKey)
		if err != nil {
			return nil, exitf(status.ExitConfig, "CONSOLE_TLS_CERT, CONSOLE_TLS_KEY: %v — give a PEM certificate chain and its private key (swarmvm deploy --console-tls-cert/--console-tls-key makes them secrets)", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	}
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", cfg.ConsolePort))
	if err != nil {
		return nil, exitf(status.ExitNet, "CONSOLE_PORT: cannot listen on %d: %v — choose a port nothing else in the container uses", cfg.ConsolePort, err)
	}
	log = log.With("console_port", cfg.ConsolePort, "tls", tlsConf != nil)
	l = newLimitListener(l, consoleConns, consoleConnsPerIP, log)
	if tlsConf != nil {
		l = tls.NewListener(l, tlsConf)
	}
	static, xterm := NoVNCDir, XTermDir
	if _, err := os.Stat(static); err != nil {
		static = ""
	}
	if _, err := os.Stat(xterm); err != nil {
		xterm = ""
	}
	return &webConsole{l: l, log: log, srv: &console.Server{
		VM: cfg.Name, Key: key, Static: static, XTerm: xterm, MaxOpen: maxConsoles, Log: log,
	}}, nil
}

// serve answers on the console port until stop is called, which closes
// what is open at the latest by its deadline.
func (c *webConsole) serve(vncSocket string) (stop func(by time.Time)) {
	c.srv.VNCSocket = vncSocket
	hs := &http.Server{Handler: c.srv, ReadHeaderTimeout: consoleHeaderWait, IdleTimeout: consoleIdle, MaxHeaderBytes: consoleMaxHeader}
	go func() {
		if err := hs.Serve(c.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.log.Error("web console stopped", "err", err)
		}
	}()
	c.log.Info("web console ready: open it with swarmvm console "+c.srv.VM, "viewer", c.srv.Static != "")
	return func(by time.Time) {
		ctx, cancel := context.WithTimeout(context.Background(), until(by, time.Second))
		defer cancel()
		hs.Shutdown(ctx)
		hs.Close()
	}
}

// attachSerial gives QEMU a pipe as stdin, the serial port's receive side,
// and sends the guest's output to the console's clients as well as to the
// log.
func (c *webConsole) attachSerial(p *prepared) error {
	r, w, err := os.Pipe()
	if err != nil {
		return exitf(status.ExitInternal, "serial input pipe: %w", err)
	}
	p.serialIn = r
	c.srv.Serial = console.NewSerial(w)
	p.serialTee = c.srv.Serial
	c.serialIn = w
	return nil
}

func (c *webConsole) close() {
	if c != nil {
		c.l.Close()
		if c.serialIn != nil {
			c.serialIn.Close()
		}
	}
}
