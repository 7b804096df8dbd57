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

// BenchmarkSequentialStatusRead is what the NBD server does for a
// sequential copy of a raw image (nbdcopy): for every 256 KiB READ it asks
// for the block status of the range, then reads it. The file is 256 MiB of
// data on /dev/shm when there is one: on tmpfs each SEEK_HOLE walks the
// page cache up to the next hole, here the end of the file, so without the
// node's data-extent cache a pass over the file costs time quadratic in
// its size. "status" leaves the read out.
func BenchmarkSequentialStatusRead(b *testing.B) {
	const size, req = 256 << 20, 256 << 10
	dir := b.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "blockd-file-bench")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	p := filepath.Join(dir, "dense.img")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{1}).Read(chunk)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	ctx := context.Background()
	for _, read := range []bool{false, true} {
		name := "status"
		if read {
			name = "status+read"
		}
		b.Run(name, func(b *testing.B) {
			g := newGraph()
			defer g.Close()
			addNode(b, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
			c, err := g.NewBackend("n", "bench", graph.PermRead, graph.PermAll)
			if err != nil {
				b.Fatal(err)
			}
			defer g.ReleaseBackend(c)
			buf := make([]byte, req)
			b.SetBytes(req)
			b.ReportAllocs()
			off := int64(0)
			for b.Loop() {
				ext, err := c.BlockStatus(ctx, off, req)
				if err != nil || len(ext) != 1 || ext[0].Flags != 0 || ext[0].Length != req {
					b.Fatalf("status at %d: %v %v", off, ext, err)
				}
				if read {
					if err := c.ReadAt(ctx, buf, off); err != nil {
						b.Fatal(err)
					}
				}
				off = (off + req) % size
			}
		})
	}
}
