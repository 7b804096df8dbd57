package luks_test

import (
	"context"
	"fmt"
	"testing"

	"blockd/drivers/luks"
	"blockd/graph"
	"blockd/internal/testutil"
	"blockd/secrets"
)

// benchMemOpts open an in-memory protocol node.
type benchMemOpts struct {
	Size int64 `json:"size"`
}

// benchDisk formats a 64 MiB in-memory node as LUKS (in process, with
// blockdev-create) and returns a writable backend edge to the luks node on
// it: the graph an NBD export of a luks image has, with memory in place of
// the file.
func benchDisk(b *testing.B, create string) *graph.Child {
	b.Helper()
	ctx := context.Background()
	pass := "bench pass"
	st := &secrets.Store{}
	if err := st.Add(secrets.Options{ID: "sec0", Data: &pass}); err != nil {
		b.Fatal(err)
	}
	mem := &graph.Driver{
		Name:     "benchmem",
		Protocol: true,
		Options:  func() any { return new(benchMemOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			return graph.NewMemNode(v.(*benchMemOpts).Size), nil
		},
	}
	g := graph.New(st, mem, luks.Driver())
	b.Cleanup(g.Close)
	if _, err := g.Add(ctx, testutil.Tree(b, `{"driver":"benchmem","node-name":"mem0","size":0}`), false); err != nil {
		b.Fatal(err)
	}
	drv, o, err := g.DecodeCreateOptions(testutil.Tree(b, `{"driver":"luks","file":"mem0","size":67108864,"key-secret":"sec0","iter-time":10,`+create+`}`))
	if err != nil {
		b.Fatal(err)
	}
	cc := g.NewCreateContext()
	if err := drv.Create(ctx, cc, o); err != nil {
		b.Fatal(err)
	}
	cc.Release()
	if _, err := g.Add(ctx, testutil.Tree(b, `{"driver":"luks","node-name":"disk","key-secret":"sec0","file":"mem0"}`), false); err != nil {
		b.Fatal(err)
	}
	c, err := g.NewBackend("disk", "bench", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { g.ReleaseBackend(c) })
	// Write the whole disk once so that no benchmark pays for the first
	// touch of the memory.
	fill := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(fill)) {
		if err := c.WriteAt(ctx, fill[:min(int64(len(fill)), c.Size()-off)], off, 0); err != nil {
			b.Fatal(err)
		}
	}
	return c
}

var benchFormats = []struct{ name, create string }{
	// What qemu-img create -f luks makes: LUKS1, aes-256-xts-plain64.
	{"luks1", `"luks-version":1`},
	// LUKS2 with 4 KiB encryption sectors.
	{"luks2-4k", `"luks-version":2,"pbkdf":"pbkdf2","sector-size":4096`},
}

// BenchmarkLUKSIO measures aligned reads and writes through the graph's
// validation layer into the luks data path (decrypt in place after the
// read; encrypt into a pooled buffer before the write), on memory, one
// request at a time.
func BenchmarkLUKSIO(b *testing.B) {
	ctx := context.Background()
	for _, f := range benchFormats {
		// One disk per format: creating and unlocking it runs PBKDF2.
		c := benchDisk(b, f.create)
		for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
			for _, write := range []bool{false, true} {
				op := "read"
				if write {
					op = "write"
				}
				b.Run(fmt.Sprintf("%s/%s/%dk", f.name, op, size>>10), func(b *testing.B) {
					p := make([]byte, size)
					span := c.Size()/int64(size) - 1
					b.SetBytes(int64(size))
					b.ReportAllocs()
					i := int64(0)
					for b.Loop() {
						off := (i * 7919 % span) * int64(size)
						i++
						var err error
						if write {
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
}

// BenchmarkLUKSIOParallel issues 4 KiB and 64 KiB requests from
// GOMAXPROCS goroutines on one luks node, as an NBD export's workers do.
func BenchmarkLUKSIOParallel(b *testing.B) {
	ctx := context.Background()
	c := benchDisk(b, benchFormats[0].create)
	for _, size := range []int{4 << 10, 64 << 10} {
		for _, write := range []bool{false, true} {
			op := "read"
			if write {
				op = "write"
			}
			b.Run(fmt.Sprintf("luks1/%s/%dk", op, size>>10), func(b *testing.B) {
				span := c.Size()/int64(size) - 1
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					p := make([]byte, size)
					i := int64(0)
					for pb.Next() {
						off := (i * 7919 % span) * int64(size)
						i++
						var err error
						if write {
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
}
