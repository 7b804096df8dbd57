package qcow2_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"blockd/drivers/qcow2"
	"blockd/graph"
)

type compressedWriter interface {
	WriteCompressed(ctx context.Context, p []byte, off int64) error
}

// compressible returns a cluster of text-like data that deflates well.
func compressible(n int, seed int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %d of cluster %d\n", i%17, seed)
	}
	return b.Bytes()[:n]
}

// TestCompressedWrites writes clusters compressed from several goroutines
// (compressible ones packed into shared host clusters, incompressible
// ones written normally), overwrites some, runs a random workload over
// the result, and has qemu-img check and compare the image. The image
// size is not a multiple of the cluster size, so the last cluster is a
// short compressed write.
func TestCompressedWrites(t *testing.T) {
	for _, tc := range []struct{ name, create string }{
		{"zlib-4k", `,"cluster-size":4096`},
		{"zlib-64k", ``},
		{"zstd-8k", `,"cluster-size":8192,"compression-type":"zstd"`},
		{"zlib-extl2", `,"cluster-size":65536,"extended-l2":true`},
		{"refcount1", `,"cluster-size":4096,"refcount-bits":1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "c.qcow2")
			const size = 6<<20 + 2048
			blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, tc.create))
			g, _ := newGraph(t)
			c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			cw := g.Lookup("img").Node().(compressedWriter)
			cs := g.Lookup("img").Node().(graph.Infoer).Info().ClusterSize
			mirror := make([]byte, size)
			nc := (int64(size) + cs - 1) / cs
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for w := int64(0); w < 4; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := w; i < nc; i += 4 {
						if i%5 == 3 {
							continue // left unallocated
						}
						off := i * cs
						n := min(cs, size-off)
						p := compressible(int(n), int(i))
						if i%7 == 0 {
							p = pattern(int(n), uint64(i)) // does not shrink
						}
						copy(mirror[off:], p)
						if err := cw.WriteCompressed(t.Context(), p, off); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			equalOrFail(t, "after compressed writes", readAll(t, c), mirror)
			// Overwrite some compressed clusters compressed again.
			for i := int64(1); i < nc; i += 9 {
				off := i * cs
				n := min(cs, size-off)
				p := compressible(int(n), int(i)+1000)
				copy(mirror[off:], p)
				if err := cw.WriteCompressed(t.Context(), p, off); err != nil {
					t.Fatal(err)
				}
			}
			// Unaligned and out-of-range requests are refused.
			if err := cw.WriteCompressed(t.Context(), make([]byte, cs), 512); err == nil {
				t.Fatal("unaligned compressed write accepted")
			}
			if err := c.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			r, err := g.Lookup("img").Node().(interface {
				Check(context.Context, int) (*qcow2.CheckReport, error)
			}).Check(t.Context(), 0)
			if err != nil {
				t.Fatal(err)
			}
			if r.Corruptions != 0 || r.Leaks != 0 || r.CompressedClusters == 0 {
				t.Fatalf("check after compressed writes: %+v", r)
			}
			// A random workload over compressed clusters.
			w := &workload{c: c, mirror: mirror, cs: cs, r: rand.New(rand.NewPCG(uint64(cs), 7))}
			for i := 0; i < scaled(1500, 300); i++ {
				w.step(t, t.Context(), i)
			}
			equalOrFail(t, "after workload", readAll(t, c), w.mirror)
			finishImage(t, g, img, w.mirror)
		})
	}
}
