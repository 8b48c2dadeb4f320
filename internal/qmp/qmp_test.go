package qmp_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/swarmvm/swarmvm/internal/qmp"
	"github.com/swarmvm/swarmvm/internal/qmp/qmptest"
)

func connect(t *testing.T, h map[string]qmptest.Handler) (*qmp.Client, *qmptest.Server) {
	t.Helper()
	srv, conn := qmptest.New(h)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := qmp.New(ctx, conn)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close(); srv.Close() })
	return c, srv
}

func ctx(t *testing.T, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}

func TestHandshakeAndTypedCommands(t *testing.T) {
	c, srv := connect(t, map[string]qmptest.Handler{
		"query-kvm": func(qmptest.Request) qmptest.Reply {
			return qmptest.Reply{Return: map[string]bool{"enabled": true, "present": true}}
		},
		"query-status": func(qmptest.Request) qmptest.Reply {
			return qmptest.Reply{Return: map[string]any{"running": true, "status": "running"}}
		},
	})
	if v := c.Version(); v.String() != "10.0.13" {
		t.Errorf("version %s, want 10.0.13", v)
	}
	kvm, err := c.QueryKVM(ctx(t, time.Second))
	if err != nil || !kvm.Enabled || !kvm.Present {
		t.Fatalf("QueryKVM = %+v, %v", kvm, err)
	}
	st, err := c.QueryStatus(ctx(t, time.Second))
	if err != nil || st.Status != "running" || !st.Running {
		t.Fatalf("QueryStatus = %+v, %v", st, err)
	}
	got := srv.Received()
	if len(got) != 3 || got[0].Execute != "qmp_capabilities" || got[1].Execute != "query-kvm" {
		t.Fatalf("server saw %+v", got)
	}
	if string(got[1].ID) == string(got[2].ID) {
		t.Errorf("two commands share id %s", got[1].ID)
	}
}

func TestRepliesRoutedByID(t *testing.T) {
	slowID := make(chan string, 1)
	c, srv := connect(t, map[string]qmptest.Handler{
		"slow": func(r qmptest.Request) qmptest.Reply {
			slowID <- string(r.ID)
			return qmptest.Reply{Silent: true}
		},
		"fast": func(qmptest.Request) qmptest.Reply { return qmptest.Reply{Return: "fast-answer"} },
	})
	var wg sync.WaitGroup
	var slowOut string
	var slowErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		slowErr = c.Execute(ctx(t, 5*time.Second), "slow", nil, &slowOut)
	}()
	id := <-slowID
	var fastOut string
	if err := c.Execute(ctx(t, 5*time.Second), "fast", nil, &fastOut); err != nil || fastOut != "fast-answer" {
		t.Fatalf("fast = %q, %v", fastOut, err)
	}
	// Answer the first command after the second: only its id ties it back.
	if err := srv.WriteRaw(`{"return": "slow-answer", "id": ` + id + "}\r\n"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if slowErr != nil || slowOut != "slow-answer" {
		t.Fatalf("slow = %q, %v", slowOut, slowErr)
	}
}

func TestInterleavedEvents(t *testing.T) {
	var srv *qmptest.Server
	c, srv := connect(t, map[string]qmptest.Handler{
		"system_powerdown": func(qmptest.Request) qmptest.Reply {
			srv.Event("POWERDOWN", map[string]any{})
			srv.Event("SHUTDOWN", map[string]any{"guest": true, "reason": "guest-shutdown"})
			return qmptest.Reply{Return: map[string]any{}}
		},
	})
	events := c.Subscribe()
	if err := c.SystemPowerdown(ctx(t, time.Second)); err != nil {
		t.Fatalf("SystemPowerdown: %v", err)
	}
	var names []string
	for len(names) < 2 {
		select {
		case ev := <-events:
			names = append(names, ev.Name)
			if ev.Name == "SHUTDOWN" && !strings.Contains(string(ev.Data), "guest-shutdown") {
				t.Errorf("SHUTDOWN data %s", ev.Data)
			}
			if ev.Timestamp.Unix() != 1700000000 {
				t.Errorf("timestamp %v", ev.Timestamp)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("events so far %v", names)
		}
	}
	if names[0] != "POWERDOWN" || names[1] != "SHUTDOWN" {
		t.Errorf("events %v", names)
	}
}

// A subscriber that does not read loses what overflows its queue, counted,
// and the replies behind the events still come; a session nobody
// subscribed on keeps nothing and drops nothing.
func TestEventsOverflowCounted(t *testing.T) {
	const sent = qmp.EventQueue + 44
	var srv *qmptest.Server
	storm := func(qmptest.Request) qmptest.Reply {
		for i := range sent {
			srv.Event("RTC_CHANGE", map[string]any{"offset": i})
		}
		return qmptest.Reply{Return: "after the storm"}
	}
	c, srv := connect(t, map[string]qmptest.Handler{"storm": storm})
	var out string
	if err := c.Execute(ctx(t, 5*time.Second), "storm", nil, &out); err != nil || out != "after the storm" {
		t.Fatalf("unsubscribed: %q, %v", out, err)
	}
	if d := c.Dropped(); d != 0 {
		t.Errorf("unsubscribed session dropped %d", d)
	}
	events := c.Subscribe()
	if err := c.Execute(ctx(t, 5*time.Second), "storm", nil, &out); err != nil || out != "after the storm" {
		t.Fatalf("the reply behind %d unread events: %q, %v", sent, out, err)
	}
	if d := c.Dropped(); d != sent-qmp.EventQueue {
		t.Errorf("dropped %d, want %d", d, sent-qmp.EventQueue)
	}
	for i := range qmp.EventQueue {
		ev := <-events
		if want := fmt.Sprintf(`{"offset":%d}`, i); string(ev.Data) != want {
			t.Fatalf("event %d: %s, want %s (the first ones, in order)", i, ev.Data, want)
		}
	}
}

func TestErrorReply(t *testing.T) {
	c, _ := connect(t, map[string]qmptest.Handler{
		"query-kvm": func(qmptest.Request) qmptest.Reply {
			return qmptest.Reply{ErrorClass: "CommandNotFound", ErrorDesc: "The command query-kvm has not been found"}
		},
	})
	_, err := c.QueryKVM(ctx(t, time.Second))
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "query-kvm" {
		t.Fatalf("error %v (%T), want *qmp.Error CommandNotFound", err, err)
	}
	if !strings.Contains(err.Error(), "query-kvm: CommandNotFound: The command") {
		t.Errorf("message %q", err)
	}
	// The session survives an error reply.
	if err := c.Execute(ctx(t, time.Second), "query-status", nil, nil); err != nil {
		t.Errorf("after error reply: %v", err)
	}
}

func TestReplyOverOneMiB(t *testing.T) {
	big := strings.Repeat("x", 3<<20)
	c, _ := connect(t, map[string]qmptest.Handler{
		"query-qmp-schema": func(qmptest.Request) qmptest.Reply { return qmptest.Reply{Return: []string{big, "end"}} },
	})
	var out []string
	if err := c.Execute(ctx(t, 10*time.Second), "query-qmp-schema", nil, &out); err != nil {
		t.Fatalf("Execute: %v", err)
	}
	if len(out) != 2 || len(out[0]) != len(big) || out[1] != "end" {
		t.Fatalf("reply of %d items, first %d bytes", len(out), len(out[0]))
	}
}

func TestMessageOverLimitEndsSession(t *testing.T) {
	c, srv := connect(t, map[string]qmptest.Handler{
		"huge": func(qmptest.Request) qmptest.Reply { return qmptest.Reply{Silent: true} },
	})
	go srv.WriteRaw(`{"return": "` + strings.Repeat("y", qmp.MaxMessage+(128<<10)))
	err := c.Execute(ctx(t, 10*time.Second), "huge", nil, nil)
	if !errors.Is(err, qmp.ErrTooLarge) || !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("error %v, want ErrClosed wrapping ErrTooLarge", err)
	}
}

func TestTruncatedStream(t *testing.T) {
	var srv *qmptest.Server
	c, srv := connect(t, map[string]qmptest.Handler{
		"query-kvm": func(qmptest.Request) qmptest.Reply {
			go func() {
				srv.WriteRaw(`{"return": {"enab`)
				srv.Close()
			}()
			return qmptest.Reply{Silent: true}
		},
	})
	_, err := c.QueryKVM(ctx(t, 5*time.Second))
	if !errors.Is(err, qmp.ErrClosed) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("error %v, want ErrClosed wrapping io.ErrUnexpectedEOF", err)
	}
	select {
	case <-c.Done():
	case <-time.After(time.Second):
		t.Fatal("Done not closed after the stream ended")
	}
	if _, ok := <-c.Subscribe(); ok {
		t.Error("Events still open after the stream ended")
	}
	if err := c.Execute(ctx(t, time.Second), "query-status", nil, nil); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("command after close: %v", err)
	}
}

func TestMalformedReply(t *testing.T) {
	var srv *qmptest.Server
	c, srv := connect(t, map[string]qmptest.Handler{
		"query-kvm": func(qmptest.Request) qmptest.Reply {
			go srv.WriteRaw("{not json}\r\n")
			return qmptest.Reply{Silent: true}
		},
	})
	_, err := c.QueryKVM(ctx(t, 5*time.Second))
	if !errors.Is(err, qmp.ErrClosed) || !strings.Contains(err.Error(), "malformed") {
		t.Fatalf("error %v, want a malformed-message close", err)
	}
}

func TestStalledPeer(t *testing.T) {
	c, _ := connect(t, map[string]qmptest.Handler{
		"query-status": func(qmptest.Request) qmptest.Reply { return qmptest.Reply{Silent: true} },
	})
	start := time.Now()
	_, err := c.QueryStatus(ctx(t, 100*time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want context.DeadlineExceeded", err)
	}
	if time.Since(start) > 3*time.Second {
		t.Errorf("returned after %v", time.Since(start))
	}
	// A caller's deadline must not end the session for the others.
	if _, err := c.QueryKVM(ctx(t, time.Second)); err != nil {
		t.Fatalf("session unusable after one deadline: %v", err)
	}
}

func TestStalledGreeting(t *testing.T) {
	srv, conn := qmptest.NewSilent()
	defer srv.Close()
	_, err := qmp.New(ctx(t, 100*time.Millisecond), conn)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want context.DeadlineExceeded", err)
	}
}

func TestNotQMP(t *testing.T) {
	srv, conn := qmptest.NewSilent()
	defer srv.Close()
	go srv.WriteRaw(`{"hello": "world"}` + "\n")
	_, err := qmp.New(ctx(t, time.Second), conn)
	if err == nil || !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Fatalf("error %v", err)
	}
}

func TestCapabilitiesRefused(t *testing.T) {
	srv, conn := qmptest.New(map[string]qmptest.Handler{
		"qmp_capabilities": func(qmptest.Request) qmptest.Reply {
			return qmptest.Reply{ErrorClass: "GenericError", ErrorDesc: "Capabilities negotiation is already complete"}
		},
	})
	defer srv.Close()
	_, err := qmp.New(ctx(t, time.Second), conn)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Command != "qmp_capabilities" {
		t.Fatalf("error %v", err)
	}
}
