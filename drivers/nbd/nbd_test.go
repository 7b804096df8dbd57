package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/drivers/file"
	"blockd/graph"
	"blockd/internal/qapi"
	nbdserver "blockd/nbd"
)

const mib = 1 << 20

func init() {
	// Reconnect quickly in tests.
	backoffFirst = 50 * time.Millisecond
	backoffMax = 200 * time.Millisecond
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/251)
	}
	return b
}

// blockdServer is blockd's own NBD server exporting a file node.
type blockdServer struct {
	sock  string
	path  string // the file behind the export
	srv   *nbdserver.Server
	g     *graph.Graph
	file  *graph.Child
	l     net.Listener
	done  chan error
	ro    bool
	node  graph.Node // the exported node (file, or a wrapper)
	exMin uint32
}

func newBlockdServer(t *testing.T, size int64, ro bool) *blockdServer {
	t.Helper()
	dir := t.TempDir()
	s := &blockdServer{sock: filepath.Join(dir, "nbd.sock"), path: filepath.Join(dir, "disk.img"), ro: ro}
	if err := os.WriteFile(s.path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(s.path, size); err != nil {
		t.Fatal(err)
	}
	s.g = graph.New(nil, file.Driver())
	b, err := s.g.Add(context.Background(), map[string]any{"driver": "file", "filename": s.path, "node-name": "f"}, false)
	if err != nil {
		t.Fatal(err)
	}
	if s.file, err = s.g.NewBackend(b.Name(), "export", graph.PermRead|graph.PermWrite, graph.PermAll); err != nil {
		t.Fatal(err)
	}
	s.node = s.file
	t.Cleanup(func() { s.stop(); s.g.ReleaseBackend(s.file); s.g.Close() })
	s.start(t)
	return s
}

func (s *blockdServer) start(t *testing.T) {
	t.Helper()
	l := logrus.New()
	l.SetOutput(nopWriter{})
	s.srv = nbdserver.NewServer(nbdserver.Options{Log: logrus.NewEntry(l)})
	if err := s.srv.AddExport(&nbdserver.Export{Name: "disk", Node: s.node, ReadOnly: s.ro, MinBlock: s.exMin}); err != nil {
		t.Fatal(err)
	}
	os.Remove(s.sock)
	ln, err := net.Listen("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	s.l = ln
	s.done = make(chan error, 1)
	go func() { s.done <- s.srv.Serve(ln) }()
}

func (s *blockdServer) stop() {
	if s.srv == nil {
		return
	}
	s.srv.Close()
	<-s.done
	s.srv = nil
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

// openNBD opens an nbd node in a fresh graph and returns a writable edge
// to it.
func openNBD(t testing.TB, opts map[string]any) *edge {
	t.Helper()
	c, err := tryOpen(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// edge is a test's user of an nbd node; Close closes the node's graph.
type edge struct {
	*graph.Child
	g *graph.Graph
}

func (e *edge) Close() error {
	e.g.ReleaseBackend(e.Child)
	e.g.Close()
	return nil
}

func tryOpen(opts map[string]any) (*edge, error) {
	g := graph.New(nil, Driver())
	tree := map[string]any{"driver": "nbd", "node-name": "n"}
	for k, v := range opts {
		tree[k] = v
	}
	b, err := g.Add(context.Background(), tree, false)
	if err != nil {
		return nil, err
	}
	perm := graph.PermRead | graph.PermWrite
	if b.ReadOnly() {
		perm = graph.PermRead
	}
	c, err := g.NewBackend(b.Name(), "test", perm, graph.PermAll)
	if err != nil {
		g.Close()
		return nil, err
	}
	return &edge{Child: c, g: g}, nil
}

func unixServer(sock, export string) map[string]any {
	return map[string]any{"server": map[string]any{"type": "unix", "path": sock}, "export": export}
}

// roundTrip writes, reads, zeroes, trims and flushes through c and checks
// each step with read, the peer's view of [0, size).
func roundTrip(t *testing.T, c *edge, read func() []byte) {
	t.Helper()
	ctx := context.Background()
	size := c.Size()
	want := make([]byte, size)
	check := func(step string) {
		t.Helper()
		got := make([]byte, size)
		if err := c.ReadAt(ctx, got, 0); err != nil {
			t.Fatalf("%s: read: %v", step, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: the node reads other data than written", step)
		}
		if peer := read(); !bytes.Equal(peer[:size], want) {
			t.Fatalf("%s: the server holds other data than the node wrote", step)
		}
	}
	if err := c.WriteZeroes(ctx, 0, size, 0); err != nil {
		t.Fatal(err)
	}
	check("zero all")
	p := pattern(3*mib, 1)
	if err := c.WriteAt(ctx, p, mib, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[mib:], p)
	check("write")
	if err := c.WriteAt(ctx, p[:4096], 8*mib, graph.FUA); err != nil {
		t.Fatal(err)
	}
	copy(want[8*mib:], p[:4096])
	check("write fua")
	if err := c.WriteZeroes(ctx, mib+65536, 65536, 0); err != nil {
		t.Fatal(err)
	}
	clear(want[mib+65536 : mib+131072])
	check("zero")
	if err := c.WriteZeroes(ctx, 2*mib, mib, graph.MayUnmap); err != nil {
		t.Fatal(err)
	}
	clear(want[2*mib : 3*mib])
	check("zero unmap")
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	ext, err := c.BlockStatus(ctx, mib, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if ext[0].Flags&graph.ExtentZero != 0 {
		t.Fatalf("block status of written data: %+v", ext)
	}
	// Trim: the data may go; what the node reads must be what the
	// server holds.
	if err := c.Discard(ctx, 3*mib, mib); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, mib)
	if err := c.ReadAt(ctx, got, 3*mib); err != nil {
		t.Fatal(err)
	}
	copy(want[3*mib:], got)
	check("trim")
}

func TestRoundTripBlockdServer(t *testing.T) {
	s := newBlockdServer(t, 16*mib, false)
	c := openNBD(t, unixServer(s.sock, "disk"))
	defer c.Close()
	if c.Size() != 16*mib {
		t.Fatalf("size %d", c.Size())
	}
	roundTrip(t, c, func() []byte {
		b, err := os.ReadFile(s.path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	})
	// Block status compared with the file node's.
	ctx := context.Background()
	for off := int64(0); off < 16*mib; {
		want, err := s.file.BlockStatus(ctx, off, 16*mib-off)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.BlockStatus(ctx, off, 16*mib-off)
		if err != nil {
			t.Fatal(err)
		}
		if got[0].Length != want[0].Length || got[0].Flags&graph.ExtentZero != want[0].Flags&graph.ExtentZero {
			t.Fatalf("block status at %d: %+v, the file says %+v", off, got[0], want[0])
		}
		off += got[0].Length
	}
}

func TestParallelRequests(t *testing.T) {
	s := newBlockdServer(t, 8*mib, false)
	c := openNBD(t, unixServer(s.sock, "disk"))
	defer c.Close()
	ctx := context.Background()
	// 64 goroutines, each on its own 128 KiB region, 16 requests in
	// flight at most on the connection.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			base := int64(g) * 131072
			model := make([]byte, 131072)
			for range 50 {
				off := int64(r.IntN(32)) * 4096
				n := int64(1+r.IntN(4)) * 4096
				n = min(n, 131072-off)
				if r.IntN(2) == 0 {
					p := pattern(int(n), byte(r.Uint32()))
					if err := c.WriteAt(ctx, p, base+off, 0); err != nil {
						errs <- err
						return
					}
					copy(model[off:], p)
				} else {
					p := make([]byte, n)
					if err := c.ReadAt(ctx, p, base+off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(p, model[off:off+n]) {
						errs <- fmt.Errorf("goroutine %d: read at %d returned other data", g, off)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestBlockSizeLimits(t *testing.T) {
	s := newBlockdServer(t, 4*mib, false)
	s.stop()
	s.exMin = 4096
	s.start(t)
	c := openNBD(t, unixServer(s.sock, "disk"))
	defer c.Close()
	if l := c.Limits(); l.Align != 4096 || l.MaxTransfer != 32*mib {
		t.Fatalf("limits %+v, want align 4096 and max transfer 32 MiB", l)
	}
	// An unaligned write goes through the graph's read-modify-write.
	ctx := context.Background()
	if err := c.WriteAt(ctx, []byte("hello"), 4097, 0); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(s.path)
	if string(b[4097:4102]) != "hello" {
		t.Fatal("unaligned write did not reach the server")
	}
}

func TestReadOnlyExport(t *testing.T) {
	s := newBlockdServer(t, mib, true)
	_, err := tryOpen(unixServer(s.sock, "disk"))
	if err == nil || err.Error() != "NBD export is read-only" {
		t.Fatalf("opening a read-only export read-write: %v, want QEMU's 'NBD export is read-only'", err)
	}
	opts := unixServer(s.sock, "disk")
	opts["auto-read-only"] = true
	c := openNBD(t, opts)
	defer c.Close()
	if !c.BDS().ReadOnly() {
		t.Fatal("auto-read-only did not make the node read-only")
	}
	opts = unixServer(s.sock, "disk")
	opts["read-only"] = true
	c2 := openNBD(t, opts)
	defer c2.Close()
	if err := c2.ReadAt(context.Background(), make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
}

func TestOpenErrors(t *testing.T) {
	s := newBlockdServer(t, mib, false)
	for _, tc := range []struct {
		opts map[string]any
		want string
	}{
		{unixServer(s.sock, "nosuch"), "Requested export not available"},
		{map[string]any{"server": map[string]any{"type": "unix", "path": s.sock}, "export": "disk", "x-dirty-bitmap": "b"}, "x-dirty-bitmap is not supported by blockd"},
		{map[string]any{"server": map[string]any{"type": "unix", "path": s.sock}, "export": "disk", "tls-creds": "t"}, "No TLS credentials with id 't'"},
		{map[string]any{"export": "disk"}, "Parameter 'server' is missing"},
		{map[string]any{"server": map[string]any{"type": "unix"}}, "Parameter 'server.path' is missing"},
		{map[string]any{"server": map[string]any{"type": "unix", "path": s.sock + "x"}}, "Failed to connect to '" + s.sock + "x': No such file or directory"},
		{map[string]any{"server": map[string]any{"type": "unix", "path": s.sock}, "export": strings.Repeat("x", 4097)}, "export name too long to send to server"},
		{map[string]any{"server": map[string]any{"type": "unix", "path": s.sock}, "bogus": 1}, "Parameter 'bogus' is unexpected"},
	} {
		_, err := tryOpen(tc.opts)
		if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.opts, err, tc.want)
		}
	}
}

func TestFilename(t *testing.T) {
	s := newBlockdServer(t, mib, false)
	c := openNBD(t, unixServer(s.sock, "disk"))
	defer c.Close()
	if got, want := c.BDS().Filename(), "nbd+unix:///disk?socket="+s.sock; got != want {
		t.Fatalf("filename %q, want %q", got, want)
	}
	for _, tc := range []struct {
		sa     SocketAddress
		export *string
		want   string
	}{
		{SocketAddress{Type: "inet", Inet: &qapi.InetSocketAddress{Host: "example.org", Port: "10809"}}, ptr("exp"), "nbd://example.org:10809/exp"},
		{SocketAddress{Type: "inet", Inet: &qapi.InetSocketAddress{Host: "h", Port: "1"}}, nil, "nbd://h:1"},
		{SocketAddress{Type: "inet", Inet: &qapi.InetSocketAddress{Host: "h", Port: "1", IPv4: ptr(true)}}, nil, ""},
		{SocketAddress{Type: "unix", Unix: &qapi.UnixSocketAddress{Path: "/s"}}, nil, "nbd+unix://?socket=/s"},
		{SocketAddress{Type: "unix", Unix: &qapi.UnixSocketAddress{Path: "/s"}}, ptr(""), "nbd+unix:///?socket=/s"},
	} {
		if got := filename(&tc.sa, tc.export); got != tc.want {
			t.Errorf("filename %q, want %q", got, tc.want)
		}
	}
}

func ptr[T any](v T) *T { return &v }

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		uri  string
		want string // fmt of the options, "" for an error
	}{
		{"nbd://localhost/disk", "map[driver:nbd export:disk server:map[host:localhost port:10809 type:inet]]"},
		{"nbd+tcp://h:1234", "map[driver:nbd server:map[host:h port:1234 type:inet]]"},
		{"nbd+unix:///e?socket=/tmp/s", "map[driver:nbd export:e server:map[path:/tmp/s type:unix]]"},
		{"nbd+unix:///e", ""},
		{"nbd+unix://h/e?socket=/s", ""},
		{"nbd://h/e?socket=/s", ""},
		{"nbd:///e", ""},
		{"http://h/e", ""},
	} {
		got, err := ParseURI(tc.uri)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("%s: %v, want an error", tc.uri, got)
		case tc.want == "" && err.Error() != "No valid URL specified":
			t.Errorf("%s: %v", tc.uri, err)
		case tc.want != "" && (err != nil || fmt.Sprint(got) != tc.want):
			t.Errorf("%s: %v %v, want %s", tc.uri, got, err, tc.want)
		}
	}
}

// proxy forwards unix connections to a server; cut drops every
// connection and refuses new ones until restore.
type proxy struct {
	sock, target string
	l            net.Listener
	mu           sync.Mutex
	down         bool
	conns        []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	p := &proxy{sock: filepath.Join(t.TempDir(), "proxy.sock"), target: target}
	l, err := net.Listen("unix", p.sock)
	if err != nil {
		t.Fatal(err)
	}
	p.l = l
	t.Cleanup(func() { l.Close(); p.cut() })
	go func() {
		for {
			a, err := l.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			if p.down {
				p.mu.Unlock()
				a.Close()
				continue
			}
			b, err := net.Dial("unix", p.target)
			if err != nil {
				p.mu.Unlock()
				a.Close()
				continue
			}
			p.conns = append(p.conns, a, b)
			p.mu.Unlock()
			go func() { copyConn(a, b) }()
			go func() { copyConn(b, a) }()
		}
	}()
	return p
}

func copyConn(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// gateNode holds reads until released, so that a request can be caught in
// flight.
type gateNode struct {
	graph.Node
	mu      sync.Mutex
	gate    chan struct{}
	entered chan struct{}
}

func (g *gateNode) ReadAt(ctx context.Context, p []byte, off int64) error {
	g.mu.Lock()
	gate, entered := g.gate, g.entered
	g.mu.Unlock()
	if gate != nil {
		select {
		case entered <- struct{}{}:
		default:
		}
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.Node.ReadAt(ctx, p, off)
}

func TestReconnectResendsInFlight(t *testing.T) {
	s := newBlockdServer(t, mib, false)
	if err := os.WriteFile(s.path, pattern(mib, 3), 0o644); err != nil {
		t.Fatal(err)
	}
	gate := &gateNode{Node: s.file, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	s.stop()
	s.node = gate
	s.start(t)
	p := newProxy(t, s.sock)
	opts := unixServer(p.sock, "disk")
	opts["reconnect-delay"] = json.Number("10")
	c := openNBD(t, opts)
	defer c.Close()

	ctx := context.Background()
	res := make(chan error, 1)
	buf := make([]byte, 4096)
	go func() { res <- c.ReadAt(ctx, buf, 8192) }()
	<-gate.entered // the read is in flight on the server
	p.cut()
	// The request is not acknowledged; issue another during the outage.
	res2 := make(chan error, 1)
	go func() { res2 <- c.WriteAt(ctx, []byte("during outage..."), 0, 0) }()
	gate.mu.Lock()
	close(gate.gate)
	gate.gate = nil
	gate.mu.Unlock()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-res:
		t.Fatalf("the read returned during the outage: %v", err)
	default:
	}
	p.restore()
	for _, ch := range []chan error{res, res2} {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("request across the reconnection: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("request did not complete after the reconnection")
		}
	}
	if !bytes.Equal(buf, pattern(mib, 3)[8192:8192+4096]) {
		t.Fatal("the resent read returned other data")
	}
	b, _ := os.ReadFile(s.path)
	if string(b[:16]) != "during outage..." {
		t.Fatal("the write issued during the outage did not reach the server")
	}
}

func TestReconnectDelayExpires(t *testing.T) {
	s := newBlockdServer(t, mib, false)
	p := newProxy(t, s.sock)
	for _, delay := range []int{0, 1} {
		opts := unixServer(p.sock, "disk")
		opts["reconnect-delay"] = json.Number(fmt.Sprint(delay))
		p.restore()
		c := openNBD(t, opts)
		p.cut()
		start := time.Now()
		err := c.ReadAt(context.Background(), make([]byte, 512), 0)
		el := time.Since(start)
		if graph.Errno(err) != syscall.EIO {
			t.Fatalf("delay %d: read during the outage: %v, want EIO", delay, err)
		}
		if want := time.Duration(delay) * time.Second; el < want || el > want+2*time.Second {
			t.Fatalf("delay %d: the read failed after %v", delay, el)
		}
		// Requests work again once the server is back (the node
		// reconnects in the background, as QEMU does).
		p.restore()
		deadline := time.Now().Add(5 * time.Second)
		for {
			err = c.ReadAt(context.Background(), make([]byte, 512), 0)
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("delay %d: no reconnection after the server came back: %v", delay, err)
		}
		c.Close()
	}
}

func TestOpenTimeout(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "late.sock")
	opts := unixServer(sock, "disk")
	opts["open-timeout"] = json.Number("5")
	s := newBlockdServer(t, mib, false)
	s.stop()
	s.sock = sock
	go func() {
		time.Sleep(300 * time.Millisecond)
		s.start(t)
	}()
	c := openNBD(t, opts)
	c.Close()
	// Without open-timeout, a single attempt.
	s.stop()
	start := time.Now()
	if _, err := tryOpen(unixServer(sock, "disk")); err == nil || time.Since(start) > time.Second {
		t.Fatalf("open without a server: %v after %v", err, time.Since(start))
	}
}

func TestCloseDuringOutage(t *testing.T) {
	s := newBlockdServer(t, mib, false)
	p := newProxy(t, s.sock)
	opts := unixServer(p.sock, "disk")
	opts["reconnect-delay"] = json.Number("30")
	c := openNBD(t, opts)
	p.cut()
	res := make(chan error, 1)
	go func() { res <- c.ReadAt(context.Background(), make([]byte, 512), 0) }()
	time.Sleep(100 * time.Millisecond)
	done := make(chan struct{})
	n := c.BDS().Node()
	go func() { n.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung during an outage")
	}
	if err := <-res; err == nil {
		t.Fatal("a request waiting for the reconnection succeeded after Close")
	}
	c.Close()
}
