// Command swarmvm runs QEMU/KVM virtual machines as Docker Swarm services
// without --privileged. See the README.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/swarmvm/swarmvm/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
