package graph_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"blockd/graph"
)

// benchMem is a MemNode with a request alignment, for the validation-layer
// benchmarks (MemNode alone is byte-granular).
type benchMem struct {
	*graph.MemNode
	align int64
}

func (m *benchMem) Limits() graph.Limits { return graph.Limits{Align: m.align} }

// benchChild opens a 64 MiB in-memory node with the given alignment and
// returns a writable backend edge to it: what an NBD export holds.
func benchChild(b testing.TB, align int64) *graph.Child {
	b.Helper()
	mem := &graph.Driver{
		Name:     "benchmem",
		Protocol: true,
		Options:  func() any { return new(memOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			return &benchMem{MemNode: graph.NewMemNode(v.(*memOpts).Size), align: align}, nil
		},
	}
	g := graph.New(nil, mem)
	if _, err := g.Add(context.Background(), map[string]any{"driver": "benchmem", "node-name": "m", "size": json.Number("67108864")}, false); err != nil {
		b.Fatal(err)
	}
	c, err := g.NewBackend("m", "bench", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.ReleaseBackend(c); g.Close() })
	// Touch all of the memory once so that no benchmark pays for it.
	fill := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(fill)) {
		if err := c.WriteAt(context.Background(), fill, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	return c
}

// BenchmarkChildIO measures 4 KiB requests through graph.Child, the one
// validation layer every request passes, on a MemNode: aligned requests
// (range and permission checks only) and requests one byte off the node's
// alignment (widened with read-modify-write). Offsets walk the node in
// 1 MiB steps so that the copies do not all hit one cache line.
func BenchmarkChildIO(b *testing.B) {
	ctx := context.Background()
	for _, align := range []int64{1, 512, 4096} {
		for _, tc := range []struct {
			name  string
			write bool
			skew  int64
		}{
			{"read/aligned", false, 0},
			{"read/unaligned", false, 1},
			{"write/aligned", true, 0},
			{"write/unaligned", true, 1},
		} {
			if align == 1 && tc.skew != 0 {
				continue // nothing is unaligned on a byte-granular node
			}
			b.Run(fmt.Sprintf("align%d/%s", align, tc.name), func(b *testing.B) {
				c := benchChild(b, align)
				p := make([]byte, 4096)
				b.SetBytes(int64(len(p)))
				b.ReportAllocs()
				i := int64(0)
				for b.Loop() {
					off := (i%63)<<20 + tc.skew
					i++
					var err error
					if tc.write {
						err = c.WriteAt(ctx, p, off, 0)
					} else {
						err = c.ReadAt(ctx, p, off)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkChildIOParallel issues the same 4 KiB requests from GOMAXPROCS
// goroutines on one node (align 512, as a LUKS node has), showing the cost
// of the read-modify-write lock: aligned writes share it, unaligned ones
// take it exclusively.
func BenchmarkChildIOParallel(b *testing.B) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		write bool
		skew  int64
	}{
		{"read/aligned", false, 0},
		{"write/aligned", true, 0},
		{"write/unaligned", true, 1},
	} {
		b.Run(tc.name, func(b *testing.B) {
			c := benchChild(b, 512)
			b.SetBytes(4096)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				p := make([]byte, 4096)
				i := int64(0)
				for pb.Next() {
					off := (i%63)<<20 + tc.skew
					i++
					var err error
					if tc.write {
						err = c.WriteAt(ctx, p, off, 0)
					} else {
						err = c.ReadAt(ctx, p, off)
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// TestUnalignedIONoAllocations checks that requests widened with
// read-modify-write take their bounce buffers from the pool: after a
// warm-up, unaligned reads and writes allocate nothing.
func TestUnalignedIONoAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops some buffers on purpose under the race detector")
	}
	ctx := context.Background()
	c := benchChild(t, 4096)
	p := make([]byte, 4096)
	for _, write := range []bool{false, true} {
		io := func() {
			var err error
			if write {
				err = c.WriteAt(ctx, p, 512, 0)
			} else {
				err = c.ReadAt(ctx, p, 512)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		io()
		if a := testing.AllocsPerRun(50, io); a != 0 {
			t.Errorf("write %v: %v allocations per unaligned request", write, a)
		}
	}
}
