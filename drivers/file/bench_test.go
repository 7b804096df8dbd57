package file

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"blockd/graph"
)

// 4 KiB random I/O through a graph backend (validation layer included),
// buffered and O_DIRECT, with the caller's buffer aligned in memory or not
// (the latter goes through a bounce buffer under O_DIRECT).

const benchSize = 64 << 20

func benchBackend(b *testing.B, direct bool) *graph.Child {
	b.Helper()
	p := filepath.Join(b.TempDir(), "bench.img")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{}).Read(chunk)
	for off := int64(0); off < benchSize; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	g := newGraph()
	b.Cleanup(g.Close)
	addNode(b, g, `{"driver":"file","node-name":"n","filename":%s,"cache":{"direct":%v}}`, q(p), direct)
	c, err := g.NewBackend("n", "bench", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.ReleaseBackend(c) })
	return c
}

func benchRandom(b *testing.B, write bool) {
	ctx := context.Background()
	for _, mode := range []struct {
		name      string
		direct    bool
		unaligned bool
	}{
		{"buffered", false, false},
		{"direct", true, false},
		{"direct-unaligned-buf", true, true},
	} {
		b.Run(mode.name, func(b *testing.B) {
			c := benchBackend(b, mode.direct)
			var seed atomic.Uint64
			b.ReportAllocs()
			b.SetBytes(4096)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := alignedBuf(4096+64, 4096)
				if mode.unaligned {
					buf = buf[64:]
				} else {
					buf = buf[:4096]
				}
				r := rand.New(rand.NewPCG(seed.Add(1), 0))
				for pb.Next() {
					off := r.Int64N(benchSize/4096) * 4096
					var err error
					if write {
						err = c.WriteAt(ctx, buf, off, 0)
					} else {
						err = c.ReadAt(ctx, buf, off)
					}
					if err != nil {
						panic(fmt.Sprint(err))
					}
				}
			})
		})
	}
}

func BenchmarkRandRead4K(b *testing.B)  { benchRandom(b, false) }
func BenchmarkRandWrite4K(b *testing.B) { benchRandom(b, true) }
