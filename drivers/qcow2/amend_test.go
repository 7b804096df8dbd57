package qcow2_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"blockd/drivers/qcow2"
	"blockd/graph"
)

type imageAmender interface {
	AmendImage(ctx context.Context, a *qcow2.ImageAmend, force bool) error
}

// TestAmendWhileOpen changes the refcount width, the lazy refcounts and
// the version of an open image between random workloads: the image keeps
// working with its new layout, and qemu-img finds it clean with the
// mirror's contents.
func TestAmendWhileOpen(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.qcow2")
	const size = 6 << 20
	blockdevCreate(t, img, fmt.Sprintf(`,"size":%d,"cluster-size":4096`, size))
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
	am := g.Lookup("img").Node().(imageAmender)
	w := &workload{c: c, mirror: make([]byte, size), cs: 4096, r: rand.New(rand.NewPCG(5, 5))}
	step := 0
	run := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			w.step(t, t.Context(), step)
			step++
		}
	}
	ops := scaled(400, 150)
	tr, fa := true, false
	for _, a := range []qcow2.ImageAmend{
		{RefcountBits: 2},
		{RefcountBits: 64, LazyRefcounts: &tr},
		{LazyRefcounts: &fa, RefcountBits: 16},
		{Size: size - 1<<20 - 512},
		{Size: size + 2<<20},
		{Version: 2},
	} {
		run(ops)
		if err := am.AmendImage(t.Context(), &a, false); err != nil {
			t.Fatalf("amend %+v: %v", a, err)
		}
		if a.Size != 0 {
			w.mirror = append(w.mirror[:min(a.Size, int64(len(w.mirror)))], make([]byte, max(a.Size-int64(len(w.mirror)), 0))...)
		}
		if a.Version == 2 {
			w.v2 = true
		}
		equalOrFail(t, fmt.Sprintf("after amend %+v", a), readAll(t, c), w.mirror)
		selfChecked(t, g.Lookup("img").Node().(snapshotter), fmt.Sprintf("after amend %+v", a))
	}
	run(ops)
	if in := g.Lookup("img").Node().(graph.Infoer).Info(); in.FormatSpecific == nil {
		t.Fatal("no format-specific info")
	}
	finishImage(t, g, img, w.mirror)
	out := qemuImg(t, "info", img)
	if want := "compat: 0.10"; !strings.Contains(out, want) {
		t.Fatalf("qemu-img info lacks %q:\n%s", want, out)
	}
}
