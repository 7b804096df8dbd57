package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"blockd/internal/testutil"
)

// streamChain makes base ← mid ← top, qcow2 images of size bytes: base
// holds 0x11 in its first half, mid 0x22 from a quarter to three
// quarters, top 0x33 in its first eighth; it returns the paths and what
// the top reads.
func streamChain(t *testing.T, dir string, size int) (base, mid, top string, model []byte) {
	t.Helper()
	base, mid, top = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P 0x11 0 %d", size/2), base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P 0x22 %d %d", size/4, size/2), mid)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P 0x33 0 %d", size/8), top)
	model = make([]byte, size)
	fill := func(b byte, off, n int) { copy(model[off:off+n], bytes.Repeat([]byte{b}, n)) }
	fill(0x11, 0, size/2)
	fill(0x22, size/4, size/2)
	fill(0x33, 0, size/8)
	return
}

// waitCompleted waits for BLOCK_JOB_COMPLETED and returns its data.
func waitCompleted(t *testing.T, evs <-chan qmp.Event) map[string]any {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case ev := <-evs:
			if ev.Event == "BLOCK_JOB_COMPLETED" {
				return ev.Data
			}
		case <-deadline:
			t.Fatal("no BLOCK_JOB_COMPLETED")
		}
	}
}

// TestStreamUnderLoad streams the intermediate image of a 3-image qcow2
// chain into its exported top (block-stream with base) while four NBD
// clients write and read back through the export: no request fails,
// every read sees the last write, the copy never overwrites a client's
// write, and afterwards qemu-img finds the top clean, reading what the
// clients and the chain left, with the base as its backing file.
func TestStreamUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 16 << 20
	base, _, top, model := streamChain(t, d.dir, size)
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}})
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "top", "name": "disk", "writable": true})
	evs := d.subscribe()

	stopLoad := loadClients(t, sock, model, 0)
	time.Sleep(100 * time.Millisecond)
	// 8 MiB/s: the copy of the 12 MiB the top lacks takes over a second.
	d.must("block-stream", map[string]any{"job-id": "s", "device": "top", "base": base, "speed": 8 << 20})
	completed := waitCompleted(t, evs)
	for _, err := range stopLoad() {
		t.Error(err)
	}
	if e, ok := completed["error"]; ok || completed["offset"] != float64(size) || completed["len"] != float64(size) {
		t.Fatalf("BLOCK_JOB_COMPLETED %v (error %v)", completed, e)
	}
	if t.Failed() {
		return
	}
	got := readExport(t, sock, size)
	if !bytes.Equal(got, model) {
		t.Fatal("the export does not read what the chain and its clients hold")
	}
	// The intermediate image is gone from the graph; the base stays.
	var names []string
	for _, n := range d.nodes() {
		names = append(names, n.File)
	}
	if s := strings.Join(names, " "); strings.Contains(s, "mid.qcow2") || !strings.Contains(s, "base.qcow2") {
		t.Errorf("nodes after the stream: %s", s)
	}
	d.must("block-export-del", map[string]any{"id": "e0"})
	d.stop()

	testutil.Run(t, "qemu-img", "check", "-q", top)
	info := testutil.Run(t, "qemu-img", "info", "--output=json", "-U", top)
	var ii struct {
		Backing string `json:"backing-filename"`
		Format  string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal([]byte(info), &ii); err != nil {
		t.Fatal(err)
	}
	if ii.Backing != base || ii.Format != "qcow2" {
		t.Errorf("top's backing file after the stream: %q (%q), want %q (qcow2)", ii.Backing, ii.Format, base)
	}
	compareModel(t, d.dir, model, top)
	// Without the mid image the top still reads the same: it holds all
	// that mid held.
	if err := os.Remove(filepath.Join(d.dir, "mid.qcow2")); err != nil {
		t.Fatal(err)
	}
	compareModel(t, d.dir, model, top)
}

// TestStreamWholeChain streams a whole chain into its top (no base): the
// top stands alone afterwards, with no backing file in its header.
func TestStreamWholeChain(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 4 << 20
	_, _, top, model := streamChain(t, d.dir, size)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}})
	evs := d.subscribe()
	d.must("block-stream", map[string]any{"job-id": "s", "device": "top"})
	if c := waitCompleted(t, evs); c["error"] != nil {
		t.Fatalf("BLOCK_JOB_COMPLETED %v", c)
	}
	if n := len(d.nodes()); n != 2 {
		t.Errorf("%d nodes after streaming the whole chain, want 2 (top and its file)", n)
	}
	d.stop()
	testutil.Run(t, "qemu-img", "check", "-q", top)
	info := testutil.Run(t, "qemu-img", "info", "--output=json", top)
	if strings.Contains(info, "backing-filename") {
		t.Errorf("top still has a backing file: %s", info)
	}
	os.Remove(filepath.Join(d.dir, "mid.qcow2"))
	os.Remove(filepath.Join(d.dir, "base.qcow2"))
	compareModel(t, d.dir, model, top)
}

// TestStreamSIGKILL kills blockd in the middle of a stream: the top is
// clean for qemu-img check and, with its header still naming the
// intermediate image, the chain reads what it read before the stream.
func TestStreamSIGKILL(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 32 << 20
	_, mid, top, model := streamChain(t, d.dir, size)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}})
	d.must("block-stream", map[string]any{"job-id": "s", "device": "top", "speed": 8 << 20})
	killAtOffset(t, d, size/4)

	testutil.Run(t, "qemu-img", "check", "-q", top)
	info := testutil.Run(t, "qemu-img", "info", "--output=json", top)
	if !strings.Contains(info, mid) {
		t.Errorf("the header no longer names the intermediate image: %s", info)
	}
	compareModel(t, d.dir, model, top)
}
