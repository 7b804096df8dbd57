package qcow2_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/qcow2"
	"blockd/drivers/raw"
	"blockd/graph"
	"blockd/internal/testutil"
	"blockd/secrets"
)

// faultCtl decides which requests of a faulty node fail.
type faultCtl struct {
	mu                        sync.Mutex
	r                         *rand.Rand
	readPct, writePct, flushP int // failure chance in percent
	failed                    int
}

func (f *faultCtl) fail(pct int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if pct > 0 && f.r.IntN(100) < pct {
		f.failed++
		return true
	}
	return false
}

func (f *faultCtl) set(read, write, flush int) {
	f.mu.Lock()
	f.readPct, f.writePct, f.flushP = read, write, flush
	f.mu.Unlock()
}

// faultyOptions are the test driver's options.
type faultyOptions struct {
	File graph.Ref `json:"file"`
}

var faults sync.Map // node name → *faultCtl

// faultyDriver passes requests to its file child, failing some with EIO.
func faultyDriver() *graph.Driver {
	return &graph.Driver{
		Name:    "faulty",
		Options: func() any { return new(faultyOptions) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			c, err := o.Child(ctx, "file", &v.(*faultyOptions).File, graph.ChildSpec{Role: graph.RoleFiltered | graph.RolePrimary})
			if err != nil {
				return nil, err
			}
			ctl := &faultCtl{r: rand.New(rand.NewPCG(uint64(len(o.NodeName())), 9))}
			faults.Store(o.NodeName(), ctl)
			return &faultyNode{c: c, ctl: ctl}, nil
		},
	}
}

type faultyNode struct {
	c   *graph.Child
	ctl *faultCtl
}

var errInjected = fmt.Errorf("injected: %w", syscall.EIO)

func (n *faultyNode) ReadAt(ctx context.Context, p []byte, off int64) error {
	if n.ctl.fail(n.ctl.readPct) {
		return errInjected
	}
	return n.c.ReadAt(ctx, p, off)
}

func (n *faultyNode) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	if n.ctl.fail(n.ctl.writePct) {
		// Sometimes half the write lands.
		if len(p) > 1 && n.ctl.fail(50) {
			_ = n.c.WriteAt(ctx, p[:len(p)/2], off, f)
		}
		return errInjected
	}
	return n.c.WriteAt(ctx, p, off, f)
}

func (n *faultyNode) Flush(ctx context.Context) error {
	if n.ctl.fail(n.ctl.flushP) {
		return errInjected
	}
	return n.c.Flush(ctx)
}

func (n *faultyNode) Size() int64  { return n.c.Size() }
func (n *faultyNode) Close() error { return nil }
func (n *faultyNode) TruncatePrealloc(ctx context.Context, size int64, m graph.Prealloc) error {
	return n.c.Truncate(ctx, size, m)
}
func (n *faultyNode) Discard(ctx context.Context, off, l int64) error {
	return n.c.Discard(ctx, off, l)
}

func faultGraph(t *testing.T) *graph.Graph {
	st := &secrets.Store{}
	pass := testPass
	if err := st.Add(secrets.Options{ID: "sec0", Data: &pass}); err != nil {
		t.Fatal(err)
	}
	g := graph.New(st, file.Driver(), raw.Driver(), luks.Driver(), qcow2.Driver(), faultyDriver())
	t.Cleanup(g.Close)
	return g
}

// TestFaultInjection runs a workload while the image file fails reads,
// writes (sometimes half-done) and flushes at random. Failed requests
// report errors; afterwards the image has no corruption (leaks are
// allowed) and every byte no failed request touched is right.
func TestFaultInjection(t *testing.T) {
	for _, cfg := range []string{``, `,"cluster-size":4096`, `,"extended-l2":true`, `,"lazy-refcounts":true`} {
		t.Run(cfg, func(t *testing.T) {
			const size = 4 << 20
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, cfg))
			g := faultGraph(t)
			add(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"img","discard":"unmap","file":{"driver":"faulty","node-name":"flt","file":{"driver":"file","filename":%q}}}`, img))
			c := backend(t, g, "img", true)
			v, _ := faults.Load("flt")
			ctl := v.(*faultCtl)
			var cs int64 = 65536
			if in := g.Lookup("img").Node().(graph.Infoer).Info(); in.ClusterSize > 0 {
				cs = in.ClusterSize
			}
			w := &workload{c: c, mirror: make([]byte, size), cs: cs, r: rand.New(rand.NewPCG(5, uint64(len(cfg))))}
			uncertain := make([]bool, size)
			ctl.set(3, 3, 10)
			errs := 0
			for i := 0; i < scaled(1500, 500); i++ {
				o := w.next(i)
				var err error
				switch o.kind {
				case 0:
					err = c.WriteAt(t.Context(), o.data, o.off, o.flags)
				case 1:
					err = c.WriteZeroes(t.Context(), o.off, o.n, o.flags)
				case 2:
					err = c.Discard(t.Context(), o.off, o.n)
				case 3:
					err = c.Flush(t.Context())
				case 4:
					buf := make([]byte, o.n)
					if err = c.ReadAt(t.Context(), buf, o.off); err == nil {
						for j := range buf {
							if !uncertain[o.off+int64(j)] && buf[j] != w.mirror[o.off+int64(j)] {
								t.Fatalf("op %d: read %d+%d differs at %d", i, o.off, o.n, o.off+int64(j))
							}
						}
					}
				}
				if err != nil {
					if errors.Is(err, graph.ErrCorrupt) {
						t.Fatalf("op %d: I/O errors were taken for corruption: %v", i, err)
					}
					if !errors.Is(err, syscall.EIO) {
						t.Fatalf("op %d: unexpected error %v", i, err)
					}
					errs++
					if s, e := w.touched(o); e > s {
						for j := s; j < e; j++ {
							uncertain[j] = true
						}
					}
					continue
				}
				w.mirrorOp(o)
				if s, e := w.touched(o); e > s {
					for j := s; j < e; j++ {
						uncertain[j] = false
					}
				}
			}
			if errs == 0 || ctl.failed == 0 {
				t.Fatal("no faults injected")
			}
			ctl.set(0, 0, 0)
			if err := c.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			g.Close()
			testutil.NeedTool(t, "qemu-img")
			if out, err := exec.Command("qemu-img", "check", img).CombinedOutput(); err != nil {
				if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
					t.Fatalf("qemu-img check: %v\n%s", err, out)
				}
			}
			got := qemuRaw(t, img)
			for j := range got {
				if !uncertain[j] && got[j] != w.mirror[j] {
					t.Fatalf("byte %d: %#x, want %#x (%d injected errors)", j, got[j], w.mirror[j], errs)
				}
			}
		})
	}
}
