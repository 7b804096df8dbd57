package blkdebug_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"blockd/drivers/blkdebug"
	"blockd/drivers/raw"
	"blockd/graph"
	"blockd/internal/keyval"
	"blockd/internal/testutil"
)

// memDriver opens in-memory nodes ("mem", size) under the filter.
func memDriver() *graph.Driver {
	type opts struct {
		Size int64 `json:"size"`
	}
	return &graph.Driver{
		Name:    "mem",
		Options: func() any { return new(opts) },
		Open: func(_ context.Context, _ *graph.Opener, v any) (graph.Node, error) {
			return graph.NewMemNode(v.(*opts).Size), nil
		},
		Protocol: true,
	}
}

func newGraph() *graph.Graph {
	return graph.New(nil, memDriver(), raw.Driver(), blkdebug.Driver())
}

// open adds the JSON node definition js and returns a writable backend on
// its root.
func open(t *testing.T, js string) (*graph.Graph, *graph.Child) {
	t.Helper()
	g := newGraph()
	b, err := g.Add(context.Background(), testutil.Tree(t, js), false)
	if err != nil {
		t.Fatalf("blockdev-add %s: %v", js, err)
	}
	c, err := g.NewBackend(b.Name(), "test", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.ReleaseBackend(c); g.Close() })
	return g, c
}

func node(rules string, extra ...string) string {
	s := `{"driver":"blkdebug","node-name":"dbg","discard":"unmap","image":{"driver":"mem","size":1048576,"discard":"unmap"},"inject-error":` + rules
	for _, e := range extra {
		s += "," + e
	}
	return s + "}"
}

var ctx = context.Background()

func errnoOf(err error) syscall.Errno {
	var en syscall.Errno
	if errors.As(err, &en) {
		return en
	}
	return 0
}

func TestSectorAndErrno(t *testing.T) {
	_, c := open(t, node(`[{"event":"none","sector":8,"errno":28}]`))
	buf := make([]byte, 4096)
	if err := c.ReadAt(ctx, buf, 0); err != nil {
		t.Fatalf("read before the faulty sector: %v", err)
	}
	err := c.ReadAt(ctx, buf, 4096)
	if errnoOf(err) != syscall.ENOSPC || graph.Errno(err) != syscall.ENOSPC {
		t.Fatalf("read covering sector 8: %v", err)
	}
	var oe *graph.OpError
	if !errors.As(err, &oe) || oe.Node != "dbg" || oe.Op != "read" {
		t.Fatalf("error is not an OpError on dbg: %#v", err)
	}
	if err := c.WriteAt(ctx, buf[:512], 8*512, 0); errnoOf(err) != syscall.ENOSPC {
		t.Fatalf("write to sector 8: %v", err)
	}
	if err := c.WriteAt(ctx, buf[:512], 9*512, 0); err != nil {
		t.Fatalf("write to sector 9: %v", err)
	}
	// An unaligned read that the graph does not widen still covers it.
	if err := c.ReadAt(ctx, buf[:10], 8*512+100); errnoOf(err) != syscall.ENOSPC {
		t.Fatalf("unaligned read in sector 8: %v", err)
	}
	// Flushes have no range, so a sector rule never matches them.
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
}

func TestDefaultsAndIOTypes(t *testing.T) {
	for _, tc := range []struct {
		rules                                   string
		read, write, zero, discard, flush, stat bool // expected to fail
	}{
		// No event and no iotype: everything but block-status fails with EIO.
		{rules: `[{}]`, read: true, write: true, zero: true, discard: true, flush: true},
		{rules: `[{"event":"none","iotype":"flush"}]`, flush: true},
		{rules: `[{"iotype":["read","block-status"]}]`, read: true, stat: true},
		{rules: `[{"iotype":["write-zeroes","discard"]}]`, zero: true, discard: true},
		{rules: `[{"iotype":"write","errno":0}]`},
	} {
		t.Run(tc.rules, func(t *testing.T) {
			_, c := open(t, node(tc.rules))
			buf := make([]byte, 4096)
			_, statErr := c.BlockStatus(ctx, 0, 4096)
			for _, x := range []struct {
				name string
				want bool
				err  error
			}{
				{"read", tc.read, c.ReadAt(ctx, buf, 0)},
				{"write", tc.write, c.WriteAt(ctx, buf, 0, 0)},
				{"zero", tc.zero, c.WriteZeroes(ctx, 0, 4096, graph.MayUnmap)},
				{"discard", tc.discard, c.Discard(ctx, 0, 4096)},
				{"flush", tc.flush, c.Flush(ctx)},
				{"block-status", tc.stat, statErr},
			} {
				if x.want && errnoOf(x.err) != syscall.EIO {
					t.Errorf("%s: got %v, want EIO", x.name, x.err)
				}
				if !x.want && x.err != nil {
					t.Errorf("%s: unexpected error %v", x.name, x.err)
				}
			}
		})
	}
}

func TestOnceAndAfter(t *testing.T) {
	_, c := open(t, node(`[{"iotype":"read","once":true,"errno":1},{"iotype":"write","after":3,"errno":5}]`))
	buf := make([]byte, 512)
	if err := c.ReadAt(ctx, buf, 0); errnoOf(err) != syscall.EPERM {
		t.Fatalf("first read: %v", err)
	}
	for i := 0; i < 3; i++ {
		if err := c.ReadAt(ctx, buf, 0); err != nil {
			t.Fatalf("read after a once rule fired: %v", err)
		}
	}
	for i := 0; i < 3; i++ {
		if err := c.WriteAt(ctx, buf, 0, 0); err != nil {
			t.Fatalf("write %d before after=3: %v", i, err)
		}
	}
	for i := 0; i < 2; i++ {
		if err := c.WriteAt(ctx, buf, 0, 0); errnoOf(err) != syscall.EIO {
			t.Fatalf("write after after=3: %v", err)
		}
	}
}

func TestDelay(t *testing.T) {
	_, c := open(t, node(`[{"iotype":"read","delay-ns":30000000},{"iotype":"write","delay-ns":30000000,"errno":5}]`))
	buf := make([]byte, 512)
	start := time.Now()
	if err := c.ReadAt(ctx, buf, 0); err != nil {
		t.Fatalf("delayed read: %v", err)
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Fatalf("read took %v, want at least 30ms", d)
	}
	start = time.Now()
	if err := c.WriteAt(ctx, buf, 0, 0); errnoOf(err) != syscall.EIO || time.Since(start) < 30*time.Millisecond {
		t.Fatalf("delayed failing write: %v after %v", err, time.Since(start))
	}
	// A cancelled context ends the delay early.
	_, c = open(t, node(`[{"iotype":"read","delay-ns":60000000000}]`))
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := c.ReadAt(cctx, buf, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with a cancelled context: %v", err)
	}
}

// TestEventsAndStates arms rules by events and walks the state machine:
// the first write moves the node to state 2, where reads fail.
func TestEventsAndStates(t *testing.T) {
	_, c := open(t, node(`[{"event":"read_aio","state":2,"iotype":"read","errno":5}]`,
		`"set-state":[{"event":"write_aio","new_state":2},{"event":"flush_to_disk","state":2,"new_state":3}]`))
	buf := make([]byte, 512)
	if err := c.ReadAt(ctx, buf, 0); err != nil {
		t.Fatalf("read in state 1: %v", err)
	}
	if err := c.WriteAt(ctx, buf, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, buf, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("read in state 2: %v", err)
	}
	// Once armed a rule stays armed in blockd, even after the state moves on.
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, buf, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("read in state 3: %v", err)
	}
	// pwritev_done is raised only after a successful write.
	_, c = open(t, node(`[{"event":"pwritev_done","iotype":"read"}]`))
	if err := c.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, buf, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, buf, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("read after pwritev_done: %v", err)
	}
}

func TestAlignAndMaxTransfer(t *testing.T) {
	g, c := open(t, node(`[{"iotype":"write","sector":0}]`, `"align":4096`, `"max-transfer":65536`))
	l := g.Lookup("dbg").Limits()
	if l.Align != 4096 || l.MaxTransfer != 65536 {
		t.Fatalf("limits %+v", l)
	}
	// An unaligned write to sector 1 is widened to 4 KiB and so covers
	// sector 0: the read-modify-write fails there.
	if err := c.WriteAt(ctx, []byte("x"), 512, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("unaligned write next to a faulty sector: %v", err)
	}
	// Large requests are split: the piece covering sector 0 fails, the
	// data of the others is intact.
	data := bytes.Repeat([]byte{0xaa}, 256<<10)
	if err := c.WriteAt(ctx, data, 0, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("large write: %v", err)
	}
	if err := c.WriteAt(ctx, data[:192<<10], 64<<10, 0); err != nil {
		t.Fatalf("large write past the faulty sector: %v", err)
	}
	got := make([]byte, 192<<10)
	if err := c.ReadAt(ctx, got, 64<<10); err != nil || !bytes.Equal(got, data[:192<<10]) {
		t.Fatalf("read back: %v", err)
	}
}

func TestOptionErrors(t *testing.T) {
	for _, tc := range []struct{ js, want string }{
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"align":3}`, "Cannot meet constraints with align 3"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"align":4096,"max-transfer":1000}`, "Cannot meet constraints with max-transfer 1000"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"config":"/x"}`, "config files are not supported"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"max-discard":512}`, "'max-discard' is not supported"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"inject-error":[{"iotype":"bogus"}]}`, "Parameter 'iotype' does not accept value 'bogus'"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"inject-error":[{"event":"bogus"}]}`, "Parameter 'event' does not accept value 'bogus'"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"inject-error":[{"whatever":1}]}`, "Parameter 'inject-error[0].whatever' is unexpected"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"inject-error":[{"delay-ns":-1}]}`, "delay-ns must not be negative"},
		{`{"driver":"blkdebug","node-name":"d","image":{"driver":"mem","size":4096},"set-state":[{"event":"none"}]}`, "Parameter 'set-state[0].new_state' is missing"},
		{`{"driver":"blkdebug","node-name":"d"}`, "Parameter 'image' is missing"},
	} {
		_, err := newGraph().Add(ctx, testutil.Tree(t, tc.js), false)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.js, err, tc.want)
		}
	}
}

// TestKeyval opens a filter from a --blockdev string.
func TestKeyval(t *testing.T) {
	arg := "driver=blkdebug,node-name=d,image.driver=mem,image.size=8192," +
		"inject-error.0.event=none,inject-error.0.iotype=read,inject-error.0.errno=28,inject-error.0.sector=1," +
		"inject-error.1.iotype.0=write,inject-error.1.iotype.1=flush,inject-error.1.once=on,inject-error.1.after=1," +
		"align=512,max-transfer=4096"
	tree, err := keyval.Parse(arg, "driver")
	if err != nil {
		t.Fatal(err)
	}
	g := newGraph()
	b, err := g.Add(ctx, tree, true)
	if err != nil {
		t.Fatalf("--blockdev %s: %v", arg, err)
	}
	defer g.Close()
	c, err := g.NewBackend(b.Name(), "test", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(c)
	buf := make([]byte, 512)
	if err := c.ReadAt(ctx, buf, 512); errnoOf(err) != syscall.ENOSPC {
		t.Fatalf("read sector 1: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("first flush (after=1): %v", err)
	}
	if err := c.WriteAt(ctx, buf, 0, 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("write: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("flush after the once rule fired: %v", err)
	}
	if f := b.Filename(); !strings.HasPrefix(f, "json:{") || !strings.Contains(f, `"driver": "blkdebug"`) || !strings.Contains(f, `"inject-error"`) {
		t.Fatalf("filename %s", f)
	}
}

// TestRawOverBlkdebug checks errors pass unchanged through a format node
// and that the filter is safe under parallel requests.
func TestRawOverBlkdebug(t *testing.T) {
	_, c := open(t, `{"driver":"raw","node-name":"top","file":{"driver":"blkdebug","image":{"driver":"mem","size":1048576},
		"inject-error":[{"event":"read_aio","iotype":"read","sector":100,"errno":1},{"iotype":"write","after":50,"once":true,"errno":27}]}}`)
	var wg sync.WaitGroup
	var mu sync.Mutex
	efbig := 0
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; i < 50; i++ {
				off := int64((g*50+i)%256) * 4096
				err := c.WriteAt(ctx, buf, off, 0)
				if err != nil {
					if graph.Errno(err) != syscall.EFBIG {
						t.Errorf("write: %v", err)
					}
					mu.Lock()
					efbig++
					mu.Unlock()
				}
				err = c.ReadAt(ctx, buf, off)
				covers := off <= 100*512 && 100*512 < off+4096
				if covers != (errnoOf(err) == syscall.EPERM) {
					t.Errorf("read at %d: %v", off, err)
				}
			}
		}(g)
	}
	wg.Wait()
	if efbig != 1 {
		t.Fatalf("%d writes failed, want exactly 1", efbig)
	}
}
