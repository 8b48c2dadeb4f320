package cli

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/swarmvm/swarmvm/internal/console"
	"github.com/swarmvm/swarmvm/internal/swarm"
)

// consoleKeys is the folder of the console keys deploy made.
func (e *env) consoleKeys() string {
	if d := e.getenv("SWARMVM_CONSOLE_KEYS"); d != "" {
		return d
	}
	return console.DefaultKeysDir()
}

func (e *env) consoleCmd() *cobra.Command {
	var ttl time.Duration
	var serial, viewOnly bool
	var caFile string
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Print the address of a VM's web console, with a short-lived ticket",
		Long: `Console finds the node that runs the VM and prints the address of its web
console (noVNC in the browser), with a ticket signed by the VM's console key:
the key swarmvm deploy made (in $XDG_CONFIG_HOME/swarmvm/console, or
SWARMVM_CONSOLE_KEYS) and gave the task as a Swarm secret. The ticket lets
one open the console until it expires (--ttl); a console already open stays
open until then. Without a ticket the console answers 401.

With --serial it attaches this terminal to the guest's serial console
instead, like virsh console: the latest output, then what follows, and what
you type goes to the guest. Ctrl-] leaves. --view-only mints a ticket that
shows the screen and the serial output but passes no key, pointer or
serial input to the guest: for someone who should watch, not act.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if ttl < time.Minute || ttl > 24*time.Hour {
				return &usageError{fmt.Errorf("--ttl %v is outside 1m–24h", ttl)}
			}
			key, err := console.Keys{Dir: e.consoleKeys()}.Load(name)
			if err != nil {
				return err
			}
			return withSwarm(cmd, func(c *swarm.Client) error {
				t, err := c.Console(cmd.Context(), name)
				if err != nil {
					return err
				}
				expires := time.Now().Add(ttl).Truncate(time.Second)
				grant := console.Input
				if viewOnly {
					grant = console.View
				}
				ticket := console.Mint(key, name, grant, expires)
				if serial {
					return e.attachSerial(cmd.Context(), name, t, ticket, caFile)
				}
				fmt.Fprintf(e.stdout, "%s: console on node %s, port %d; ticket valid until %s\n", name, t.Node, t.Port, expires.UTC().Format(time.RFC3339))
				scheme := "http"
				if t.TLS {
					scheme = "https"
				}
				addr := net.JoinHostPort(t.Addr, strconv.Itoa(t.Port))
				fmt.Fprintf(e.stdout, "%s://%s/?ticket=%s\n", scheme, addr, ticket)
				fmt.Fprintf(e.stdout, "serial console: %s://%s%s?ticket=%s\n", scheme, addr, console.SerialPage, ticket)
				return nil
			})
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", 10*time.Minute, "how long the ticket lets one open the console")
	cmd.Flags().BoolVar(&serial, "serial", false, "attach this terminal to the guest's serial console (Ctrl-] leaves)")
	cmd.Flags().StringVar(&caFile, "ca", "", "--serial to a console with TLS: trust the certificates in this PEM file (default: the system's)")
	cmd.Flags().BoolVar(&viewOnly, "view-only", false, "a ticket to watch: no keys, pointer or serial input reach the guest")
	return cmd
}

// escapeKey (Ctrl-]) leaves the serial console, as in virsh and telnet.
const escapeKey = 0x1d

// attachSerial joins this terminal and the guest's serial console until
// Ctrl-], the end of input, or the console closing.
func (e *env) attachSerial(ctx context.Context, name string, t swarm.ConsoleTarget, ticket, caFile string) error {
	scheme, opts := "ws", &websocket.DialOptions{}
	if t.TLS {
		scheme = "wss"
		conf := &tls.Config{MinVersion: tls.VersionTLS12}
		if caFile != "" {
			pem, err := os.ReadFile(caFile)
			if err != nil {
				return fmt.Errorf("--ca: %w", err)
			}
			conf.RootCAs = x509.NewCertPool()
			if !conf.RootCAs.AppendCertsFromPEM(pem) {
				return fmt.Errorf("--ca: no PEM certificate in %s", caFile)
			}
		}
		opts.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
	}
	u := scheme + "://" + net.JoinHostPort(t.Addr, strconv.Itoa(t.Port)) + console.SerialPath + "?ticket=" + ticket
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	ws, _, err := websocket.Dial(dctx, u, opts)
	cancel()
	if err != nil {
		return fmt.Errorf("serial console of %s on %s: %w", name, t.Node, err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 20)
	if restore, err := rawTerminal(os.Stdin); err == nil {
		defer restore()
		fmt.Fprintf(e.stderr, "connected to %s's serial console on node %s; Ctrl-] leaves\r\n", name, t.Node)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		defer stop()
		b := make([]byte, 4096)
		for {
			n, err := os.Stdin.Read(b)
			if i := bytes.IndexByte(b[:n], escapeKey); i >= 0 {
				n, err = i, io.EOF
			}
			if n > 0 {
				if werr := ws.Write(ctx, websocket.MessageBinary, b[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				// The end of input: the guest's answer to the last line
				// still comes, for a moment.
				select {
				case <-time.After(2 * time.Second):
				case <-ctx.Done():
				}
				return
			}
		}
	}()
	for {
		_, msg, err := ws.Read(ctx)
		if err != nil {
			if ctx.Err() != nil {
				ws.Close(websocket.StatusNormalClosure, "")
				return nil
			}
			if s := websocket.CloseStatus(err); s == websocket.StatusPolicyViolation {
				return fmt.Errorf("the console refused input: the ticket grants view only")
			}
			return fmt.Errorf("serial console closed: %w", err)
		}
		e.stdout.Write(msg)
	}
}

// rawTerminal puts f, when it is a terminal, in raw mode (keys go to the
// guest as typed: Ctrl-C is the guest's) and returns how to restore it.
func rawTerminal(f *os.File) (restore func(), err error) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Oflag &^= unix.OPOST
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}
