package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// addCommitChain adds the chain of streamChain as named, writable nodes
// base ← mid ← top, as a commit of mid into base needs them.
func addCommitChain(d *daemon, base, mid, top string) {
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "base", "file": map[string]any{"driver": "file", "filename": base}})
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "mid", "file": map[string]any{"driver": "file", "filename": mid}, "backing": "base"})
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}, "backing": "mid"})
}

// backingOf returns the backing file and format qemu-img finds in img.
func backingOf(t *testing.T, img string) (string, string) {
	t.Helper()
	var ii struct {
		Backing string `json:"backing-filename"`
		Format  string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal([]byte(testutil.Run(t, "qemu-img", "info", "--output=json", "-U", img)), &ii); err != nil {
		t.Fatal(err)
	}
	return ii.Backing, ii.Format
}

// TestCommitUnderLoad commits the intermediate image of a 3-image qcow2
// chain into its base (block-commit with top-node and base-node) while
// four NBD clients write and read back through the top's export: no
// request fails, every read sees the last write, and afterwards qemu-img
// finds both images clean, the top names the base as its backing file and
// reads what the chain and the clients left, without the intermediate
// image too.
func TestCommitUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 16 << 20
	base, mid, top, model := streamChain(t, d.dir, size)
	addCommitChain(d, base, mid, top)
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "top", "name": "disk", "writable": true})
	evs := d.subscribe()

	stopLoad := loadClients(t, sock, model, 0)
	time.Sleep(100 * time.Millisecond)
	// 8 MiB/s: the copy of the 8 MiB mid holds takes about a second.
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base", "speed": 8 << 20})
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
	// mid was added by the user: it stays, but nothing uses it and it
	// can go.
	d.must("blockdev-del", map[string]any{"node-name": "mid"})
	d.must("block-export-del", map[string]any{"id": "e0"})
	d.stop()

	testutil.Run(t, "qemu-img", "check", "-q", top)
	testutil.Run(t, "qemu-img", "check", "-q", base)
	if b, f := backingOf(t, top); b != base || f != "qcow2" {
		t.Errorf("top's backing file after the commit: %q (%q), want %q (qcow2)", b, f, base)
	}
	want := filepath.Join(d.dir, "model.raw")
	if err := os.WriteFile(want, model, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(mid); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", want, top)
}

// TestCommitBackingFile: backing-file is what the overlay's header names
// after the commit (here a name relative to the overlay's directory).
func TestCommitBackingFile(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 4 << 20
	base, mid, top, model := streamChain(t, d.dir, size)
	addCommitChain(d, base, mid, top)
	evs := d.subscribe()
	d.mustFail("block-commit", map[string]any{"job-id": "c", "device": "top", "top-node": "mid", "filter-node-name": "f"},
		"'filter-node-name' is not supported")
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "top-node": "mid", "backing-file": "base.qcow2"})
	if c := waitCompleted(t, evs); c["error"] != nil {
		t.Fatalf("BLOCK_JOB_COMPLETED %v", c)
	}
	d.stop()
	if b, f := backingOf(t, top); b != "base.qcow2" || f != "qcow2" {
		t.Errorf("top's backing file after the commit: %q (%q), want base.qcow2 (qcow2)", b, f)
	}
	os.Remove(mid)
	compareModel(t, d.dir, model, top)
}

// TestCommitSIGKILL kills blockd in the middle of a commit: both images
// are clean for qemu-img check and, with the top's header still naming
// the intermediate image, the chain reads what it read before (the base
// only received what mid holds above it).
func TestCommitSIGKILL(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 32 << 20
	base, mid, top, model := streamChain(t, d.dir, size)
	addCommitChain(d, base, mid, top)
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base", "speed": 8 << 20})
	killAtOffset(t, d, size/2) // half of mid's data is in base

	testutil.Run(t, "qemu-img", "check", "-q", top)
	testutil.Run(t, "qemu-img", "check", "-q", base)
	if b, _ := backingOf(t, top); b != mid {
		t.Errorf("the header no longer names the intermediate image: %s", b)
	}
	compareModel(t, d.dir, model, top)
}
