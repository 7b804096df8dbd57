package qmp

import (
	"bytes"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// startQSD runs qemu-storage-daemon with a QMP monitor and returns the
// socket path. It skips when the daemon is missing, except under CI=true.
func startQSD(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("qemu-storage-daemon is missing")
		}
		t.Skip("qemu-storage-daemon not installed")
	}
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	cmd := exec.Command(bin, "--chardev", "socket,id=m,path="+sock+",server=on,wait=off", "--monitor", "chardev=m")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatal("qemu-storage-daemon did not create its socket")
	return ""
}

// syncConn sends an input, then a reset and a marker request, and returns
// every message up to the marker's reply.
type syncConn struct {
	t    *testing.T
	conn net.Conn
	buf  []byte
	n    int
}

func newSyncConn(t *testing.T, path string) (*syncConn, []byte) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &syncConn{t: t, conn: conn}
	return c, c.line()
}

func (c *syncConn) line() []byte {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	tmp := make([]byte, 65536)
	for {
		if i := bytes.Index(c.buf, []byte("\r\n")); i >= 0 {
			l := append([]byte(nil), c.buf[:i]...)
			c.buf = c.buf[i+2:]
			return l
		}
		n, err := c.conn.Read(tmp)
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		c.buf = append(c.buf, tmp[:n]...)
	}
}

func (c *syncConn) roundTrip(in []byte) [][]byte {
	c.t.Helper()
	c.n++
	marker := fmt.Sprintf(`"sync-%d"`, c.n)
	msg := append(append([]byte(nil), in...), []byte("\x01{\"execute\":\"x-sync\",\"id\":"+marker+"}")...)
	if _, err := c.conn.Write(msg); err != nil {
		c.t.Fatal(err)
	}
	var out [][]byte
	for {
		l := c.line()
		if bytes.Contains(l, []byte(`"id": `+marker)) {
			return out
		}
		out = append(out, l)
	}
}

var corpus = []string{
	`{"execute": }`, `{"a":1,"a":2}`, `[1,2]`, `{"id":4}`, `{"execute":5}`, `{}`, `{"execute":"query-version"}`,
	`"abc"`, `'abc'`, `'a"b'`, `"a\'b"`, `"\u0000"`, `"\u00e9"`, `"\ud800"`, `"\ud800\u0041"`, `"\udc00"`, `"\uD83D\uDE00"`,
	`"\u12"`, `"\u1"`, `"\uzzzz"`, `"\x"`, "\"\xc0\x80\"", "\"\xed\xa0\x80\"", "\"\xef\xbf\xbe\"", "\"\xf4\x90\x80\x80\"", "\"\xe2\x82\"",
	"\"\xc3\xa9\"", "\"\xff\"", "\xff", "\xfe", "\x00", "\"ab\x00cd\"", "\"ab\x01", "\t", `nul`, `nul1`, `truex`, `True`, `-`, `-a`, `01`, `1.`,
	`1.5e`, `1e+`, `1.5E-3`, `-0`, `0.0`, `1e999`, `18446744073709551616`, `-9223372036854775809`, `{"id": 1.0, "execute":"x"}`,
	`{"id": [1, {"b": null}], "execute":"x"}`, `{1:2}`, `{"a" 1}`, `{"a":1 "b":2}`, `[1 2]`, `[,]`, `[1,]`, `{"a":1,}`, `{,}`, `]`, `}`,
	`[}`, `{]`, `{"a":[}]`, `{{}:1}`, `{[]:1}`, `{"a":{"b":}}`, `:`, `,`, `{"execute":"x","arguments":[]}`, `{"execute":"x","exec-oob":"y"}`,
	`{"exec-oob":"x"}`, `{"bogus":1,"execute":2}`, `{"arguments":1,"execute":2}`, `{"id":1,"arguments":{}}`, `{"execute":"x","id":{"z":1,"a":2,"m":[]}}`,
	"{\"execute\":\"x\",\n\"id\":\r\n7}", `garbage`, `@#$`, `{"a":"b"}garbage{"c":1}`, `[[[[]]]]`, `[[[[`, `}}}}`,
}

// The parser and the request checks against the real thing, byte for byte.
func TestParserAgainstQSD(t *testing.T) {
	qsd := startQSD(t)
	qc, qgreet := newSyncConn(t, qsd)
	m := decode(t, qgreet)
	ver := m["QMP"].(map[string]any)["version"].(map[string]any)
	s := NewServer(nil, Version{Qemu: VersionTriple{7, 2, 22}, Package: ver["package"].(string)})
	path := filepath.Join(t.TempDir(), "b.sock")
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	bc, bgreet := newSyncConn(t, path)
	if !bytes.Equal(qgreet, bgreet) {
		t.Fatalf("greeting\nqsd:    %s\nblockd: %s", qgreet, bgreet)
	}
	check := func(in []byte) {
		t.Helper()
		q, b := qc.roundTrip(in), bc.roundTrip(in)
		if len(q) != len(b) {
			t.Fatalf("input %q\nqsd:    %q\nblockd: %q", in, q, b)
		}
		for i := range q {
			if !bytes.Equal(q[i], b[i]) {
				t.Fatalf("input %q\nqsd:    %s\nblockd: %s", in, q[i], b[i])
			}
		}
	}
	for _, phase := range []string{"negotiating", "negotiated"} {
		for _, in := range corpus {
			check([]byte(in))
		}
		if phase == "negotiating" {
			check([]byte(`{"execute":"qmp_capabilities"}`))
		}
	}
	// Random inputs from an alphabet of JSON fragments.
	alphabet := []string{"{", "}", "[", "]", ",", ":", `"`, "'", `\`, "u", "0", "1", "9", "-", "+", ".", "e", "E",
		"a", "n", "u", "l", "t", "r", "f", "x", "A", "\x00", "\x01", "\xff", "\xc3", "\xa9", " ", "\n", "\t",
		`"execute"`, `"id"`, `"arguments"`, `"exec-oob"`, `"query-version"`, `"x"`, `null`, `true`, `12`, `'k'`, `\u00`, "d8", "dc"}
	rng := rand.New(rand.NewSource(seed()))
	n := 1500
	if v := os.Getenv("QMP_DIFF_N"); v != "" {
		fmt.Sscan(v, &n)
	}
	if testing.Short() {
		n = 200
	}
	for i := 0; i < n; i++ {
		var in []byte
		for k := rng.Intn(24); k >= 0; k-- {
			in = append(in, alphabet[rng.Intn(len(alphabet))]...)
		}
		check(in)
	}
}

func seed() int64 {
	var s int64 = 1
	if v := os.Getenv("QMP_DIFF_SEED"); v != "" {
		fmt.Sscan(v, &s)
	}
	return s
}
