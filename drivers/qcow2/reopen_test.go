package qcow2_test

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/testutil"
)

// TestReopenRepairsDirtyImage: a lazy-refcount image left dirty by a
// killed qemu-io (refcounts behind the L2 tables) opens read-only without
// repair; reopened read-write it is repaired before anything is written,
// as a writable open would, so new clusters do not land on clusters in
// use; reopened read-only again it is clean on disk while still open.
// Without the repair at reopen, qemu-img check finds the new writes
// overlapping the old ones.
func TestReopenRepairsDirtyImage(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "dirty.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", img, "4M")
	// qemu-io dies by SIGKILL: its exit status is an error.
	_ = exec.Command("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "sigraise 9", img).Run()
	if out, _ := exec.Command("qemu-img", "check", img).CombinedOutput(); !bytes.Contains(out, []byte("ERROR")) {
		t.Fatalf("the killed qemu-io left no refcount errors:\n%s", out)
	}
	g, _ := newGraph(t)
	add(t, g, `{"driver":"qcow2","node-name":"q","read-only":true,"file":{"driver":"file","filename":"`+img+`"}}`)
	b := g.Lookup("q")
	if err := g.Reopen(ctx, b, false); err != nil {
		t.Fatal(err)
	}
	w := backend(t, g, "q", true)
	data := pattern(1<<20, 7)
	if err := w.WriteAt(ctx, data, 2<<20, 0); err != nil {
		t.Fatal(err)
	}
	g.ReleaseBackend(w)
	if err := g.Reopen(ctx, b, true); err != nil {
		t.Fatal(err)
	}
	out := qemuImg(t, "info", "-U", "--output=json", img)
	if !strings.Contains(out, `"dirty-flag": false`) {
		t.Errorf("image dirty after the read-only reopen:\n%s", out)
	}
	g.Close()
	checkClean(t, img)
	got := qemuRaw(t, img)
	if !bytes.Equal(got[:1<<20], bytes.Repeat([]byte{0x11}, 1<<20)) {
		t.Error("qemu-io's data changed")
	}
	equalOrFail(t, "data written after the reopen", got[2<<20:3<<20], data)
}
