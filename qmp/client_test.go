package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

var testVersion = Version{Qemu: VersionTriple{Major: 7, Minor: 2, Micro: 22}, Package: "blockd-test"}

// startServer runs a server with a few test commands on a unix socket.
func startServer(t *testing.T, opts ...MonitorOption) (*Server, string) {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	s := NewServer(logrus.NewEntry(log), testVersion)
	type echoArgs struct {
		Name  string `json:"name"`
		Count int    `json:"count,omitempty"`
	}
	Handle(s, "x-echo", func(_ context.Context, _ *Monitor, a *echoArgs) (*echoArgs, error) {
		return a, nil
	})
	Handle(s, "x-raw", func(_ context.Context, _ *Monitor, a *Args) (Args, error) {
		return *a, nil
	})
	Handle(s, "x-nil", func(context.Context, *Monitor, *Empty) (*Empty, error) {
		return nil, nil
	})
	Handle(s, "x-fail", func(context.Context, *Monitor, *Empty) (any, error) {
		return nil, NewError(DeviceNotFound, "no such thing")
	})
	Handle(s, "x-plain-error", func(context.Context, *Monitor, *Empty) (any, error) {
		return nil, net.ErrClosed
	})
	Handle(s, "x-panic", func(context.Context, *Monitor, *Empty) (any, error) {
		panic("boom")
	})
	Handle(s, "x-emit", func(_ context.Context, m *Monitor, a *echoArgs) (any, error) {
		m.Server().Emit(a.Name, map[string]any{"n": a.Count})
		return nil, nil
	})
	Handle(s, "x-sleep", func(ctx context.Context, _ *Monitor, a *echoArgs) (any, error) {
		select {
		case <-time.After(time.Duration(a.Count) * time.Millisecond):
		case <-ctx.Done():
		}
		return map[string]any{"slept": a.Name}, nil
	})
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l, opts...) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, path
}

// client is a raw QMP client: it writes bytes and reads messages.
type client struct {
	t    *testing.T
	conn net.Conn
	msgs chan []byte // raw messages, "\r\n" stripped
}

func dial(t *testing.T, path string) *client {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c := &client{t: t, conn: conn, msgs: make(chan []byte, 1024)}
	go func() {
		defer close(c.msgs)
		var buf []byte
		tmp := make([]byte, 64<<10)
		for {
			n, err := conn.Read(tmp)
			buf = append(buf, tmp[:n]...)
			for {
				i := bytes.Index(buf, []byte("\r\n"))
				if i < 0 {
					break
				}
				// Pretty output has inner line breaks; a message ends
				// with a line that is "}" alone.
				if bytes.HasPrefix(buf, []byte("{\r\n")) {
					j := bytes.Index(buf, []byte("\r\n}\r\n"))
					if j < 0 {
						break
					}
					i = j + 3
				}
				c.msgs <- append([]byte(nil), buf[:i]...)
				buf = buf[i+2:]
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { conn.Close() })
	return c
}

func (c *client) send(s string) {
	c.t.Helper()
	if _, err := c.conn.Write([]byte(s)); err != nil {
		c.t.Fatal(err)
	}
}

// next returns the next message, or nil at EOF.
func (c *client) next() []byte {
	c.t.Helper()
	select {
	case m, ok := <-c.msgs:
		if !ok {
			return nil
		}
		return m
	case <-time.After(10 * time.Second):
		c.t.Fatal("timeout waiting for a message")
		return nil
	}
}

func (c *client) expect(want string) {
	c.t.Helper()
	got := c.next()
	if string(got) != want {
		c.t.Fatalf("got  %s\nwant %s", got, want)
	}
}

// quiet checks that nothing arrives for a short while.
func (c *client) quiet() {
	c.t.Helper()
	select {
	case m := <-c.msgs:
		c.t.Fatalf("unexpected message %s", m)
	case <-time.After(50 * time.Millisecond):
	}
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd-test"}, "capabilities": ["oob"]}}`

// negotiated returns a client past capabilities negotiation.
func negotiated(t *testing.T, path string, oob bool) *client {
	c := dial(t, path)
	c.expect(greeting)
	if oob {
		c.send(`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}`)
	} else {
		c.send(`{"execute":"qmp_capabilities"}`)
	}
	c.expect(`{"return": {}}`)
	return c
}

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(string(b)))
	d.UseNumber()
	var v map[string]any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("bad JSON %q: %v", b, err)
	}
	return v
}
