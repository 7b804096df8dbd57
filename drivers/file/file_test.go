package file

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

// Helpers shared by the tests of this package.

func newGraph() *graph.Graph { return graph.New(nil, Driver(), HostDeviceDriver()) }

// tree decodes a JSON BlockdevOptions the way the QMP parser does.
func tree(t testing.TB, s string, a ...any) map[string]any {
	t.Helper()
	if len(a) > 0 {
		s = fmt.Sprintf(s, a...)
	}
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v map[string]any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("bad test JSON %s: %v", s, err)
	}
	return v
}

// q quotes a string for JSON.
func q(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// mkfile creates a file of the given size filled with a byte pattern.
func mkfile(t testing.TB, size int64) (string, []byte) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{byte(size)}).Read(data)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, data
}

// addNode opens a node from JSON options and closes the graph at the end.
func addNode(t testing.TB, g *graph.Graph, opts string, a ...any) *graph.BDS {
	t.Helper()
	b, err := g.Add(context.Background(), tree(t, opts, a...), false)
	if err != nil {
		t.Fatalf("blockdev-add %s: %v", fmt.Sprintf(opts, a...), err)
	}
	return b
}

func fileNode(b *graph.BDS) *Node { return b.Node().(*Node) }

const rw = graph.PermRead | graph.PermWrite

// attach attaches an outside user that writes and does not share write.
func attach(t testing.TB, g *graph.Graph, name string) *graph.Child {
	t.Helper()
	c, err := g.NewBackend(name, "export", graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatalf("attach %s: %v", name, err)
	}
	t.Cleanup(func() { g.ReleaseBackend(c) })
	return c
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestOpenOptions(t *testing.T) {
	p, _ := mkfile(t, 1<<20)
	dir := t.TempDir()
	for _, tc := range []struct {
		name, opts string
		err        string
	}{
		{"plain", `{"filename":%[1]s}`, ""},
		{"all options", `{"filename":%[1]s,"locking":"on","aio":"threads","aio-max-batch":16,"drop-cache":false,"x-check-cache-dropped":true}`, ""},
		{"locking off", `{"filename":%[1]s,"locking":"off"}`, ""},
		{"locking auto", `{"filename":%[1]s,"locking":"auto"}`, ""},
		{"io_uring", `{"filename":%[1]s,"aio":"io_uring"}`, ""},
		{"native direct", `{"filename":%[1]s,"aio":"native","cache":{"direct":true}}`, ""},
		{"read-only", `{"filename":%[1]s,"read-only":true}`, ""},
		{"auto-read-only", `{"filename":%[1]s,"auto-read-only":true}`, ""},
		{"no-flush", `{"filename":%[1]s,"cache":{"no-flush":true}}`, ""},
		{"discard unmap", `{"filename":%[1]s,"discard":"unmap","detect-zeroes":"unmap"}`, ""},
		{"negative batch", `{"filename":%[1]s,"aio-max-batch":-1}`, ""},

		{"missing filename", `{}`, "Parameter 'filename' is missing"},
		{"filename type", `{"filename":1}`, "Invalid parameter type for 'filename', expected: string"},
		{"bad locking", `{"filename":%[1]s,"locking":"maybe"}`, "Parameter 'locking' does not accept value 'maybe'"},
		{"bad aio", `{"filename":%[1]s,"aio":"posix"}`, "Parameter 'aio' does not accept value 'posix'"},
		{"batch type", `{"filename":%[1]s,"aio-max-batch":"8"}`, "Invalid parameter type for 'aio-max-batch', expected: integer"},
		{"drop-cache type", `{"filename":%[1]s,"drop-cache":"on"}`, "Invalid parameter type for 'drop-cache', expected: boolean"},
		{"unknown", `{"filename":%[1]s,"size":5}`, "Parameter 'size' is unexpected"},
		{"native buffered", `{"filename":%[1]s,"aio":"native"}`, "aio=native was specified, but it requires cache.direct=on, which was not specified."},
		{"pr-manager", `{"filename":%[1]s,"pr-manager":"pr0"}`, "No persistent reservation manager with id 'pr0'"},
		{"missing file", `{"filename":%[2]s}`, "Could not open '" + dir + "/nope': No such file or directory"},
		{"missing file ro", `{"filename":%[2]s,"read-only":true}`, "Could not open '" + dir + "/nope': No such file or directory"},
		{"directory", `{"filename":%[3]s}`, "Could not open '" + dir + "': Is a directory"},
		{"directory ro", `{"filename":%[3]s,"read-only":true}`, "'file' driver requires '" + dir + "' to be a regular file"},
		{"char device", `{"filename":"/dev/null"}`, "'file' driver requires '/dev/null' to be a regular file"},
		{"pr-manager before open", `{"filename":%[2]s,"pr-manager":"x"}`, "No persistent reservation manager with id 'x'"},
		{"open before aio check", `{"filename":%[2]s,"aio":"native"}`, "Could not open '" + dir + "/nope': No such file or directory"},
		{"force-share rw", `{"filename":%[1]s,"force-share":true}`, "force-share=on can only be used with read-only images"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGraph()
			defer g.Close()
			opts := fmt.Sprintf(tc.opts, q(p), q(dir+"/nope"), q(dir))
			v := tree(t, opts)
			v["driver"], v["node-name"] = "file", "n"
			b, err := g.Add(context.Background(), v, false)
			if tc.err == "" {
				if err != nil {
					t.Fatalf("%s: %v", opts, err)
				}
				if b.Node().Size() != 1<<20 {
					t.Fatalf("size %d", b.Node().Size())
				}
				return
			}
			if err == nil || err.Error() != tc.err {
				t.Fatalf("%s: got error %v, want %q", opts, err, tc.err)
			}
		})
	}
}

func TestOpenKeyval(t *testing.T) {
	p, _ := mkfile(t, 4096)
	g := newGraph()
	defer g.Close()
	v := map[string]any{"driver": "file", "node-name": "n", "filename": p, "locking": "off",
		"aio-max-batch": "4", "drop-cache": "off", "cache": map[string]any{"direct": "on"}}
	b, err := g.Add(context.Background(), v, true)
	if err != nil {
		t.Fatal(err)
	}
	n := fileNode(b)
	if !n.direct || n.useLock {
		t.Fatalf("direct=%v useLock=%v", n.direct, n.useLock)
	}
}

// fdFlags returns the open(2) flags of fd as the kernel reports them.
func fdFlags(t *testing.T, fd int) int {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl
}

func TestOpenFlags(t *testing.T) {
	p, _ := mkfile(t, 1<<16)
	for _, tc := range []struct {
		opts   string
		acc    int
		direct bool
	}{
		{`{}`, unix.O_RDWR, false},
		{`{"read-only":true}`, unix.O_RDONLY, false},
		{`{"cache":{"direct":true}}`, unix.O_RDWR, true},
		{`{"read-only":true,"cache":{"direct":true}}`, unix.O_RDONLY, true},
		{`{"auto-read-only":true}`, unix.O_RDONLY, false},
	} {
		g := newGraph()
		v := tree(t, tc.opts)
		v["driver"], v["node-name"], v["filename"] = "file", "n", p
		b, err := g.Add(context.Background(), v, false)
		if err != nil {
			t.Fatal(err)
		}
		fl := fdFlags(t, fileNode(b).fd)
		if fl&unix.O_ACCMODE != tc.acc || (fl&unix.O_DIRECT != 0) != tc.direct {
			t.Errorf("%s: flags %#o", tc.opts, fl)
		}
		g.Close()
	}
}

func TestReadWrite(t *testing.T) {
	ctx := context.Background()
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			p, data := mkfile(t, 1<<20)
			g := newGraph()
			defer g.Close()
			addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":%v}}`, q(p), direct)
			c := attach(t, g, "n")
			buf := make([]byte, 64<<10)
			if err := c.ReadAt(ctx, buf, 4096); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, data[4096:4096+len(buf)]) {
				t.Fatal("read mismatch")
			}
			w := bytes.Repeat([]byte{0xab}, 8192)
			if err := c.WriteAt(ctx, w, 1<<19, graph.FUA); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteAt(ctx, w, 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			copy(data[1<<19:], w)
			copy(data, w)
			if !bytes.Equal(readFile(t, p), data) {
				t.Fatal("file content mismatch after writes")
			}
			// Out of range requests are refused by the graph.
			if err := c.ReadAt(ctx, buf, 1<<20-100); !errors.Is(err, graph.ErrRange) {
				t.Fatalf("read past end: %v", err)
			}
		})
	}
}

// A file whose size is not a multiple of 512 is a node rounded up to whole
// sectors, whose tail reads as zeroes (as in QEMU).
func TestSizeRounding(t *testing.T) {
	ctx := context.Background()
	for _, direct := range []bool{false, true} {
		p, data := mkfile(t, 1000)
		g := newGraph()
		addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":%v}}`, q(p), direct)
		c := attach(t, g, "n")
		if c.Size() != 1024 {
			t.Fatalf("size %d, want 1024", c.Size())
		}
		buf := make([]byte, 1024)
		for i := range buf {
			buf[i] = 0xff
		}
		if err := c.ReadAt(ctx, buf, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:1000], data) || !bytes.Equal(buf[1000:], make([]byte, 24)) {
			t.Fatalf("direct=%v: bad tail read", direct)
		}
		small := make([]byte, 30)
		if err := c.ReadAt(ctx, small, 990); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(small[:10], data[990:]) || !bytes.Equal(small[10:], make([]byte, 20)) {
			t.Fatalf("direct=%v: bad unaligned tail read", direct)
		}
		g.ReleaseBackend(c)
		g.Close()
	}
}

func TestReadOnly(t *testing.T) {
	ctx := context.Background()
	p, _ := mkfile(t, 1<<16)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"read-only":true}`, q(p))
	if _, err := g.NewBackend("n", "export", rw, graph.PermAll); err == nil || err.Error() != "Block node is read-only" {
		t.Fatalf("writable attach to a read-only node: %v", err)
	}
	c, err := g.NewBackend("n", "export", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(c)
	if err := c.WriteAt(ctx, make([]byte, 512), 0, 0); !errors.Is(err, graph.ErrReadOnly) {
		t.Fatalf("write through read-only edge: %v", err)
	}
	// The descriptor itself is read-only.
	if err := b.Node().WriteAt(ctx, make([]byte, 512), 0, 0); !errors.Is(err, unix.EBADF) {
		t.Fatalf("write on O_RDONLY: %v", err)
	}
}

// With auto-read-only the file is open read-only until a writer attaches,
// read-write while it is attached, and read-only again afterwards.
func TestAutoReadOnly(t *testing.T) {
	ctx := context.Background()
	p, _ := mkfile(t, 1<<16)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"auto-read-only":true}`, q(p))
	n := fileNode(b)
	if fdFlags(t, n.fd)&unix.O_ACCMODE != unix.O_RDONLY {
		t.Fatal("auto-read-only node opened read-write")
	}
	r, err := g.NewBackend("n", "reader", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if fdFlags(t, n.fd)&unix.O_ACCMODE != unix.O_RDONLY {
		t.Fatal("reader made the node read-write")
	}
	w, err := g.NewBackend("n", "writer", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatal(err)
	}
	if fdFlags(t, n.fd)&unix.O_ACCMODE != unix.O_RDWR {
		t.Fatal("writer did not make the node read-write")
	}
	if err := w.WriteAt(ctx, bytes.Repeat([]byte{1}, 512), 0, 0); err != nil {
		t.Fatal(err)
	}
	// The locks moved to the new descriptor.
	if held, unshared := n.locks.held, n.locks.unshared; held != rw || unshared != graph.PermWrite {
		t.Fatalf("locks held %v unshared %v", held, unshared)
	}
	if ok, _ := lockTest(openRO(t, p), lockSharedBase+1); !ok {
		t.Fatal("write-unshared lock byte not held after reopen")
	}
	g.ReleaseBackend(w)
	if fdFlags(t, n.fd)&unix.O_ACCMODE != unix.O_RDONLY {
		t.Fatal("node stayed read-write without writers")
	}
	buf := make([]byte, 512)
	if err := r.ReadAt(ctx, buf, 0); err != nil || buf[0] != 1 {
		t.Fatalf("read after switch: %v %d", err, buf[0])
	}
	g.ReleaseBackend(r)
}

// openRO opens p read-only for lock probing; closed at test end.
func openRO(t testing.TB, p string) int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestWriteZeroesAndDiscard(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	for _, tc := range []struct {
		name    string
		discard string
		flags   graph.ReqFlags
		hole    bool // the range ends up deallocated
	}{
		{"zero", "ignore", 0, false},
		{"zero unmap ignored", "ignore", graph.MayUnmap, false},
		{"zero unmap", "unmap", graph.MayUnmap, true},
		{"zero fua", "unmap", graph.FUA, false},
		{"zero nofallback", "unmap", graph.NoFallback, false},
		{"zero unmap nofallback", "unmap", graph.MayUnmap | graph.NoFallback, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, data := mkfile(t, size)
			g := newGraph()
			defer g.Close()
			addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":%s}`, q(p), q(tc.discard))
			c := attach(t, g, "n")
			if err := c.WriteZeroes(ctx, 64<<10, 256<<10, tc.flags); err != nil {
				t.Fatal(err)
			}
			clear(data[64<<10 : 320<<10])
			if !bytes.Equal(readFile(t, p), data) {
				t.Fatal("content mismatch")
			}
			ext, err := c.BlockStatus(ctx, 64<<10, 256<<10)
			if err != nil {
				t.Fatal(err)
			}
			gotHole := ext[0].Flags == graph.ExtentHole|graph.ExtentZero && ext[0].Length == 256<<10
			if gotHole != tc.hole {
				t.Fatalf("extents %+v, want hole=%v", ext, tc.hole)
			}
			// Unaligned zeroing, inside one block and across blocks.
			if err := c.WriteZeroes(ctx, 1000, 3000, tc.flags&^graph.NoFallback); err != nil {
				t.Fatal(err)
			}
			clear(data[1000:4000])
			if !bytes.Equal(readFile(t, p), data) {
				t.Fatal("content mismatch after unaligned zeroes")
			}
		})
	}

	t.Run("discard", func(t *testing.T) {
		for _, mode := range []string{"ignore", "unmap"} {
			p, data := mkfile(t, size)
			g := newGraph()
			addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":%s}`, q(p), q(mode))
			c := attach(t, g, "n")
			if err := c.Discard(ctx, 128<<10, 128<<10); err != nil {
				t.Fatal(err)
			}
			got := readFile(t, p)
			if mode == "ignore" {
				if !bytes.Equal(got, data) {
					t.Fatal("discard=ignore changed data")
				}
			} else if !bytes.Equal(got[128<<10:256<<10], make([]byte, 128<<10)) || !bytes.Equal(got[:128<<10], data[:128<<10]) {
				t.Fatal("discard=unmap did not punch exactly the range")
			}
			var st unix.Stat_t
			if err := unix.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			wantBlocks := int64(size)
			if mode == "unmap" {
				wantBlocks -= 128 << 10
			}
			if st.Blocks*512 != wantBlocks {
				t.Fatalf("discard=%s: %d bytes allocated, want %d", mode, st.Blocks*512, wantBlocks)
			}
			g.ReleaseBackend(c)
			g.Close()
		}
	})
}

// zeroRangeOnly tests the QEMU fallback chain directly: with ZERO_RANGE
// marked unsupported the node punches and reallocates.
func TestWriteZeroesFallbacks(t *testing.T) {
	ctx := context.Background()
	p, data := mkfile(t, 1<<20)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	n := fileNode(b)
	n.noZeroRange.Store(true)
	if err := n.WriteZeroes(ctx, 0, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	clear(data[:64<<10])
	if !bytes.Equal(readFile(t, p), data) {
		t.Fatal("punch+allocate fallback did not zero")
	}
	if ext, _ := n.BlockStatus(ctx, 0, 64<<10); ext[0].Flags != 0 {
		t.Fatalf("non-unmapping zero left a hole: %+v", ext)
	}
	n.noDiscard.Store(true)
	if err := n.WriteZeroes(ctx, 0, 4096, 0); !errors.Is(err, graph.ErrNotSupported) {
		t.Fatalf("no way to zero inside the file: %v", err)
	}
	// Past the end of the file, allocating is enough (the node's last
	// sector is past the end of a file of 1 MiB - 100 bytes).
	if err := unix.Truncate(p, 1<<20-1024); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteZeroes(ctx, 1<<20-1024, 512, 0); err != nil {
		t.Fatalf("zeroes past EOF: %v", err)
	}
	// Through the graph, ErrNotSupported means writing zero buffers, or an
	// error with NoFallback.
	c := attach(t, g, "n")
	if err := c.WriteZeroes(ctx, 4096, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 4096, 4096, graph.NoFallback); !errors.Is(err, graph.ErrNotSupported) {
		t.Fatalf("NoFallback: %v", err)
	}
	if got := readFile(t, p)[4096:8192]; !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("fallback did not write zeroes")
	}
}

// sparse makes a file with data at [0,64K) and [1M,1M+4K) in a 2 MiB file.
func sparse(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{2}, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(2 << 20); err != nil {
		t.Fatal(err)
	}
	return p
}

// x builds an Extent.
func x(l int64, f graph.ExtentFlags) graph.Extent { return graph.Extent{Length: l, Flags: f} }

func TestBlockStatus(t *testing.T) {
	ctx := context.Background()
	const hz = graph.ExtentHole | graph.ExtentZero
	p := sparse(t)
	for _, direct := range []bool{false, true} {
		g := newGraph()
		addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":%v}}`, q(p), direct)
		c := attach(t, g, "n")
		for _, tc := range []struct {
			off, n int64
			want   []graph.Extent
		}{
			{0, 2 << 20, []graph.Extent{x(64<<10, 0), x(1<<20-64<<10, hz), x(4096, 0), x(1<<20-4096, hz)}},
			{0, 4096, []graph.Extent{x(4096, 0)}},
			{4096, 1 << 20, []graph.Extent{x(60<<10, 0), x(1<<20-64<<10, hz), x(4096, 0)}},
			{128 << 10, 4096, []graph.Extent{x(4096, hz)}},
			{1<<20 + 4096, 8192, []graph.Extent{x(8192, hz)}}, // trailing hole: ENXIO
			{2<<20 - 512, 512, []graph.Extent{x(512, hz)}},
		} {
			got, err := c.BlockStatus(ctx, tc.off, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("direct=%v status(%d,%d) = %v, want %v", direct, tc.off, tc.n, got, tc.want)
			}
		}
		g.ReleaseBackend(c)
		g.Close()
	}
}

func TestBlockStatusLimits(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "many")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	// 200 data blocks separated by holes.
	for i := 0; i < 200; i++ {
		if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 4096), int64(i)*64<<10); err != nil {
			t.Fatal(err)
		}
	}
	f.Truncate(200 * 64 << 10)
	f.Close()
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	n := b.Node().(*Node)
	var total int64
	calls := 0
	for off := int64(0); off < n.Size(); calls++ {
		ext, err := n.BlockStatus(ctx, off, n.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		if len(ext) == 0 || len(ext) > maxExtents {
			t.Fatalf("%d extents", len(ext))
		}
		for i, e := range ext {
			want := graph.ExtentFlags(0)
			if (off/4096)%16 != 0 {
				want = graph.ExtentHole | graph.ExtentZero
			}
			if e.Flags != want || e.Length <= 0 {
				t.Fatalf("extent %d at %d: %+v", i, off, e)
			}
			off += e.Length
			total += e.Length
		}
	}
	if total != n.Size() || calls < 2 {
		t.Fatalf("total %d in %d calls", total, calls)
	}
}

func TestTruncate(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		from, to  int64
		mode      graph.Prealloc
		err       string
		allocated bool // the growth is allocated
	}{
		{"grow off", 4096, 1 << 20, graph.PreallocOff, "", false},
		{"shrink off", 1 << 20, 4096, graph.PreallocOff, "", false},
		{"grow falloc", 4096, 1 << 20, graph.PreallocFalloc, "", true},
		{"grow full", 4096, 1 << 20, graph.PreallocFull, "", true},
		{"grow full unaligned", 1000, 300000, graph.PreallocFull, "", true},
		{"same falloc", 4096, 4096, graph.PreallocFalloc, "", false},
		{"metadata", 4096, 1 << 20, graph.PreallocMetadata, "Unsupported preallocation mode: metadata", false},
		{"shrink falloc", 1 << 20, 4096, graph.PreallocFalloc, "Cannot use preallocation for shrinking files", false},
		{"shrink full", 1 << 20, 4096, graph.PreallocFull, "Cannot use preallocation for shrinking files", false},
		{"bytes", 4096, 1000, graph.PreallocOff, "", false},
	} {
		for _, direct := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/direct=%v", tc.name, direct), func(t *testing.T) {
				p, data := mkfile(t, tc.from)
				g := newGraph()
				defer g.Close()
				addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":%v}}`, q(p), direct)
				c := attach(t, g, "n")
				err := c.Truncate(ctx, tc.to, tc.mode)
				if tc.err != "" {
					var fe *Error
					if err == nil || !errors.As(err, &fe) || fe.Msg != tc.err {
						t.Fatalf("got %v, want %q", err, tc.err)
					}
					if st, _ := os.Stat(p); st.Size() != tc.from {
						t.Fatalf("failed truncate changed the size to %d", st.Size())
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if c.Size() != roundSector(tc.to) {
					t.Fatalf("node size %d, want %d", c.Size(), roundSector(tc.to))
				}
				got := readFile(t, p)
				if int64(len(got)) != tc.to {
					t.Fatalf("file size %d, want %d", len(got), tc.to)
				}
				keep := min(tc.from, tc.to)
				if !bytes.Equal(got[:keep], data[:keep]) || !bytes.Equal(got[keep:], make([]byte, tc.to-keep)) {
					t.Fatal("content mismatch")
				}
				if tc.to > tc.from {
					ext, err := c.BlockStatus(ctx, roundSector(tc.from)+4096&^4095, 4096)
					if err != nil {
						t.Fatal(err)
					}
					if hole := ext[0].Flags&graph.ExtentHole != 0; hole == tc.allocated {
						t.Fatalf("growth extents %+v, allocated=%v", ext, tc.allocated)
					}
				}
			})
		}
	}
	t.Run("needs resize permission", func(t *testing.T) {
		p, _ := mkfile(t, 4096)
		g := newGraph()
		defer g.Close()
		addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
		c, err := g.NewBackend("n", "export", rw, graph.PermAll)
		if err != nil {
			t.Fatal(err)
		}
		defer g.ReleaseBackend(c)
		if err := c.Truncate(ctx, 8192, graph.PreallocOff); !errors.Is(err, graph.ErrReadOnly) {
			t.Fatalf("truncate without resize: %v", err)
		}
	})
}

func TestDirectAlignment(t *testing.T) {
	p, _ := mkfile(t, 1<<20)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":true}}`, q(p))
	l := b.Limits()
	if l.Align != 512 && l.Align != 4096 || l.MemAlign < 1 || l.MemAlign > 4096 {
		t.Fatalf("limits %+v", l)
	}
	// The probe agrees with what the kernel accepts.
	n := fileNode(b)
	buf := alignedBuf(2*maxAlign, maxAlign)
	if !ioAligned(n.fd, buf[:l.Align]) {
		t.Fatal("probed alignment refused")
	}
	if l.Align > 1 && ioAligned(n.fd, buf[:l.Align/2]) {
		t.Fatalf("half the alignment (%d) works too", l.Align/2)
	}
	if b2 := addNode(t, g, `{"driver":"file","node-name":"b","filename":%s}`, q(p)); b2.Limits().Align != 1 || b2.Limits().MemAlign != 0 {
		t.Fatalf("buffered limits %+v", b2.Limits())
	}
	// An empty file cannot be probed: QEMU's safe default is 4 KiB.
	e := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(e, nil, 0o644)
	if b3 := addNode(t, g, `{"driver":"file","node-name":"e","filename":%s,"cache":{"direct":true}}`, q(e)); b3.Limits().Align != maxAlign {
		t.Fatalf("empty file limits %+v", b3.Limits())
	}
}

// O_DIRECT with caller buffers at every memory alignment, and unaligned
// offsets and lengths (the graph's read-modify-write on top of bounce
// buffers).
func TestDirectUnaligned(t *testing.T) {
	ctx := context.Background()
	const size = 4 << 20
	p, data := mkfile(t, size)
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":true}}`, q(p))
	c := attach(t, g, "n")
	rnd := rand.New(rand.NewPCG(1, 2))
	backing := make([]byte, 3<<20)
	noise := make([]byte, 4<<20)
	rand.NewChaCha8([32]byte{1}).Read(noise)
	for i := 0; i < 150; i++ {
		memOff := rnd.IntN(4096)
		var n int
		switch i % 3 {
		case 0:
			n = 1 + rnd.IntN(8192)
		case 1:
			n = 512 * (1 + rnd.IntN(16))
		default:
			n = 1<<20 + rnd.IntN(1<<20) // several bounce chunks
		}
		off := rnd.Int64N(size - int64(n))
		if i%3 == 1 {
			off &^= 511
		}
		buf := backing[memOff : memOff+n]
		if i%2 == 0 {
			if err := c.ReadAt(ctx, buf, off); err != nil {
				t.Fatalf("read %d+%d mem+%d: %v", off, n, memOff, err)
			}
			if !bytes.Equal(buf, data[off:off+int64(n)]) {
				t.Fatalf("read %d+%d mem+%d: mismatch", off, n, memOff)
			}
		} else {
			copy(buf, noise[rnd.IntN(1<<20):])
			if err := c.WriteAt(ctx, buf, off, 0); err != nil {
				t.Fatalf("write %d+%d mem+%d: %v", off, n, memOff, err)
			}
			copy(data[off:], buf)
		}
	}
	if !bytes.Equal(readFile(t, p), data) {
		t.Fatal("file mismatch")
	}
	// The node itself refuses unaligned writes; unaligned reads it serves.
	n := fileNode(g.Lookup("n"))
	if err := n.WriteAt(ctx, make([]byte, 100), 0, 0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unaligned write to O_DIRECT node: %v", err)
	}
	buf := backing[3 : 3+777]
	if err := n.ReadAt(ctx, buf, 12345); err != nil || !bytes.Equal(buf, data[12345:12345+777]) {
		t.Fatalf("unaligned direct read: %v", err)
	}
}

func TestConcurrentIO(t *testing.T) {
	ctx := context.Background()
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			const blocks, bs = 256, 4096
			p, _ := mkfile(t, blocks*bs)
			g := newGraph()
			defer g.Close()
			addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":"unmap","cache":{"direct":%v}}`, q(p), direct)
			c := attach(t, g, "n")
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for w := 0; w < 8; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					buf := make([]byte, bs+1)[1:] // unaligned in memory
					got := make([]byte, bs)
					for i := w; i < blocks; i += 8 {
						off := int64(i) * bs
						for j := range buf {
							buf[j] = byte(i)
						}
						var err error
						switch i % 4 {
						case 0:
							err = c.WriteAt(ctx, buf, off, 0)
						case 1:
							err = c.WriteAt(ctx, buf, off, graph.FUA)
						case 2:
							err = c.WriteZeroes(ctx, off, bs, graph.MayUnmap)
							clear(buf)
						case 3:
							err = c.WriteAt(ctx, buf[:bs-100], off+50, 0)
						}
						if err == nil {
							err = c.ReadAt(ctx, got, off)
						}
						if err == nil && i%4 != 3 && !bytes.Equal(got, buf) {
							err = fmt.Errorf("block %d mismatch", i)
						}
						if err == nil && i%4 == 3 && !bytes.Equal(got[50:bs-50], buf[:bs-100]) {
							err = fmt.Errorf("block %d mismatch", i)
						}
						if err == nil {
							_, err = c.BlockStatus(ctx, off, bs)
						}
						if err == nil && i%16 == 0 {
							err = c.Flush(ctx)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}(w)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}

func TestFlushNoFlush(t *testing.T) {
	ctx := context.Background()
	p, _ := mkfile(t, 4096)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"no-flush":true}}`, q(p))
	n := fileNode(b)
	// A failed flush would be sticky; with no-flush nothing is synced at all.
	n.flushErr.Store(int32(unix.EIO))
	if err := n.Flush(ctx); err != nil {
		t.Fatalf("no-flush: %v", err)
	}
	if err := n.WriteAt(ctx, make([]byte, 512), 0, graph.FUA); err != nil {
		t.Fatalf("no-flush FUA: %v", err)
	}
	b2 := addNode(t, g, `{"driver":"file","node-name":"m","filename":%s}`, q(p))
	n2 := fileNode(b2)
	if err := n2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	n2.flushErr.Store(int32(unix.EIO))
	if err := n2.Flush(ctx); !errors.Is(err, unix.EIO) {
		t.Fatalf("sticky flush error: %v", err)
	}
	if err := n2.WriteAt(ctx, make([]byte, 512), 0, graph.FUA); !errors.Is(err, unix.EIO) {
		t.Fatalf("FUA after failed flush: %v", err)
	}
}

func TestInfoCacheClose(t *testing.T) {
	ctx := context.Background()
	p := sparse(t)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	n := fileNode(b)
	info := n.Info()
	if info.Filename != p || info.DirtyFlag == nil || *info.DirtyFlag || info.ActualSize != 68<<10 {
		t.Fatalf("info %+v", info)
	}
	if err := n.Cache(ctx, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal("second close:", err)
	}
	for name, err := range map[string]error{
		"read":  n.ReadAt(ctx, make([]byte, 512), 0),
		"write": n.WriteAt(ctx, make([]byte, 512), 0, 0),
		"flush": n.Flush(ctx),
		"zero":  n.WriteZeroes(ctx, 0, 512, 0),
	} {
		if !errors.Is(err, graph.ErrClosed) {
			t.Errorf("%s after close: %v", name, err)
		}
	}
	if info := n.Info(); info.ActualSize != -1 {
		t.Fatalf("info after close %+v", info)
	}
}

func TestStrerror(t *testing.T) {
	for errno, want := range map[unix.Errno]string{
		unix.ENOENT: "No such file or directory",
		unix.EACCES: "Permission denied",
		unix.EISDIR: "Is a directory",
		unix.ENOSPC: "No space left on device",
		unix.EROFS:  "Read-only file system",
	} {
		if got := strerror(errno); got != want {
			t.Errorf("strerror(%d) = %q, want %q", errno, got, want)
		}
	}
	err := errnoErrorf(unix.ENOSPC, "Could not resize file")
	if !errors.Is(err, unix.ENOSPC) || graph.Errno(err) != unix.ENOSPC {
		t.Fatal("errno lost")
	}
}

func TestAllocateByWriting(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("abc"), 0o644); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := allocateByWriting(ctx, fd, 3, 1<<20-3); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 1<<20 || st.Blocks*512 < 1<<20 {
		t.Fatalf("size %d, %d bytes allocated", st.Size, st.Blocks*512)
	}
	got := readFile(t, p)
	if string(got[:3]) != "abc" || strings.Trim(string(got[3:]), "\x00") != "" {
		t.Fatal("content changed")
	}
}

func TestResizer(t *testing.T) {
	ctx := context.Background()
	p, _ := mkfile(t, 4096)
	g := newGraph()
	defer g.Close()
	n := fileNode(addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p)))
	if err := n.Truncate(ctx, 10000); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Size() != 10000 || n.Size() != 10240 {
		t.Fatalf("file %d node %d", st.Size(), n.Size())
	}
	if n.Filename() != p {
		t.Fatal(n.Filename())
	}
}

// Requests keep working while auto-read-only swaps the descriptor and the
// file is resized underneath.
func TestConcurrentReopenAndResize(t *testing.T) {
	ctx := context.Background()
	p, data := mkfile(t, 1<<20)
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"auto-read-only":true}`, q(p))
	r, err := g.NewBackend("n", "reader", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(r)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((i*4+w)%256) * 4096
				if err := r.ReadAt(ctx, buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, data[off:off+4096]) {
					errs <- fmt.Errorf("mismatch at %d", off)
					return
				}
				if _, err := r.BlockStatus(ctx, off, 4096); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	for i := 0; i < 50; i++ {
		w, err := g.NewBackend("n", "writer", graph.PermAll, graph.PermAll)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Truncate(ctx, 2<<20, graph.PreallocOff); err != nil {
			t.Fatal(err)
		}
		if err := w.Truncate(ctx, 1<<20, graph.PreallocOff); err != nil {
			t.Fatal(err)
		}
		g.ReleaseBackend(w)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
