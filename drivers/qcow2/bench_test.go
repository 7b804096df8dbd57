package qcow2

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"blockd/graph"
)

// memDriver is a test protocol driver over graph.MemNode, so benchmarks
// measure the qcow2 layer and not the file system.
func memDriver() *graph.Driver {
	type opts struct {
		Size     int64 `json:"size"`
		Capacity int64 `json:"capacity"`
	}
	return &graph.Driver{
		Name:     "mem",
		Options:  func() any { return new(opts) },
		Protocol: true,
		Open: func(ctx context.Context, _ *graph.Opener, v any) (graph.Node, error) {
			o := v.(*opts)
			// Reserve the capacity so that growing does not copy.
			n := graph.NewMemNode(max(o.Size, o.Capacity))
			return n, n.Truncate(ctx, o.Size)
		},
	}
}

func benchTree(b *testing.B, s string) map[string]any {
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v map[string]any
	if err := d.Decode(&v); err != nil {
		b.Fatal(err)
	}
	return v
}

// benchImage creates a qcow2 image of size bytes on a memory node and
// returns the qcow2 node's image and a backend.
func benchImage(b *testing.B, size int64, create string) (*image, *graph.Child) {
	b.Helper()
	g := graph.New(nil, memDriver(), Driver())
	b.Cleanup(g.Close)
	ctx := context.Background()
	if _, err := g.Add(ctx, benchTree(b, `{"driver":"mem","node-name":"m","size":0,"capacity":`+itoa(size+size/8+(4<<20))+`}`), false); err != nil {
		b.Fatal(err)
	}
	if err := g.Create(ctx, benchTree(b, `{"driver":"qcow2","file":"m","size":`+itoa(size)+create+`}`)); err != nil {
		b.Fatal(err)
	}
	if _, err := g.Add(ctx, benchTree(b, `{"driver":"qcow2","node-name":"q","file":"m"}`), false); err != nil {
		b.Fatal(err)
	}
	c, err := g.NewBackend("q", "bench", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.ReleaseBackend(c) })
	return g.Lookup("q").Node().(*node).image, c
}

func itoa(v int64) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// fill allocates every cluster.
func fill(b *testing.B, c *graph.Child, size int64) {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := c.WriteAt(context.Background(), buf, off, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLookup measures mapping a guest offset to its host cluster
// through the cached L1/L2 tables.
func BenchmarkLookup(b *testing.B) {
	const size = 256 << 20
	m, c := benchImage(b, size, "")
	fill(b, c, size)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(1, 2))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := r.Int64N(size/4096) * 4096
		if _, err := m.mapRun(ctx, off, 4096); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRead4k reads random allocated 4 KiB blocks.
func BenchmarkRead4k(b *testing.B) {
	const size = 256 << 20
	_, c := benchImage(b, size, "")
	fill(b, c, size)
	ctx := context.Background()
	buf := make([]byte, 4096)
	r := rand.New(rand.NewPCG(1, 2))
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.ReadAt(ctx, buf, r.Int64N(size/4096)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteInPlace overwrites random allocated 4 KiB blocks.
func BenchmarkWriteInPlace(b *testing.B) {
	const size = 256 << 20
	_, c := benchImage(b, size, "")
	fill(b, c, size)
	ctx := context.Background()
	buf := make([]byte, 4096)
	r := rand.New(rand.NewPCG(1, 2))
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.WriteAt(ctx, buf, r.Int64N(size/4096)*4096, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAllocate writes whole new clusters sequentially: cluster
// allocation, refcount and L2 updates.
func BenchmarkAllocate(b *testing.B) {
	for _, cfg := range []struct{ name, create string }{{"64k", ""}, {"4k", `,"cluster-size":4096`}} {
		b.Run(cfg.name, func(b *testing.B) {
			cs := int64(65536)
			if cfg.name == "4k" {
				cs = 4096
			}
			size := max(int64(b.N)*cs, 1<<20)
			_, c := benchImage(b, size, cfg.create)
			ctx := context.Background()
			buf := make([]byte, cs)
			b.SetBytes(cs)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := c.WriteAt(ctx, buf, int64(i)*cs, 0); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if err := c.Flush(ctx); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkAllocateCOW writes 4 KiB into new 64 KiB clusters (copy-on-write
// of the rest of each cluster).
func BenchmarkAllocateCOW(b *testing.B) {
	const cs = 65536
	size := max(int64(b.N)*cs, 1<<20)
	_, c := benchImage(b, size, "")
	ctx := context.Background()
	buf := make([]byte, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.WriteAt(ctx, buf, int64(i)*cs+8192, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParallelWrite overwrites random blocks from several goroutines.
func BenchmarkParallelWrite(b *testing.B) {
	const size = 256 << 20
	_, c := benchImage(b, size, "")
	fill(b, c, size)
	ctx := context.Background()
	var seed sync.Mutex
	n := uint64(0)
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		seed.Lock()
		n++
		r := rand.New(rand.NewPCG(n, 3))
		seed.Unlock()
		buf := make([]byte, 4096)
		for pb.Next() {
			if err := c.WriteAt(ctx, buf, r.Int64N(size/4096)*4096, 0); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
