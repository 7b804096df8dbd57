package graph_test

import (
	"bytes"
	"context"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"

	"blockd/graph"
)

// TestDirtyBitmap: marks round out to granules, clears, counts (the last
// granule clipped to the size) and TakeNext's runs, with wrap-around.
func TestDirtyBitmap(t *testing.T) {
	d := graph.NewDirtyBitmap(10*4096+100, 4096)
	if n := d.Count(); n != 0 {
		t.Fatalf("new bitmap: %d dirty", n)
	}
	d.Mark(4095, 2) // granules 0 and 1
	d.Mark(10*4096, 50)
	if n := d.Count(); n != 2*4096+100 {
		t.Fatalf("count %d", n)
	}
	d.Mark(-10, 5) // out of range: nothing
	d.Mark(20*4096, 5)
	if off, n := d.TakeNext(4096, 1<<20); off != 4096 || n != 4096 {
		t.Fatalf("TakeNext from 4096: %d+%d", off, n)
	}
	if off, n := d.TakeNext(4096*2, 1<<20); off != 10*4096 || n != 100 {
		t.Fatalf("TakeNext of the tail: %d+%d", off, n)
	}
	if off, n := d.TakeNext(4096*2, 1<<20); off != 0 || n != 4096 {
		t.Fatalf("TakeNext wrapping: %d+%d", off, n)
	}
	if off, n := d.TakeNext(0, 1<<20); n != 0 {
		t.Fatalf("clean bitmap gave %d+%d", off, n)
	}
	d.Mark(0, 8*4096)
	if off, n := d.TakeNext(0, 3*4096+5); off != 0 || n != 3*4096 {
		t.Fatalf("TakeNext with a limit: %d+%d", off, n)
	}
	d.Clear(3*4096, 4096)
	if off, n := d.TakeNext(0, 1); off != 4*4096 || n != 4096 {
		t.Fatalf("TakeNext after Clear with a sub-granule limit: %d+%d", off, n)
	}
	if n := d.Count(); n != 3*4096 {
		t.Fatalf("count %d", n)
	}
}

// TestDirtyTrackingMirror: writers through a parent node and an outside
// user write, zero and discard a node while a copier takes dirty ranges
// and copies them to a second node; after the writers stop, one more pass
// under Pivot's drain leaves the copy identical to the source, and the
// export moves to the copy while the job's own edge stays. Without the
// hook the copy misses the writes made after the first pass.
func TestDirtyTrackingMirror(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	const size = 1 << 20
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"r","discard":"unmap","file":{"driver":"mem","node-name":"src","size":1048576,"discard":"unmap"}}`), false); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Add(ctx, tree(t, `{"driver":"mem","node-name":"dst","size":1048576}`), false); err != nil {
		t.Fatal(err)
	}
	src, dst := g.Lookup("src"), g.Lookup("dst")
	viaParent, err := g.NewBackend("r", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(viaParent)
	direct, err := g.NewBackend("src", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	job, err := g.NewJobBackend(src, "main node", "mirror", "j", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(job)
	w, err := g.NewBackend("dst", "", graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}

	d := graph.NewDirtyBitmap(size, 4096)
	if err := g.TrackDirty(src, d); err != nil {
		t.Fatal(err)
	}
	if err := g.TrackDirty(src, graph.NewDirtyBitmap(size, 4096)); err == nil {
		t.Fatal("a second bitmap was attached")
	}
	d.Mark(0, size) // sync=full: everything once
	buf := make([]byte, 64<<10)
	copyPass := func(read func(context.Context, []byte, int64) error) {
		for {
			off, n := d.TakeNext(0, int64(len(buf)))
			if n == 0 {
				return
			}
			if err := read(ctx, buf[:n], off); err != nil {
				t.Error(err)
				return
			}
			if err := w.WriteAt(ctx, buf[:n], off, 0); err != nil {
				t.Error(err)
				return
			}
		}
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	for i, c := range []*graph.Child{viaParent, direct, viaParent, direct} {
		wg.Add(1)
		go func(seed int64, c *graph.Child) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			p := make([]byte, 12000)
			for k := 0; !stop.Load() || k < 50; k++ {
				off := r.Int63n(size - int64(len(p)))
				var err error
				switch k % 5 {
				case 3:
					err = c.WriteZeroes(ctx, off, int64(r.Intn(len(p))+1), 0)
				case 4:
					err = c.Discard(ctx, off&^4095, 8192)
				default:
					r.Read(p)
					err = c.WriteAt(ctx, p[:r.Intn(len(p))+1], off, 0)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(int64(i), c)
	}
	for i := 0; i < 5; i++ {
		copyPass(job.ReadAt)
	}
	stop.Store(true)
	wg.Wait()
	if err := g.Pivot(ctx, src, dst, func(read func(context.Context, []byte, int64) error) error {
		copyPass(read)
		g.ReleaseBackend(w)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	g.UntrackDirty(src, d)
	if !bytes.Equal(src.Node().(*alignedMem).Bytes(), dst.Node().(*alignedMem).Bytes()) {
		t.Fatal("the copy differs from the source")
	}
	if direct.BDS() != dst || viaParent.BDS() != g.Lookup("r") || job.BDS() != src {
		t.Fatalf("after the pivot: direct on %s, job on %s", direct.BDS().Name(), job.BDS().Name())
	}
	// The raw node's file edge is a parent edge of src: it moved too.
	if f := g.Lookup("r").Children()[0].BDS(); f != dst {
		t.Fatalf("raw's file is %s", f.Name())
	}
	// Writes no longer reach the source's bitmap.
	if err := direct.WriteAt(ctx, []byte{1}, 0, 0); err != nil {
		t.Fatal(err)
	}
	if d.Count() != 0 {
		t.Fatal("a write after the pivot marked the source's bitmap")
	}
	g.ReleaseBackend(direct)
}
