package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// agent is a scripted peer on the other end of a socket pair: it reads
// the client's commands and answers as answer says. A hostile guest is
// what cannot be real here.
func agent(t *testing.T, answer func(cmd map[string]any, w net.Conn)) *Client {
	t.Helper()
	a, b := socketPair(t)
	go func() {
		r := bufio.NewReader(b)
		for {
			line, err := r.ReadBytes('\n')
			line = bytes.TrimLeft(line, "\xff")
			var cmd map[string]any
			dec := json.NewDecoder(bytes.NewReader(line))
			for dec.Decode(&cmd) == nil {
				answer(cmd, b)
				cmd = nil
			}
			if err != nil {
				return
			}
		}
	}()
	return New(a)
}

// socketPair is a connected pair of unix stream sockets.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	path := t.TempDir() + "/qga.sock"
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		got <- c
	}()
	a, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	b := <-got
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// syncReply answers guest-sync-delimited as qemu-ga does.
func syncReply(cmd map[string]any, w net.Conn) bool {
	if cmd["execute"] != "guest-sync-delimited" {
		return false
	}
	id := cmd["arguments"].(map[string]any)["id"]
	b, _ := json.Marshal(map[string]any{"return": id})
	w.Write(append(append([]byte{0xFF}, b...), '\n'))
	return true
}

func within(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	_ = cancel // ends with the timeout
	return ctx
}

func TestSyncSkipsStaleReplies(t *testing.T) {
	c := agent(t, func(cmd map[string]any, w net.Conn) {
		if cmd["execute"] == "guest-sync-delimited" {
			// what an earlier client left: a reply, noise, another
			// client's sync answer; then the fresh one
			w.Write([]byte(`{"return": {"stale": 1}}` + "\n" + "\x00garbage\n" + "\xff" + `{"return": 12345}` + "\n"))
			syncReply(cmd, w)
			return
		}
		if cmd["execute"] == "guest-get-osinfo" {
			w.Write([]byte(`{"return": {"id": "debian", "name": "Debian GNU/Linux", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12"}}` + "\n"))
		}
	})
	if err := c.Sync(within(5 * time.Second)); err != nil {
		t.Fatalf("sync: %v", err)
	}
	o, err := c.OSInfo(within(5 * time.Second))
	if err != nil {
		t.Fatalf("osinfo: %v", err)
	}
	if o.String() != "Debian GNU/Linux 12 (bookworm)" || o.ID != "debian" {
		t.Fatalf("osinfo %+v", o)
	}
}

func TestErrorReply(t *testing.T) {
	c := agent(t, func(cmd map[string]any, w net.Conn) {
		if !syncReply(cmd, w) {
			w.Write([]byte(`{"error": {"class": "CommandNotFound", "desc": "no such command"}}` + "\n"))
		}
	})
	if err := c.Sync(within(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	_, err := c.Freeze(within(5 * time.Second))
	var e *Error
	if !errors.As(err, &e) || e.Class != "CommandNotFound" || e.Command != "guest-fsfreeze-freeze" {
		t.Fatalf("err %v, want the agent's CommandNotFound", err)
	}
}

// A silent agent, one that writes garbage without a delimiter, and one
// that writes one endless line each cost the caller its deadline or less,
// and never more than the size bounds in memory.
func TestHostileAgents(t *testing.T) {
	cases := map[string]func(cmd map[string]any, w net.Conn){
		"silent": func(map[string]any, net.Conn) {},
		"garbage": func(_ map[string]any, w net.Conn) {
			for range 64 {
				if _, err := w.Write(bytes.Repeat([]byte("\x01{garbage}\n"), 1<<14)); err != nil {
					return
				}
			}
		},
		"endless line": func(cmd map[string]any, w net.Conn) {
			w.Write([]byte{0xFF})
			chunk := []byte(strings.Repeat("x", 1<<16))
			for range 64 { // 4 MiB, four times MaxReply
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		},
		"wrong sync id": func(cmd map[string]any, w net.Conn) {
			for range 1000 {
				if _, err := w.Write([]byte("\xff{\"return\": 1}\n")); err != nil {
					return
				}
			}
		},
	}
	for name, answer := range cases {
		t.Run(name, func(t *testing.T) {
			c := agent(t, answer)
			var before runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			began := time.Now()
			err := c.Sync(within(2 * time.Second))
			took := time.Since(began)
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Fatal("sync with a hostile agent succeeded")
			}
			if took > 3*time.Second {
				t.Fatalf("sync took %v, past its 2 s deadline", took)
			}
			if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 3*MaxReply {
				t.Fatalf("heap grew by %d bytes", grew)
			}
			t.Logf("%s: %v after %v", name, err, took.Round(time.Millisecond))
		})
	}
}

func TestEndlessReplyIsTooLarge(t *testing.T) {
	c := agent(t, func(cmd map[string]any, w net.Conn) {
		if !syncReply(cmd, w) {
			w.Write([]byte(`{"return": "`))
			for range 32 {
				if _, err := w.Write(bytes.Repeat([]byte("y"), 1<<16)); err != nil {
					return
				}
			}
		}
	})
	if err := c.Sync(within(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.FreezeStatus(within(5 * time.Second)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err %v, want ErrTooLarge", err)
	}
}

func TestNeedsDeadline(t *testing.T) {
	c := agent(t, func(map[string]any, net.Conn) {})
	if err := c.Call(context.Background(), "guest-ping", nil, nil); !errors.Is(err, ErrNoDeadline) {
		t.Fatalf("err %v, want ErrNoDeadline", err)
	}
	if _, err := Dial(context.Background(), "/nonexistent"); !errors.Is(err, ErrNoDeadline) {
		t.Fatalf("err %v, want ErrNoDeadline", err)
	}
}

func TestAddresses(t *testing.T) {
	var ifs []Interface
	if err := json.Unmarshal([]byte(`[
		{"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
		{"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
			{"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64},
			{"ip-address-type": "ipv6", "ip-address": "fd00::5", "prefix": 64},
			{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]},
		{"name": "docker0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "172.17.0.1", "prefix": 16}]}]`), &ifs); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(Addresses(ifs, 8), " ")
	if got != "10.0.2.15 172.17.0.1 fd00::5" {
		t.Fatalf("addresses %q", got)
	}
	if got := Addresses(ifs, 1); len(got) != 1 || got[0] != "10.0.2.15" {
		t.Fatalf("at most 1: %q", got)
	}
}
