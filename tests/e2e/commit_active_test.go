package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// activeChain creates base ← mid ← top qcow2 images of size bytes (base
// holds 0x11 in its first 4 MiB, the others nothing) and returns them
// with the model of what the chain reads.
func activeChain(t *testing.T, dir string, size int) (base, mid, top string, model []byte) {
	t.Helper()
	base = filepath.Join(dir, "base.qcow2")
	mid = filepath.Join(dir, "mid.qcow2")
	top = filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 4M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid, fmt.Sprint(size))
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, fmt.Sprint(size))
	model = make([]byte, size)
	copy(model, bytes.Repeat([]byte{0x11}, 4<<20))
	return base, mid, top, model
}

// TestCommitActiveUnderLoad is the active commit of the lifecycle: an
// exported disk is snapshotted twice (blockdev-snapshot) while four NBD
// clients write and read back through the export, then the active layer
// is committed into the first image (block-commit of the device into
// base-node: the mirror job with type commit) under the same load,
// completed once ready, and the export serves the base. No request fails,
// every read sees the last write, the base is writable after the job and
// reads what the clients wrote; qemu-img finds the images clean.
func TestCommitActiveUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 16 << 20
	base, mid, top, model := activeChain(t, d.dir, size)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "base", "file": map[string]any{"driver": "file", "filename": base}})
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "base", "name": "disk", "writable": true})
	evs := d.subscribe()
	stop := loadClients(t, sock, model, 0)
	time.Sleep(200 * time.Millisecond) // writes land in base
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "mid", "file": map[string]any{"driver": "file", "filename": mid}, "backing": nil})
	d.must("blockdev-snapshot", map[string]any{"node": "base", "overlay": "mid"})
	time.Sleep(300 * time.Millisecond) // writes land in mid
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}, "backing": nil})
	d.must("blockdev-snapshot", map[string]any{"node": "mid", "overlay": "top"})
	time.Sleep(300 * time.Millisecond) // writes land in top
	if ro := nodeRO(t, d); !ro["base"] || !ro["mid"] || ro["top"] {
		t.Fatalf("read-only after the snapshots: %v", ro)
	}
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "base-node": "base", "speed": 8 << 20})
	if ro := nodeRO(t, d); ro["base"] {
		t.Errorf("base read-only during the commit: %v", ro)
	}
	time.Sleep(time.Second)
	d.must("block-job-set-speed", map[string]any{"device": "c", "speed": 0})
	ready := waitEvent(t, evs, "BLOCK_JOB_READY", "c")
	if ready["type"] != "commit" {
		t.Errorf("BLOCK_JOB_READY %v", ready)
	}
	time.Sleep(300 * time.Millisecond)
	d.must("block-job-complete", map[string]any{"device": "c"})
	completed := waitEvent(t, evs, "BLOCK_JOB_COMPLETED", "c")
	time.Sleep(200 * time.Millisecond) // the clients write to the base now
	for _, err := range stop() {
		t.Error(err)
	}
	if e, ok := completed["error"]; ok {
		t.Fatalf("BLOCK_JOB_COMPLETED %v (error %v)", completed, e)
	}
	var exps []struct {
		NodeName string `json:"node-name"`
	}
	if err := json.Unmarshal(d.must("query-block-exports", nil), &exps); err != nil {
		t.Fatal(err)
	}
	if len(exps) != 1 || exps[0].NodeName != "base" {
		t.Fatalf("query-block-exports after the commit: %+v", exps)
	}
	if ro := nodeRO(t, d); ro["base"] {
		t.Errorf("base read-only after the commit: %v", ro)
	}
	if !bytes.Equal(readExport(t, sock, size), model) {
		t.Fatal("the export does not read what its clients wrote")
	}
	d.must("block-export-del", map[string]any{"id": "e0"})
	d.stop()
	for _, img := range []string{base, mid, top} {
		testutil.Run(t, "qemu-img", "check", "-q", img)
	}
	compareModel(t, d.dir, model, base)
}

// TestCommitActiveSIGKILL kills blockd in the middle of an active commit:
// the base only received data the chain already reads, so every image is
// clean for qemu-img check, the top still names mid and the chain reads
// as before.
func TestCommitActiveSIGKILL(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 32 << 20
	base, mid, top, model := activeChain(t, d.dir, size)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x22 2M 12M", mid)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x33 10M 16M", top)
	copy(model[2<<20:], bytes.Repeat([]byte{0x22}, 12<<20))
	copy(model[10<<20:], bytes.Repeat([]byte{0x33}, 16<<20))
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}})
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "speed": 8 << 20})
	killAtOffset(t, d, 8<<20)

	for _, img := range []string{base, mid, top} {
		testutil.Run(t, "qemu-img", "check", "-q", img)
	}
	if b, _ := backingOf(t, top); b != mid {
		t.Errorf("the top no longer names mid: %s", b)
	}
	compareModel(t, d.dir, model, top)
}
