package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

// killAtOffset waits until the daemon's one block job has copied offset
// bytes, then kills the daemon with SIGKILL (the crash tests of the jobs).
func killAtOffset(t *testing.T, d *daemon, offset int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var jobs []struct {
			Type   string `json:"type"`
			Offset int64  `json:"offset"`
		}
		if err := json.Unmarshal(d.must("query-block-jobs", nil), &jobs); err != nil {
			t.Fatal(err)
		}
		if len(jobs) != 1 {
			t.Fatalf("query-block-jobs: %v", jobs)
		}
		if jobs[0].Offset >= offset {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the %s job does not progress", jobs[0].Type)
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
}

// compareModel checks with qemu-img compare that the qcow2 image img
// (with its backing chain) reads model.
func compareModel(t *testing.T, dir string, model []byte, img string) {
	t.Helper()
	want := filepath.Join(dir, "model.raw")
	if err := os.WriteFile(want, model, 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", want, img)
}

// readExport reads the whole export.
func readExport(t *testing.T, sock string, size int) []byte {
	t.Helper()
	c, err := harness.DialNBD("unix", sock, "disk")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if err := c.ReadAt(got[off:off+1<<20], uint64(off)); err != nil {
			t.Fatal(err)
		}
	}
	return got
}
