package qcow2_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"blockd/drivers/qcow2"
	"blockd/graph"
)

type snapshotter interface {
	CreateSnapshot(ctx context.Context, name string, date time.Time) error
	ApplySnapshot(ctx context.Context, name string) error
	DeleteSnapshot(ctx context.Context, name string) error
	Check(ctx context.Context, fix int) (*qcow2.CheckReport, error)
}

// snapshotContents converts one snapshot to raw with qemu-img.
func snapshotContents(t *testing.T, img, name string) []byte {
	t.Helper()
	return qemuRaw(t, "-l", "snapshot.name="+name, img)
}

// selfChecked runs the node's own check and fails on any problem.
func selfChecked(t *testing.T, s snapshotter, what string) {
	t.Helper()
	r, err := s.Check(t.Context(), 0)
	if err != nil {
		t.Fatalf("%s: check: %v", what, err)
	}
	if r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("%s: check: %+v", what, r)
	}
}

// TestSnapshots takes internal snapshots between random workloads (so
// writes copy shared clusters and L2 tables), reverts to one, deletes
// them, and checks the image and every snapshot's contents with
// qemu-img after each stage.
func TestSnapshots(t *testing.T) {
	for _, tc := range []struct{ name, create string }{
		{"c4k", `,"cluster-size":4096`},
		{"c64k-extl2", `,"cluster-size":65536,"extended-l2":true`},
		{"refcount2", `,"cluster-size":4096,"refcount-bits":2`},
		{"v2", `,"cluster-size":8192,"version":"v2"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "s.qcow2")
			const size = 8<<20 + 4096
			blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, tc.create))
			g, _ := newGraph(t)
			c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			sn := g.Lookup("img").Node().(snapshotter)
			cs := g.Lookup("img").Node().(graph.Infoer).Info().ClusterSize
			w := &workload{c: c, mirror: make([]byte, size), cs: cs, r: rand.New(rand.NewPCG(uint64(cs), 3)), v2: strings.Contains(tc.create, "v2")}
			ops := scaled(400, 150)
			step := 0
			run := func(n int) {
				for i := 0; i < n; i++ {
					w.step(t, t.Context(), step)
					step++
				}
			}
			saved := map[string][]byte{}
			run(ops)
			for _, name := range []string{"a", "b"} {
				if err := sn.CreateSnapshot(t.Context(), name, time.Unix(1700000000, 5000)); err != nil {
					t.Fatalf("create %s: %v", name, err)
				}
				saved[name] = slices.Clone(w.mirror)
				selfChecked(t, sn, "after create "+name)
				run(ops)
			}
			equalOrFail(t, "active", readAll(t, c), w.mirror)
			list := g.Lookup("img").Node().(graph.Infoer).Info().Snapshots
			if len(list) != 2 || list[0].Name != "a" || list[1].ID != "2" || list[0].DateSec != 1700000000 {
				t.Fatalf("snapshots: %+v", list)
			}
			g.Close()
			checkClean(t, img)
			for name, want := range saved {
				equalOrFail(t, "snapshot "+name, snapshotContents(t, img, name), want)
			}
			// Revert to a, work on, delete both.
			g, _ = newGraph(t)
			c = openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			sn = g.Lookup("img").Node().(snapshotter)
			if err := sn.ApplySnapshot(t.Context(), "a"); err != nil {
				if tc.name != "refcount2" || !strings.Contains(err.Error(), "refcount overflow") {
					t.Fatal(err)
				}
				// Three references are the most 2-bit refcounts hold: the
				// revert stops half way, leaving leaks and nothing worse.
				r, err := sn.Check(t.Context(), 0)
				if err != nil || r.Corruptions != 0 {
					t.Fatalf("check after a failed revert: %+v, %v", r, err)
				}
				if r, err = sn.Check(t.Context(), qcow2.FixLeaks); err != nil || r.Corruptions != 0 {
					t.Fatalf("repair after a failed revert: %+v, %v", r, err)
				}
				selfChecked(t, sn, "after repair")
				finishImage(t, g, img, w.mirror)
				return
			}
			w.c, w.mirror = c, slices.Clone(saved["a"])
			equalOrFail(t, "after apply", readAll(t, c), w.mirror)
			selfChecked(t, sn, "after apply")
			run(ops)
			if err := sn.ApplySnapshot(t.Context(), "nosuch"); err == nil {
				t.Fatal("applied a missing snapshot")
			}
			if err := sn.DeleteSnapshot(t.Context(), "1"); err != nil { // a, by ID
				t.Fatal(err)
			}
			selfChecked(t, sn, "after delete a")
			run(ops / 2)
			g.Close()
			checkClean(t, img)
			equalOrFail(t, "snapshot b after deleting a", snapshotContents(t, img, "b"), saved["b"])
			g, _ = newGraph(t)
			c = openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			sn = g.Lookup("img").Node().(snapshotter)
			w.c = c
			if err := sn.DeleteSnapshot(t.Context(), "b"); err != nil {
				t.Fatal(err)
			}
			run(ops / 2)
			equalOrFail(t, "final", readAll(t, c), w.mirror)
			finishImage(t, g, img, w.mirror)
		})
	}
}

// TestSnapshotUnderLoad creates and deletes snapshots while other
// goroutines write: every request waits for the snapshot operation, and
// the data each writer last wrote is what the image holds.
func TestSnapshotUnderLoad(t *testing.T) {
	img := filepath.Join(t.TempDir(), "l.qcow2")
	const size = 4 << 20
	blockdevCreate(t, img, fmt.Sprintf(`,"size":%d,"cluster-size":4096`, size))
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	sn := g.Lookup("img").Node().(snapshotter)
	mirror := make([]byte, size)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for wr := 0; wr < 4; wr++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(wr), 9))
			region := int64(size / 4)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64(wr)*region + r.Int64N(region-8192)
				p := pattern(1+r.IntN(8191), uint64(i*4+wr))
				if err := c.WriteAt(t.Context(), p, off, 0); err != nil {
					t.Error(err)
					return
				}
				copy(mirror[off:], p)
			}
		}()
	}
	for i := 0; i < scaled(20, 6); i++ {
		if err := sn.CreateSnapshot(t.Context(), fmt.Sprintf("s%d", i), time.Now()); err != nil {
			t.Fatal(err)
		}
		if i >= 2 {
			if err := sn.DeleteSnapshot(t.Context(), fmt.Sprintf("s%d", i-2)); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	equalOrFail(t, "after load", readAll(t, c), mirror)
	g.Close()
	checkClean(t, img)
}

// TestDowngradeWithSnapshots turns a version 3 image with snapshots and
// zero clusters (shared between the snapshots and the active tables) into
// a version 2 image, with and without a backing file: qemu-img finds it
// clean and every snapshot keeps its contents.
func TestDowngradeWithSnapshots(t *testing.T) {
	for _, backed := range []bool{false, true} {
		t.Run(fmt.Sprintf("backing=%v", backed), func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "d.qcow2")
			const size = 4 << 20
			mirror := make([]byte, size)
			if backed {
				base := filepath.Join(dir, "base.raw")
				mkRaw(t, base, size, 21)
				qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096", img, fmt.Sprint(size))
				b, _ := os.ReadFile(base)
				copy(mirror, b)
			} else {
				blockdevCreate(t, img, fmt.Sprintf(`,"size":%d,"cluster-size":4096`, size))
			}
			g, _ := newGraph(t)
			c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
			node := g.Lookup("img").Node()
			w := &workload{c: c, mirror: mirror, cs: 4096, r: rand.New(rand.NewPCG(11, 12))}
			step := 0
			run := func(n int) {
				for i := 0; i < n; i++ {
					w.step(t, t.Context(), step)
					step++
				}
			}
			// Zero writes without unmap keep their clusters (zero flags
			// on allocated clusters, some shared).
			zeroSome := func(n int64) {
				for i := 0; i < 8; i++ {
					off := int64(w.r.IntN(size/4096)) * 4096
					if err := c.WriteZeroes(t.Context(), off, n, 0); err != nil {
						t.Fatal(err)
					}
					clear(w.mirror[off : off+n])
				}
			}
			saved := map[string][]byte{}
			for _, name := range []string{"a", "b"} {
				run(scaled(300, 120))
				zeroSome(8192)
				if err := node.(snapshotter).CreateSnapshot(t.Context(), name, time.Now()); err != nil {
					t.Fatal(err)
				}
				saved[name] = slices.Clone(w.mirror)
			}
			run(scaled(200, 80))
			zeroSome(4096)
			if err := node.(imageAmender).AmendImage(t.Context(), &qcow2.ImageAmend{Version: 2}, false); err != nil {
				t.Fatal(err)
			}
			equalOrFail(t, "after downgrade", readAll(t, c), w.mirror)
			g.Close()
			checkClean(t, img)
			if out := qemuImg(t, "info", img); !strings.Contains(out, "compat: 0.10") {
				t.Fatalf("not version 2:\n%s", out)
			}
			equalOrFail(t, "active", qemuRaw(t, img), w.mirror)
			for name, want := range saved {
				equalOrFail(t, "snapshot "+name, snapshotContents(t, img, name), want)
			}
		})
	}
}

// TestSnapshotDeleteDiscards checks pass-discard-snapshot: deleting a
// snapshot whose clusters nothing else uses gives their space back to the
// file system (the default), or keeps it with the option off.
func TestSnapshotDeleteDiscards(t *testing.T) {
	for _, pass := range []bool{true, false} {
		t.Run(fmt.Sprintf("pass=%v", pass), func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "d.qcow2")
			blockdevCreate(t, img, `,"size":8388608`)
			g, _ := newGraph(t)
			// The file child, defined inline, gets discard=unmap by
			// default, as in QEMU.
			c := openQcow2(t, g, "img", img, fmt.Sprintf(`,"pass-discard-snapshot":%v`, pass))
			sn := g.Lookup("img").Node().(snapshotter)
			if err := c.WriteAt(t.Context(), pattern(4<<20, 1), 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := sn.CreateSnapshot(t.Context(), "s", time.Now()); err != nil {
				t.Fatal(err)
			}
			// The snapshot keeps the old clusters; the image gets new ones.
			if err := c.WriteAt(t.Context(), pattern(4<<20, 2), 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			before := allocated(t, img)
			if err := sn.DeleteSnapshot(t.Context(), "s"); err != nil {
				t.Fatal(err)
			}
			after := allocated(t, img)
			if freed := before - after; pass && freed < 4<<20 || !pass && freed != 0 {
				t.Fatalf("deleting the snapshot freed %d bytes of the file (%d → %d)", freed, before, after)
			}
			g.Close()
			checkClean(t, img)
		})
	}
}

// allocated is the space a file takes on its file system.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
