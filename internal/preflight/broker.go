package preflight

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/swarmvm/swarmvm/internal/config"
	"github.com/swarmvm/swarmvm/internal/fdpass"
)

const brokerFix = "start the broker on this node (systemctl start swarmvm-broker, or its container) and mount its folder into the service at the same path (" + config.BrokerDir + ")"

// BrokerKVM asks the broker at socket for a KVM descriptor for vm and
// proves it works with probe. The lease must stay open for the VM's
// lifetime.
func BrokerKVM(ctx context.Context, socket, vm string, attempts int, probe KVMProbe) (*fdpass.Lease, *os.File, Finding) {
	const name = "kvm broker"
	lease, err := ask(ctx, socket, fdpass.Request{VM: vm, KVM: true}, attempts)
	if err != nil {
		return nil, nil, brokerFailure(socket, err)
	}
	kvm := lease.Take(fdpass.FDKVM)
	if kvm == nil {
		lease.Close()
		return nil, nil, fail(name, ClassKVM, kvmSymptom, fmt.Sprintf("the broker granted %v, not a KVM descriptor", lease.Response.FDs), brokerFix)
	}
	f, finding := checked(kvm, name, "broker "+socket, probe)
	if f == nil {
		lease.Close()
		return nil, nil, finding
	}
	return lease, f, finding
}

// ask sends req to the broker. A broker that is not there yet (no socket,
// refused connection, timeout) is asked again with backoff, attempts times
// in all, within ctx; a refusal is final.
func ask(ctx context.Context, socket string, req fdpass.Request, attempts int) (*fdpass.Lease, error) {
	var err error
	wait := 200 * time.Millisecond
	for i := 0; i < attempts; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return nil, err
			case <-time.After(wait):
			}
			wait *= 2
		}
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var lease *fdpass.Lease
		lease, err = fdpass.Ask(actx, socket, req)
		cancel()
		if err == nil {
			lease.Attempts = i + 1
			return lease, nil
		}
		if !retryable(err) {
			return nil, err
		}
	}
	return nil, err
}

// retryable: no broker yet, or one that went away mid-request (killed or
// restarting: the connection reset, or closed with no answer).
func retryable(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EAGAIN) ||
		errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, syscall.ECONNRESET)
}

func brokerFailure(socket string, err error) Finding {
	const name, symptom = "kvm broker", kvmSymptom
	var refused *fdpass.RefusedError
	switch {
	case errors.As(err, &refused):
		return fail(name, ClassKVM, symptom, fmt.Sprintf("the broker at %s refused (%s) %s", socket, refused.Reason, who()),
			"see the broker's audit log; allow this user with swarmvm broker --allow-uid, or run the service as the allowed user")
	case errors.Is(err, syscall.ENOENT):
		return fail(name, ClassKVM, symptom, "no broker socket at "+socket, brokerFix)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fail(name, ClassKVM, symptom, socket+" exists but no broker answers on it", brokerFix)
	case errors.Is(err, syscall.EACCES):
		return fail(name, ClassKVM, symptom, fmt.Sprintf("%s may not connect to %s", who(), socket),
			fmt.Sprintf("give the socket the container user's group: swarmvm broker --socket-group <gid> (the runner image's is %d)", config.RunnerGID))
	}
	return fail(name, ClassKVM, symptom, fmt.Sprintf("asking the broker at %s: %v", socket, err), brokerFix)
}
