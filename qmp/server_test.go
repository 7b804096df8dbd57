package qmp

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// Every row of the error table in the QMP reference, before and after
// negotiation, with QSD 7.2's exact bytes.
func TestErrorTable(t *testing.T) {
	_, path := startServer(t)
	c := dial(t, path)
	c.expect(greeting)
	for _, tc := range []struct{ in, want string }{
		{`{"execute": "query-version", "id": 1}`, `{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`},
		{`{"execute": "no-such", "id": "a"}`, `{"id": "a", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`},
		{`{"execute": }`, `{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}`},
		{`{"a":1,"a":2}`, `{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}`},
		{`[1,2]`, `{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}`},
		{`{"id":4}`, `{"id": 4, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}`},
		{`{"execute":5}`, `{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}`},
		{`{"execute":"qmp_capabilities","arguments":[]}`, `{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}`},
		{`{"execute":"qmp_capabilities","arguments":null}`, `{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}`},
		{`{"execute":"qmp_capabilities","bogus":1}`, `{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}`},
		{`{"exec-oob":"qmp_capabilities","id":"x"}`, `{"id": "x", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}`},
		{`{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":"é"}`, `{"id": "\u00E9", "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}`},
		{`{"execute":"qmp_capabilities","arguments":{"x":1}}`, `{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}`},
		{`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":'c1'}`, `{"return": {}, "id": "c1"}`},
		{`{"execute":"qmp_capabilities","id":2}`, `{"id": 2, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}`},
		{`{"exec-oob":"query-version","id":3}`, `{"id": 3, "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}`},
		{`{"exec-oob":"query-version","execute":"query-version","id":3}`, `{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}`},
		{`{"execute":"no-such","id":5}`, `{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}}`},
		{`{"execute":"query-version","arguments":{"x":1},"id":6}`, `{"id": 6, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}`},
		{`{"execute":"x-echo","arguments":{},"id":7}`, `{"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'name' is missing"}}`},
		{`{"execute":"x-echo","arguments":{"name":1},"id":8}`, `{"id": 8, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'name', expected: string"}}`},
		{`{"execute":"x-nil","id":"nil"}`, `{"return": {}, "id": "nil"}`},
		{`{"execute":"x-fail","id":9}`, `{"id": 9, "error": {"class": "DeviceNotFound", "desc": "no such thing"}}`},
		{`{"execute":"x-plain-error","id":10}`, `{"id": 10, "error": {"class": "GenericError", "desc": "use of closed network connection"}}`},
		{`{"execute":"x-panic","id":11}`, `{"id": 11, "error": {"class": "GenericError", "desc": "internal error in x-panic: boom"}}`},
		{`{"execute":"query-version","id":{"a":[1,2.5,1.0,-0,1e2,18446744073709551615,18446744073709551616]}}`,
			`{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd-test"}, "id": {"a": [1, 2.5, 1, 0, 100, 18446744073709551615, 1.8446744073709552e+19]}}`},
		{`{"execute":"query-version", "id": "\u00e9\ud83d\ude00"}`, `{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd-test"}, "id": "\u00E9\uD83D\uDE00"}`},
		{`{"execute":"query-version", "id": null}`, `{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd-test"}, "id": null}`},
		{`{"execute":"x-echo","arguments":{"name":"n","count":3}}`, `{"return": {"name": "n", "count": 3}}`},
		{`{"execute":"x-raw","arguments":{"b":[true,false,null],"a":"x"}}`, `{"return": {"a": "x", "b": [true, false, null]}}`},
		// A partial request is dropped by a control character.
		{"{\"execute\":\"query-version\", \"id\": 1\x01", `{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}`},
	} {
		c.send(tc.in + "\n")
		c.expect(tc.want)
	}
	c.quiet()
}

// Several requests in one write, one request over several writes.
func TestFraming(t *testing.T) {
	_, path := startServer(t)
	c := negotiated(t, path, false)
	c.send(`{"execute":"x-echo","arguments":{"name":"a"}}{"execute":"x-echo","arguments":{"name":"b"}} {"execute":"x-echo",`)
	c.expect(`{"return": {"name": "a"}}`)
	c.expect(`{"return": {"name": "b"}}`)
	c.quiet()
	for _, part := range []string{`"argu`, `ments":{"na`, `me":"c"}`, "}"} {
		c.send(part)
		time.Sleep(5 * time.Millisecond)
	}
	c.expect(`{"return": {"name": "c"}}`)
}

func TestNegotiation(t *testing.T) {
	_, path := startServer(t)
	c := dial(t, path)
	c.expect(greeting)
	c.send(`{"execute":"qmp_capabilities","arguments":{"enable":["oob","bogus"]}}`)
	m := decode(t, c.next())
	if e, _ := m["error"].(map[string]any); e == nil || e["class"] != "GenericError" {
		t.Fatalf("unknown capability: %v", m)
	}
	// Still negotiating: events are not sent yet.
	c2 := negotiated(t, path, false)
	c2.send(`{"execute":"x-emit","arguments":{"name":"EV","count":1}}`)
	if ev := decode(t, c2.next()); ev["event"] != "EV" {
		t.Fatalf("want event first, got %v", ev)
	}
	c2.expect(`{"return": {}}`)
	c.quiet()
	c.send(`{"execute":"qmp_capabilities","arguments":{"enable":[]}}`)
	c.expect(`{"return": {}}`)
	c.send(`{"execute":"query-commands"}`)
	m = decode(t, c.next())
	names := map[string]bool{}
	for _, e := range m["return"].([]any) {
		names[e.(map[string]any)["name"].(string)] = true
	}
	for _, n := range []string{"qmp_capabilities", "query-version", "query-commands", "quit", "x-echo"} {
		if !names[n] {
			t.Errorf("query-commands lacks %s", n)
		}
	}
	// exec-oob without oob enabled.
	c.send(`{"exec-oob":"query-version","id":1}`)
	c.expect(`{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}`)
}

func TestEvents(t *testing.T) {
	s, path := startServer(t)
	a := negotiated(t, path, false)
	b := negotiated(t, path, true)
	pending := dial(t, path)
	pending.expect(greeting)
	s.Emit("NO_DATA", nil)
	s.Emit("WITH_DATA", struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}{"j", "running"})
	for _, c := range []*client{a, b} {
		ev := decode(t, c.next())
		ts := ev["timestamp"].(map[string]any)
		if ev["event"] != "NO_DATA" || ev["data"] != nil || ts["seconds"] == nil || ts["microseconds"] == nil {
			t.Fatalf("bad event %v", ev)
		}
		raw := c.next()
		if !bytes.HasPrefix(raw, []byte(`{"timestamp": {"seconds": `)) || !bytes.HasSuffix(raw, []byte(`, "event": "WITH_DATA", "data": {"status": "running", "id": "j"}}`)) {
			t.Fatalf("bad event %s", raw)
		}
	}
	pending.quiet()
}

func TestPretty(t *testing.T) {
	_, path := startServer(t, Pretty(true))
	c := dial(t, path)
	c.expect("{\r\n    \"QMP\": {\r\n        \"version\": {\r\n            \"qemu\": {\r\n                \"micro\": 22,\r\n                \"minor\": 2,\r\n                \"major\": 7\r\n            },\r\n            \"package\": \"blockd-test\"\r\n        },\r\n        \"capabilities\": [\r\n            \"oob\"\r\n        ]\r\n    }\r\n}")
	c.send(`{"execute":"qmp_capabilities"}`)
	c.expect("{\r\n    \"return\": {\r\n    }\r\n}")
}

// Monitors run concurrently: a slow command on one does not hold up another.
func TestMonitorsConcurrent(t *testing.T) {
	_, path := startServer(t)
	slow := negotiated(t, path, false)
	fast := negotiated(t, path, false)
	slow.send(`{"execute":"x-sleep","arguments":{"name":"s","count":2000}}`)
	time.Sleep(20 * time.Millisecond)
	start := time.Now()
	fast.send(`{"execute":"x-echo","arguments":{"name":"f"}}`)
	fast.expect(`{"return": {"name": "f"}}`)
	if d := time.Since(start); d > time.Second {
		t.Fatalf("fast monitor waited %v", d)
	}
	// In-band commands of one monitor run in order.
	slow.send(`{"execute":"x-echo","arguments":{"name":"after"}}`)
	slow.expect(`{"return": {"slept": "s"}}`)
	slow.expect(`{"return": {"name": "after"}}`)
}

// With oob enabled an exec-oob error overtakes a running in-band command.
func TestOOBOvertakes(t *testing.T) {
	_, path := startServer(t)
	c := negotiated(t, path, true)
	c.send(`{"execute":"x-sleep","arguments":{"name":"s","count":300},"id":1}{"exec-oob":"x-echo","id":2}`)
	c.expect(`{"id": 2, "error": {"class": "GenericError", "desc": "The command x-echo does not support OOB"}}`)
	c.expect(`{"return": {"slept": "s"}, "id": 1}`)
}

func TestManyMonitors(t *testing.T) {
	_, path := startServer(t)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			conn, err := net.Dial("unix", path)
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			fmt.Fprintf(conn, `{"execute":"qmp_capabilities"}`)
			for j := 0; j < 20; j++ {
				fmt.Fprintf(conn, `{"execute":"x-echo","arguments":{"name":"m%d","count":%d}}`, i, j)
			}
			conn.(*net.UnixConn).CloseWrite()
			var all bytes.Buffer
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := all.ReadFrom(conn); err != nil {
				t.Error(err)
			}
			lines := strings.Split(strings.TrimSuffix(all.String(), "\r\n"), "\r\n")
			if len(lines) != 22 {
				t.Errorf("monitor %d: %d lines", i, len(lines))
				return
			}
			for j := 0; j < 20; j++ {
				want := fmt.Sprintf(`{"return": {"name": "m%d", "count": %d}}`, i, j)
				if j == 0 {
					want = fmt.Sprintf(`{"return": {"name": "m%d"}}`, i)
				}
				if lines[j+2] != want {
					t.Errorf("monitor %d: line %d: %s", i, j, lines[j+2])
				}
			}
		}(i)
	}
	wg.Wait()
}

// Bad input never kills the server; the monitor keeps answering.
func TestBadInput(t *testing.T) {
	_, path := startServer(t)
	c := negotiated(t, path, false)
	ok := `{"execute":"x-echo","arguments":{"name":"ok"}}`

	// Garbage: every stray byte sequence gets an error, then we recover.
	c.send("garbage\xff\xfe@#\n\"\xc3\x28\" ABC\n01\n'x\\q'\n{1:2} \x01")
	for _, want := range []string{
		"JSON parse error, invalid keyword 'garbage'",
		"JSON parse error, stray '\uFFFD'",
		"JSON parse error, stray '\uFFFD'",
		"JSON parse error, invalid UTF-8 sequence in string",
		"JSON parse error, stray 'A'",
		"JSON parse error, stray '01'",
		"JSON parse error, invalid escape sequence in string",
		"JSON parse error, key is not a string in object",
		"JSON parse error, stray '\u0001'",
	} {
		m := decode(t, c.next())
		e, _ := m["error"].(map[string]any)
		if e == nil || e["desc"] != want {
			t.Fatalf("want %q, got %v", want, m)
		}
	}
	c.send(ok)
	c.expect(`{"return": {"name": "ok"}}`)

	// Deep nesting: the limit is 1024.
	c.send(strings.Repeat("[", 1025))
	c.expect(`{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}`)
	c.send(strings.Repeat("]", 1025) + "\n")
	for i := 0; i < 1025; i++ {
		c.expect(`{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}`)
	}
	c.send(strings.Repeat("[", 1024) + strings.Repeat("]", 1024))
	c.expect(`{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}`)
	c.send(ok)
	c.expect(`{"return": {"name": "ok"}}`)

	// A huge token is cut off at 64 MiB.
	big := bytes.Repeat([]byte("a"), 1<<20)
	c.send(`{"execute":"x-echo","arguments":{"name":"`)
	for i := 0; i < 65; i++ {
		c.send(string(big))
	}
	c.expect(`{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}`)
	// The rest of the string is lexed as keywords; a control character
	// resets the parser.
	c.send("\x01")
	for {
		m := c.next()
		if bytes.Contains(m, []byte(`stray '\u0001'`)) {
			break
		}
	}
	c.send(ok)
	c.expect(`{"return": {"name": "ok"}}`)

	// Many tokens: the limit is 2M.
	// "[" and 2M more tokens.
	c.send("[")
	chunk := []byte(strings.Repeat("1,", 1<<16))
	for i := 0; i < 16; i++ {
		c.send(string(chunk))
	}
	c.expect(`{"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}}`)
	c.send("\x01")
	for {
		if m := c.next(); bytes.Contains(m, []byte(`stray '\u0001'`)) {
			break
		}
	}
	c.send(ok)
	c.expect(`{"return": {"name": "ok"}}`)
}

// A client that sends and half-closes still gets its replies, then EOF.
func TestHalfClose(t *testing.T) {
	_, path := startServer(t)
	c := dial(t, path)
	c.expect(greeting)
	c.send(`{"execute":"qmp_capabilities"}{"execute":"x-sleep","arguments":{"name":"z","count":100}}{"execute":"x-echo","arguments":{"name":"partial"`)
	c.conn.(*net.UnixConn).CloseWrite()
	c.expect(`{"return": {}}`)
	c.expect(`{"return": {"slept": "z"}}`)
	if m := c.next(); m != nil {
		t.Fatalf("want EOF, got %s", m)
	}
	// The server still answers others.
	d := negotiated(t, path, false)
	d.send(`{"execute":"query-version"}`)
	d.expect(`{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd-test"}}`)
}

// A client that disconnects in the middle of a command.
func TestAbruptClose(t *testing.T) {
	_, path := startServer(t)
	for i := 0; i < 10; i++ {
		c := negotiated(t, path, true)
		c.send(`{"execute":"x-sleep","arguments":{"name":"z","count":10000}}{"execute":"x-echo","arguments":{"name":"a"}}`)
		c.conn.Close()
	}
	d := negotiated(t, path, false)
	d.send(`{"execute":"x-echo","arguments":{"name":"b"}}`)
	d.expect(`{"return": {"name": "b"}}`)
}

// A monitor that never reads is dropped instead of blocking events for others.
func TestSlowReaderDropped(t *testing.T) {
	s, path := startServer(t)
	lazy := negotiated(t, path, false)
	lazy.conn.(*net.UnixConn).SetReadBuffer(4096)
	busy := negotiated(t, path, false)
	// Stop consuming lazy's messages: take its reader off the socket by
	// sending far more than socket buffers hold.
	payload := strings.Repeat("x", 4000)
	monitors := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.monitors)
	}
	start := time.Now()
	for n := 0; monitors() == 2; n++ {
		if time.Since(start) > 20*time.Second {
			t.Fatal("the monitor that does not read was not dropped")
		}
		s.Emit("FLOOD", map[string]any{"p": payload})
		if n%100 == 0 {
			// busy still gets everything promptly.
			for len(busy.msgs) > 0 {
				<-busy.msgs
			}
		}
	}
	for lazy.next() != nil {
	}
	// busy answers commands.
	for len(busy.msgs) > 0 {
		<-busy.msgs
	}
	busy.send(`{"execute":"x-echo","arguments":{"name":"alive","count":1}}`)
	for {
		m := busy.next()
		if bytes.HasPrefix(m, []byte(`{"return"`)) {
			if string(m) != `{"return": {"name": "alive", "count": 1}}` {
				t.Fatal(string(m))
			}
			break
		}
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/s"
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	if _, err := ListenUnix(path); err == nil {
		t.Error("second listener on a live socket succeeded")
	}
	l.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("socket not removed: %v", err)
	}
	// A stale socket is replaced.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err = ListenUnix(path)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	l.Close()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(path); err == nil {
		t.Error("replaced a regular file")
	}
}

func TestQuit(t *testing.T) {
	s, path := startServer(t)
	quit := make(chan struct{})
	s.SetQuit(func() { close(quit) })
	c := negotiated(t, path, false)
	c.send(`{"execute":"quit","id":"q"}`)
	c.expect(`{"return": {}, "id": "q"}`)
	select {
	case <-quit:
	case <-time.After(5 * time.Second):
		t.Fatal("quit callback not called")
	}
}

func TestTCP(t *testing.T) {
	s := NewServer(nil, testVersion)
	l, err := ListenTCP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(buf)
	if err != nil || !bytes.HasPrefix(buf[:n], []byte(`{"QMP"`)) {
		t.Fatalf("%q %v", buf[:n], err)
	}
}

// Clients beyond MaxMonitors wait in the backlog until a monitor goes away.
func TestMonitorLimit(t *testing.T) {
	_, path := startServer(t)
	var cs []*client
	for i := 0; i < MaxMonitors; i++ {
		c := dial(t, path)
		c.expect(greeting)
		cs = append(cs, c)
	}
	extra := dial(t, path)
	extra.quiet()
	cs[0].conn.Close()
	extra.expect(greeting)
}
