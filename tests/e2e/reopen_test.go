package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// TestCommitIntoReadOnlyBase is the lifecycle case: an exported disk is
// snapshotted (blockdev-snapshot, the disk's image becomes a read-only
// backing file), snapshotted again, and the middle image is committed
// into the now read-only base while four NBD clients write and read back
// through the top's export. The base is reopened read-write for the job
// and read-only again after it; no request fails, every read sees the
// last write, and afterwards qemu-img finds the images clean and the top
// reads what the clients left without the middle image.
func TestCommitIntoReadOnlyBase(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 16 << 20
	base := filepath.Join(d.dir, "base.qcow2")
	mid := filepath.Join(d.dir, "mid.qcow2")
	top := filepath.Join(d.dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 4M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid, fmt.Sprint(size))
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, fmt.Sprint(size))
	model := make([]byte, size)
	copy(model, bytes.Repeat([]byte{0x11}, 4<<20))

	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "base", "file": map[string]any{"driver": "file", "filename": base}})
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "base", "name": "disk", "writable": true})
	evs := d.subscribe()

	stopLoad := loadClients(t, sock, model, 0)
	time.Sleep(100 * time.Millisecond)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "mid", "file": map[string]any{"driver": "file", "filename": mid}, "backing": nil})
	d.must("blockdev-snapshot", map[string]any{"node": "base", "overlay": "mid"})
	time.Sleep(300 * time.Millisecond) // writes land in mid
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "top", "file": map[string]any{"driver": "file", "filename": top}, "backing": nil})
	d.must("blockdev-snapshot", map[string]any{"node": "mid", "overlay": "top"})
	if ro := nodeRO(t, d); !ro["base"] || !ro["mid"] || ro["top"] {
		t.Fatalf("read-only after the snapshots: %v", ro)
	}
	d.must("block-commit", map[string]any{"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base", "speed": 8 << 20})
	if ro := nodeRO(t, d); ro["base"] {
		t.Errorf("base read-only during the commit: %v", ro)
	}
	completed := waitCompleted(t, evs)
	if ro := nodeRO(t, d); !ro["base"] {
		t.Errorf("base writable after the commit: %v", ro)
	}
	for _, err := range stopLoad() {
		t.Error(err)
	}
	if e, ok := completed["error"]; ok || completed["len"] != float64(size) {
		t.Fatalf("BLOCK_JOB_COMPLETED %v (error %v)", completed, e)
	}
	if t.Failed() {
		return
	}
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

// nodeRO maps node names to their "ro" in query-named-block-nodes.
func nodeRO(t *testing.T, d *daemon) map[string]bool {
	t.Helper()
	var nodes []struct {
		NodeName string `json:"node-name"`
		RO       bool   `json:"ro"`
	}
	if err := json.Unmarshal(d.must("query-named-block-nodes", map[string]any{"flat": true}), &nodes); err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, n := range nodes {
		m[n.NodeName] = n.RO
	}
	return m
}
