package file

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

func TestDataCache(t *testing.T) {
	var c dataCache
	if _, ok := c.lookup(0); ok {
		t.Fatal("empty cache hit")
	}
	g := c.generation()
	c.store(g, 4096, 8192)
	for _, tc := range []struct {
		off int64
		end int64
		ok  bool
	}{{4095, 0, false}, {4096, 8192, true}, {8191, 8192, true}, {8192, 0, false}} {
		end, ok := c.lookup(tc.off)
		if ok != tc.ok || end != tc.end {
			t.Errorf("lookup(%d) = %d, %v; want %d, %v", tc.off, end, ok, tc.end, tc.ok)
		}
	}

	// Overlapping and adjacent extents merge into one slot.
	c.store(g, 0, 4096)
	c.store(g, 6000, 12288)
	if end, ok := c.lookup(0); !ok || end != 12288 {
		t.Fatalf("merged extent: lookup(0) = %d, %v", end, ok)
	}
	used := 0
	for _, s := range c.ext {
		if !s.empty() {
			used++
		}
	}
	if used != 1 {
		t.Fatalf("%d slots in use after merging, want 1: %+v", used, c.ext)
	}

	// A store whose lookup started before an invalidation is dropped, even
	// for a range the invalidation did not touch.
	g = c.generation()
	c.invalidate(1<<20, 4096)
	c.store(g, 2<<20, 3<<20)
	if _, ok := c.lookup(2 << 20); ok {
		t.Fatal("stale store was kept")
	}
	if _, ok := c.lookup(0); !ok {
		t.Fatal("invalidation dropped an extent it does not overlap")
	}
	// Partial invalidation drops only the extents it overlaps.
	c.invalidate(12287, 1)
	if _, ok := c.lookup(0); ok {
		t.Fatal("overlapping extent survived invalidation")
	}

	// More disjoint extents than slots: the oldest are replaced, the
	// newest always kept.
	g = c.generation()
	for i := range int64(dataCacheSlots + 2) {
		c.store(g, i<<20, i<<20+4096)
		if _, ok := c.lookup(i << 20); !ok {
			t.Fatalf("extent %d not kept", i)
		}
	}
	c.invalidate(0, -1)
	for i := range int64(dataCacheSlots + 2) {
		if _, ok := c.lookup(i << 20); ok {
			t.Fatalf("extent %d survived invalidating everything", i)
		}
	}
}

// countSeeks replaces seek with a counting wrapper for the test, calling
// hook (if not nil) after each lseek with its arguments and result.
func countSeeks(t *testing.T, hook func(fd int, off int64, whence int, res int64)) *atomic.Int64 {
	var n atomic.Int64
	orig := seek
	seek = func(fd int, off int64, whence int) (int64, error) {
		n.Add(1)
		r, err := orig(fd, off, whence)
		if hook != nil && err == nil {
			hook(fd, off, whence, r)
		}
		return r, err
	}
	t.Cleanup(func() { seek = orig })
	return &n
}

// holesSupported reports whether the file system of dir punches holes that
// SEEK_HOLE reports (else the tests of hole reporting are skipped).
func holesSupported(t *testing.T, dir string) bool {
	t.Helper()
	p := filepath.Join(dir, "probe")
	if err := os.WriteFile(p, bytes.Repeat([]byte{1}, 3*65536), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(p)
	fd, err := unix.Open(p, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 65536, 65536) != nil {
		return false
	}
	h, err := unix.Seek(fd, 0, unix.SEEK_HOLE)
	return err == nil && h == 65536
}

func wantExtents(t *testing.T, c *graph.Child, off, n int64, want ...graph.Extent) {
	t.Helper()
	got, err := c.BlockStatus(context.Background(), off, n)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("status(%d, %d) = %v, want %v", off, n, got, want)
	}
}

// TestBlockStatusCache checks that a sequential pass over a data extent
// seeks once, and that discard, zeroing, writes and resizing show in the
// next answer.
func TestBlockStatusCache(t *testing.T) {
	ctx := context.Background()
	const hz = graph.ExtentHole | graph.ExtentZero
	const mib = 1 << 20
	p, _ := mkfile(t, 8*mib)
	if !holesSupported(t, filepath.Dir(p)) {
		t.Skip("the file system does not report punched holes")
	}
	seeks := countSeeks(t, nil)
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":"unmap"}`, q(p))
	c := attach(t, g, "n")

	wantExtents(t, c, 0, 256<<10, x(256<<10, 0))
	if s := seeks.Load(); s != 2 {
		t.Fatalf("first status: %d seeks, want 2 (SEEK_DATA, SEEK_HOLE)", s)
	}
	for off := int64(256 << 10); off < 8*mib; off += 256 << 10 {
		wantExtents(t, c, off, 256<<10, x(256<<10, 0))
	}
	if s := seeks.Load(); s != 2 {
		t.Fatalf("sequential pass: %d seeks, want 2", s)
	}

	// Discard punches a hole; the next answer reports it.
	if err := c.Discard(ctx, 3*mib, mib); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, c, 0, 8*mib, x(3*mib, 0), x(mib, hz), x(4*mib, 0))
	wantExtents(t, c, 3*mib+4096, 4096, x(4096, hz))
	seeks.Store(0)
	for off := int64(0); off < 3*mib; off += 256 << 10 {
		wantExtents(t, c, off, 256<<10, x(256<<10, 0))
	}
	if s := seeks.Load(); s != 0 {
		t.Fatalf("pass over the rediscovered extent: %d seeks, want 0", s)
	}

	// Writing into the hole makes data at once (holes are never cached).
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{7}, 64<<10), 3*mib, 0); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, c, 3*mib, mib, x(64<<10, 0), x(mib-64<<10, hz))

	// Zeroing with unmap punches a hole, inside a cached extent.
	wantExtents(t, c, 4*mib, 4*mib, x(4*mib, 0))
	if err := c.WriteZeroes(ctx, 5*mib, mib, graph.MayUnmap); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, c, 4*mib, 4*mib, x(mib, 0), x(mib, hz), x(2*mib, 0))

	// Growing the file adds a hole after the last data extent.
	if err := c.Truncate(ctx, 12*mib, graph.PreallocOff); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, c, 6*mib, 6*mib, x(2*mib, 0), x(4*mib, hz))
	// Shrinking into a cached extent and growing again.
	if err := c.Truncate(ctx, 7*mib, graph.PreallocOff); err != nil {
		t.Fatal(err)
	}
	if err := c.Truncate(ctx, 8*mib, graph.PreallocOff); err != nil {
		t.Fatal(err)
	}
	wantExtents(t, c, 6*mib, 2*mib, x(mib, 0), x(mib, hz))
}

// TestBlockStatusCacheRace punches a hole while a lookup is between its
// two seeks, so the lookup's answer is stale: it must not be cached.
func TestBlockStatusCacheRace(t *testing.T) {
	const hz = graph.ExtentHole | graph.ExtentZero
	const mib = 1 << 20
	p, _ := mkfile(t, 4*mib)
	if !holesSupported(t, filepath.Dir(p)) {
		t.Skip("the file system does not report punched holes")
	}
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":"unmap"}`, q(p))
	n := fileNode(b)
	var once sync.Once
	countSeeks(t, func(fd int, off int64, whence int, res int64) {
		if whence == unix.SEEK_HOLE && res == 4*mib {
			// The lookup has seen data up to the end of the file.
			once.Do(func() {
				if err := n.Discard(context.Background(), 2*mib, mib); err != nil {
					t.Error(err)
				}
			})
		}
	})
	c := attach(t, g, "n")
	// This answer may be stale (it raced with the discard) ...
	if _, err := c.BlockStatus(context.Background(), 0, 4*mib); err != nil {
		t.Fatal(err)
	}
	// ... but the next one must not come from it.
	wantExtents(t, c, mib, 3*mib, x(mib, 0), x(mib, hz), x(mib, 0))
}

// TestBlockStatusNeverHidesData has workers write, zero and discard their
// own blocks of a file while asking for the block status of ranges that
// span other workers' blocks, and checks after every request that the
// worker's own block is reported as data when it holds data (and as a hole
// after a punch, when the file system reports holes).
func TestBlockStatusNeverHidesData(t *testing.T) {
	ctx := context.Background()
	const bs, blocks, workers = 4096, 512, 4
	p, _ := mkfile(t, blocks*bs)
	holes := holesSupported(t, filepath.Dir(p))
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			g := newGraph()
			defer g.Close()
			addNode(t, g, `{"driver":"file","node-name":"n","filename":%s,"discard":"unmap","cache":{"direct":%v}}`, q(p), direct)
			c := attach(t, g, "n")
			// isData reports whether block i is reported as data, asking
			// for a range of up to 64 blocks that contains it.
			isData := func(r *rand.Rand, i int64) (bool, error) {
				lo := max(0, i-r.Int64N(32))
				hi := min(blocks, i+1+r.Int64N(32))
				ext, err := c.BlockStatus(ctx, lo*bs, (hi-lo)*bs)
				if err != nil {
					return false, err
				}
				pos := lo * bs
				for _, e := range ext {
					if pos <= i*bs && i*bs < pos+e.Length {
						return e.Flags&graph.ExtentZero == 0, nil
					}
					pos += e.Length
				}
				// A short answer: ask again from where it ended.
				ext, err = c.BlockStatus(ctx, i*bs, bs)
				if err != nil {
					return false, err
				}
				return ext[0].Flags&graph.ExtentZero == 0, nil
			}
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(w), 1))
					buf := alignedBuf(bs, bs)
					for range 1500 {
						i := int64(w) + int64(r.IntN(blocks/workers))*workers
						var err error
						var data bool
						switch r.IntN(4) {
						case 0, 1:
							buf[0] = byte(i) | 1
							err = c.WriteAt(ctx, buf, i*bs, 0)
							data = true
						case 2:
							err = c.Discard(ctx, i*bs, bs)
						case 3:
							err = c.WriteZeroes(ctx, i*bs, bs, graph.MayUnmap)
						}
						if err != nil {
							errs <- err
							return
						}
						got, err := isData(r, i)
						if err != nil {
							errs <- err
							return
						}
						if data && !got {
							errs <- fmt.Errorf("worker %d: block %d holds data but is reported as a hole", w, i)
							return
						}
						if !data && got && holes {
							errs <- fmt.Errorf("worker %d: block %d was punched but is reported as data", w, i)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}
