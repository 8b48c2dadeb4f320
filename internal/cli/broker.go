package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/swarmvm/swarmvm/internal/broker"
	"github.com/swarmvm/swarmvm/internal/config"
)

func (e *env) brokerCmd() *cobra.Command {
	cfg := broker.DefaultConfig()
	var mode, auditPath, level string
	cmd := &cobra.Command{
		Use:   "broker",
		Short: "Host daemon: hand KVM and TAP descriptors to VM containers over a unix socket",
		Long: `The broker runs on each VM-capable node (systemd unit, or a container with
--device /dev/kvm). VM containers mount the socket's folder; the runner asks
for descriptors, and QEMU gets KVM (and a TAP on a host bridge) without any
device, capability or root in the container. Peers are checked by
SO_PEERCRED; every grant and refusal is one JSON audit line.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := strconv.ParseUint(mode, 8, 32)
			if err != nil || m > 0o777 {
				return &silentError{usage(e, "--socket-mode %q is not an octal mode such as 0660", mode)}
			}
			cfg.SocketMode = os.FileMode(m)
			if _, err := broker.ParseBridges(cfg.Bridges); err != nil {
				return &silentError{usage(e, "%v", err)}
			}
			log := newLogger(e.stderr, level)
			audit, closeAudit, err := auditLogger(e.stderr, auditPath)
			if err != nil {
				return err
			}
			defer closeAudit()
			return runBroker(cmd, cfg, audit, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Socket, "socket", cfg.Socket, "unix socket to listen on; VM services mount its folder")
	f.StringVar(&mode, "socket-mode", "0660", "permission bits of the socket")
	f.IntVar(&cfg.SocketGroup, "socket-group", cfg.SocketGroup, "group of the socket (-1: the broker's own)")
	f.IntSliceVar(&cfg.AllowUIDs, "allow-uid", cfg.AllowUIDs, fmt.Sprintf("peer uids allowed (the runner image's user is %d)", config.RunnerUID))
	f.IntSliceVar(&cfg.AllowGIDs, "allow-gid", cfg.AllowGIDs, fmt.Sprintf("peer gids allowed (every VM service runs in group %d)", config.RunnerGID))
	f.StringVar(&cfg.KVMDevice, "kvm-device", cfg.KVMDevice, "KVM device to open for peers")
	f.StringVar(&cfg.VhostNet, "vhost-net", cfg.VhostNet, "vhost-net device, granted with a TAP when present")
	f.StringSliceVar(&cfg.Bridges, "bridge", nil, "host bridge a VM's TAP may join (repeat for several): NAME for every allowed peer, NAME@UID or NAME@FIRST-LAST for those uids only; none: no TAPs")
	f.StringVar(&cfg.TAPPrefix, "tap-prefix", cfg.TAPPrefix, "name prefix of the TAPs the broker creates (and may clean up)")
	f.IntVar(&cfg.MaxConns, "max-conns", cfg.MaxConns, "connections at once, leases included")
	f.IntVar(&cfg.MaxPerPeer, "max-per-peer", cfg.MaxPerPeer, "connections at once from one peer process")
	f.IntVar(&cfg.MaxPerUID, "max-per-uid", cfg.MaxPerUID, "connections at once from one uid, whatever its processes (a VM holds at most two leases)")
	f.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "a peer must send its request within this")
	f.DurationVar(&cfg.ChangedTAPWait, "changed-tap-wait", cfg.ChangedTAPWait, "how long a uid gets no TAP after the broker ended its lease for a changed TAP (MAC, owner, persistence)")
	f.StringVar(&auditPath, "audit-log", "", "append audit lines (JSON) to this file instead of stderr")
	f.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	return cmd
}

func runBroker(cmd *cobra.Command, cfg broker.Config, audit, log *slog.Logger) error {
	ctx := cmd.Context()
	b := broker.New(cfg, audit, log)
	// SIGUSR1 asks for the counts (and would end the process by default):
	// handled before the socket appears, which is when anyone can ask.
	stopStats := statsOnSignal(ctx, b, log)
	defer stopStats()
	l, err := broker.Listen(cfg)
	if err != nil {
		return fmt.Errorf("broker: listen on %s: %w", cfg.Socket, err)
	}
	if removed, err := b.CleanOrphans(); err != nil {
		log.Warn("orphan TAP cleanup", "err", err)
	} else if len(removed) > 0 {
		log.Info("removed TAPs left by VMs that are gone", "taps", removed)
	}
	if _, err := os.Stat(cfg.VhostNet); err != nil {
		log.Info("no vhost-net on this node: TAPs are granted without it", "path", cfg.VhostNet)
	}
	log.Info("broker listening", "socket", cfg.Socket, "allow_uids", cfg.AllowUIDs, "allow_gids", cfg.AllowGIDs, "bridges", cfg.Bridges)
	if sent, err := broker.Notify("READY=1"); err != nil {
		log.Warn("sd_notify", "err", err)
	} else if sent {
		log.Info("told systemd we are ready")
	}
	err = b.Serve(ctx, l)
	broker.Notify("STOPPING=1")
	b.Wait()
	log.Info("broker stopped")
	return err
}

func auditLogger(stderr io.Writer, path string) (*slog.Logger, func(), error) {
	w, closer := stderr, func() {}
	if path != "" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("--audit-log: %w", err)
		}
		w, closer = f, func() { f.Close() }
	}
	return slog.New(slog.NewJSONHandler(w, nil)).With("log", "audit"), closer, nil
}

func usage(e *env, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	fmt.Fprintf(e.stderr, "swarmvm: %v\n", err)
	return &usageError{err}
}

type usageError struct{ error }

// statsOnSignal logs the broker's resource counts on every SIGUSR1
// (systemctl kill -s USR1 swarmvm-broker): connections held, open
// descriptors, goroutines and TAPs of its prefix on this node. An operator
// compares them over time; the load test compares them to a baseline.
func statsOnSignal(ctx context.Context, b *broker.Broker, log *slog.Logger) func() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ch:
				fds, _ := os.ReadDir("/proc/self/fd")
				taps, err := b.TAPs()
				if err != nil {
					log.Warn("broker stats: listing TAPs", "err", err)
				}
				log.Info("broker stats", "conns", b.Conns(), "fds", len(fds), "goroutines", runtime.NumGoroutine(), "taps", len(taps))
			case <-ctx.Done():
				return
			}
		}
	}()
	return func() {
		signal.Stop(ch)
		cancel()
		<-done
	}
}
