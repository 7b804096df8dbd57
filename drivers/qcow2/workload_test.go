package qcow2_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"blockd/graph"
)

// workload runs random operations through c and mirrors their effect in
// mirror: unaligned writes, zero writes with and without unmap, discards
// (whole clusters only, as QEMU), flushes and FUA writes.
type workload struct {
	c       *graph.Child
	mirror  []byte
	cs      int64
	align   int64 // request alignment (512 for encrypted images)
	r       *rand.Rand
	v2      bool // discarded clusters show the backing file (not modelled: no discards)
	backing []byte
}

func (w *workload) span(maxLen int64) (int64, int64) {
	size := int64(len(w.mirror))
	var n int64
	switch w.r.IntN(4) {
	case 0:
		n = 1 + w.r.Int64N(min(maxLen, size))
	case 1:
		n = w.cs * (1 + w.r.Int64N(4))
	default:
		n = 1 + w.r.Int64N(min(8192, size))
	}
	n = min(n, size)
	off := w.r.Int64N(size - n + 1)
	if w.r.IntN(3) == 0 {
		off &^= w.cs - 1
	}
	if w.align > 1 {
		off &^= w.align - 1
		n = (n + w.align - 1) &^ (w.align - 1)
		if off+n > size {
			n = size - off
		}
	}
	return off, n
}

// wop is one generated operation.
type wop struct {
	kind   int // 0 write, 1 zero, 2 discard, 3 flush, 4 read
	off, n int64
	flags  graph.ReqFlags
	data   []byte
}

// next generates operation i (the same sequence for the same seed).
func (w *workload) next(i int) wop {
	op := w.r.IntN(20)
	switch {
	case op < 11:
		off, n := w.span(300_000)
		var f graph.ReqFlags
		if w.r.IntN(30) == 0 {
			f = graph.FUA
		}
		return wop{kind: 0, off: off, n: n, flags: f, data: pattern(int(n), uint64(i)+1)}
	case op < 14:
		off, n := w.span(1 << 20)
		var f graph.ReqFlags
		if w.r.IntN(2) == 0 {
			f = graph.MayUnmap
		}
		return wop{kind: 1, off: off, n: n, flags: f}
	case op < 16 && !w.v2:
		off, n := w.span(1 << 20)
		return wop{kind: 2, off: off, n: n}
	case op < 17:
		return wop{kind: 3}
	default:
		off, n := w.span(200_000)
		return wop{kind: 4, off: off, n: n}
	}
}

// touched returns the range an operation may change in the mirror.
func (w *workload) touched(o wop) (int64, int64) {
	switch o.kind {
	case 0, 1:
		return o.off, o.off + o.n
	case 2:
		size := int64(len(w.mirror))
		start := (o.off + w.cs - 1) &^ (w.cs - 1)
		end := (o.off + o.n) &^ (w.cs - 1)
		if o.off+o.n == size {
			end = size
		}
		if end > start {
			return start, end
		}
	}
	return 0, 0
}

// mirrorOp applies an operation to the mirror only.
func (w *workload) mirrorOp(o wop) {
	switch o.kind {
	case 0:
		copy(w.mirror[o.off:], o.data)
	case 1, 2:
		s, e := w.touched(o)
		clear(w.mirror[s:e])
	}
}

func (w *workload) step(t testing.TB, ctx context.Context, i int) {
	o := w.next(i)
	var err error
	switch o.kind {
	case 0:
		err = w.c.WriteAt(ctx, o.data, o.off, o.flags)
	case 1:
		err = w.c.WriteZeroes(ctx, o.off, o.n, o.flags)
	case 2:
		err = w.c.Discard(ctx, o.off, o.n)
	case 3:
		err = w.c.Flush(ctx)
	case 4:
		buf := make([]byte, o.n)
		if err = w.c.ReadAt(ctx, buf, o.off); err == nil {
			equalOrFail(t, fmt.Sprintf("op %d: read %d+%d", i, o.off, o.n), buf, w.mirror[o.off:o.off+o.n])
		}
	}
	if err != nil {
		t.Fatalf("op %d (kind %d, %d+%d): %v", i, o.kind, o.off, o.n, err)
	}
	w.mirrorOp(o)
}

// finish closes the graph and checks the image with qemu-img: no errors,
// no leaks, same content as the mirror.
func finishImage(t *testing.T, g *graph.Graph, img string, mirror []byte, qemuOpts ...string) {
	t.Helper()
	g.Close()
	checkClean(t, img)
	mr := filepath.Join(filepath.Dir(img), "mirror.raw")
	if err := os.WriteFile(mr, mirror, 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"compare", "-q"}, qemuOpts...)
	if len(qemuOpts) == 0 {
		args = append(args, "-f", "qcow2")
	}
	qemuImg(t, append(args, "-F", "raw", img, mr)...)
}

// TestWorkload runs a random workload over images blockd creates and over
// images qemu-img made with a backing chain, then checks them with
// qemu-img.
func TestWorkload(t *testing.T) {
	ops := scaled(3000, 300)
	if v, err := strconv.Atoi(os.Getenv("BLOCKD_QCOW2_OPS")); err == nil && v > 0 {
		// For long runs: BLOCKD_QCOW2_OPS=100000.
		ops = v
	}
	cases := []struct {
		name    string
		create  string
		backing bool
		qemu    []string // qemu-img create -o for qemu-made images
	}{
		{name: "default", create: ``},
		{name: "c512", create: `,"cluster-size":512`},
		{name: "c4k-refcount1", create: `,"cluster-size":4096,"refcount-bits":1`},
		{name: "c2m", create: `,"cluster-size":2097152`},
		{name: "refcount64", create: `,"refcount-bits":64,"cluster-size":16384`},
		{name: "extl2", create: `,"extended-l2":true,"cluster-size":32768`},
		{name: "lazy", create: `,"lazy-refcounts":true`},
		{name: "v2", create: `,"version":"v2"`},
		{name: "backing", backing: true, qemu: []string{"cluster_size=4096"}},
		{name: "backing-extl2", backing: true, qemu: []string{"extended_l2=on"}},
		{name: "backing-v2", backing: true, qemu: []string{"compat=0.10"}},
		{name: "compressed-backing", backing: true, qemu: []string{"cluster_size=8192"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8<<20 + 3*512
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			mirror := make([]byte, size)
			if tc.backing {
				base := filepath.Join(dir, "base.raw")
				mkRaw(t, base, size-4096, 11)
				src := base
				if tc.name == "compressed-backing" {
					src = filepath.Join(dir, "base.qcow2")
					qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", base, src)
					qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", tc.qemu[0], img, fmt.Sprint(size))
				} else {
					qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", tc.qemu[0], img, fmt.Sprint(size))
				}
				b, _ := os.ReadFile(base)
				copy(mirror, b)
				// Existing data in the top layer too.
				qemuIO(t, "-c", "write -P 0x5a 100000 300000", img)
				for i := 100000; i < 400000; i++ {
					mirror[i] = 0x5a
				}
			} else {
				blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, tc.create))
			}
			g, _ := newGraph(t)
			c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			var cs int64 = 65536
			if in := g.Lookup("img").Node().(graph.Infoer).Info(); in.ClusterSize > 0 {
				cs = in.ClusterSize
			}
			w := &workload{c: c, mirror: mirror, cs: cs, r: rand.New(rand.NewPCG(uint64(len(tc.name)), 42)), v2: tc.name == "v2" || tc.name == "backing-v2"}
			n := ops
			if cs >= 1<<20 {
				// Every small write copies a 2 MiB cluster.
				n = max(ops/4, scaled(100, 50))
			}
			for i := 0; i < n; i++ {
				w.step(t, t.Context(), i)
			}
			equalOrFail(t, "final read", readAll(t, c), w.mirror)
			// Grow it.
			if err := c.Truncate(t.Context(), size+5<<20, graph.PreallocOff); err != nil {
				t.Fatal(err)
			}
			w.mirror = append(w.mirror, make([]byte, 5<<20)...)
			for i := 0; i < ops/10; i++ {
				w.step(t, t.Context(), ops+i)
			}
			equalOrFail(t, "after resize", readAll(t, c), w.mirror)
			finishImage(t, g, img, w.mirror)
		})
	}
}

// TestParallelWrites writes disjoint regions from many goroutines (same
// L2 tables, different clusters) and checks the result.
func TestParallelWrites(t *testing.T) {
	for _, cfg := range []string{``, `,"cluster-size":512`, `,"extended-l2":true`} {
		t.Run(cfg, func(t *testing.T) {
			const size = 16 << 20
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, cfg))
			g, _ := newGraph(t)
			c := openQcow2(t, g, "img", img, `,"discard":"unmap","l2-cache-size":131072`)
			mirror := make([]byte, size)
			const workers = 8
			region := int64(size / workers)
			perWorker := scaled(400, 120)
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 7))
					base := int64(w) * region
					for i := 0; i < perWorker; i++ {
						n := 1 + r.Int64N(100_000)
						off := base + r.Int64N(region-n)
						switch r.IntN(6) {
						case 0:
							if err := c.WriteZeroes(t.Context(), off, n, graph.MayUnmap); err != nil {
								errs <- err
								return
							}
							clear(mirror[off : off+n])
						case 1:
							buf := make([]byte, n)
							if err := c.ReadAt(t.Context(), buf, off); err != nil {
								errs <- err
								return
							}
						default:
							p := pattern(int(n), uint64(w*1000+i))
							if err := c.WriteAt(t.Context(), p, off, 0); err != nil {
								errs <- err
								return
							}
							copy(mirror[off:], p)
						}
					}
				}(w)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			equalOrFail(t, "after parallel writes", readAll(t, c), mirror)
			finishImage(t, g, img, mirror)
		})
	}
}
