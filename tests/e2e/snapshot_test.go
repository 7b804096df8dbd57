package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

// TestSnapshotUnderLoad takes an external snapshot (blockdev-snapshot) of
// an exported qcow2 disk while NBD clients connected across it write and
// read back: no request fails, every read sees the last write, writes made
// before the snapshot stay in the base image and those after it land in
// the overlay, and qemu-img finds both images clean and the chain equal to
// what the clients wrote.
func TestSnapshotUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	d := start(t)
	const size = 16 << 20
	base, ov := filepath.Join(d.dir, "base.qcow2"), filepath.Join(d.dir, "ov.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P 0x11 0 %d", size), base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2", ov, fmt.Sprint(size))
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "base", "file": map[string]any{"driver": "file", "filename": base}})
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "base", "name": "disk", "writable": true})

	model := bytes.Repeat([]byte{0x11}, size)
	c, err := harness.DialNBD("unix", sock, "disk")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Region A (first MiB) is written before the snapshot.
	a := bytes.Repeat([]byte{0x22}, 1<<20)
	if err := c.WriteAt(a, 0, false); err != nil {
		t.Fatal(err)
	}
	copy(model, a)

	// Region B (MiB 2-10): four clients write and read back their own
	// 2 MiB slices, in 4 KiB to 64 KiB pieces, across the snapshot.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var mu sync.Mutex // protects model
	errs := make(chan error, 4)
	var clients []*harness.NBD
	for w := 0; w < 4; w++ {
		cw, err := harness.DialNBD("unix", sock, "disk")
		if err != nil {
			t.Fatal(err)
		}
		defer cw.Close()
		clients = append(clients, cw)
		wg.Add(1)
		go func(w int, cw *harness.NBD) {
			defer wg.Done()
			lo := int64(2<<20 + w*(2<<20))
			for i := 0; !stop.Load(); i++ {
				n := int64(4096 << (i % 5))
				off := lo + (int64(i)*69632)%(2<<20-n)
				off &^= 4095
				buf := bytes.Repeat([]byte{byte(0x40 + w*16 + i%16)}, int(n))
				if err := cw.WriteAt(buf, uint64(off), i%7 == 0); err != nil {
					errs <- fmt.Errorf("client %d write %d+%d: %v", w, off, n, err)
					return
				}
				mu.Lock()
				copy(model[off:], buf)
				mu.Unlock()
				got := make([]byte, n)
				if err := cw.ReadAt(got, uint64(off)); err != nil {
					errs <- fmt.Errorf("client %d read %d+%d: %v", w, off, n, err)
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- fmt.Errorf("client %d read %d+%d back wrong", w, off, n)
					return
				}
			}
		}(w, cw)
	}
	time.Sleep(200 * time.Millisecond)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "ov", "backing": nil, "file": map[string]any{"driver": "file", "filename": ov}})
	d.must("blockdev-snapshot", map[string]any{"node": "base", "overlay": "ov"})
	time.Sleep(200 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	for _, cw := range clients {
		cw.Close()
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	// Region C (MiB 12-13) is written after the snapshot.
	cc := bytes.Repeat([]byte{0x33}, 1<<20)
	if err := c.WriteAt(cc, 12<<20, true); err != nil {
		t.Fatal(err)
	}
	copy(model[12<<20:], cc)
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if err := c.ReadAt(got[off:off+1<<20], uint64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the export does not read what its clients wrote")
	}
	c.Close()
	d.must("block-export-del", map[string]any{"id": "e0"})
	d.stop()

	testutil.Run(t, "qemu-img", "check", "-q", base)
	testutil.Run(t, "qemu-img", "check", "-q", ov)
	compareModel(t, d.dir, model, ov)
	// Before the snapshot: in the base; after: only in the overlay.
	baseRaw := filepath.Join(d.dir, "base.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", base, baseRaw)
	b, _ := os.ReadFile(baseRaw)
	if !bytes.Equal(b[:1<<20], a) {
		t.Error("region written before the snapshot is not in the base image")
	}
	if !bytes.Equal(b[12<<20:13<<20], bytes.Repeat([]byte{0x11}, 1<<20)) {
		t.Error("a write made after the snapshot reached the base image")
	}
}
