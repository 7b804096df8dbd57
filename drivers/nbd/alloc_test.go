package nbd

import (
	"context"
	"path/filepath"
	"testing"
)

// TestReadWriteAllocations: the request path allocates nothing of its own
// per request beyond the graph's (a regression guard on the hot path).
func TestReadWriteAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	// An outside server, so that only the client's allocations count.
	img := qemuNbdImage(t, mib)
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	startPeer(t, sock, "qemu-nbd", "-k", sock, "-f", "raw", "-t", img)
	c := openNBD(t, map[string]any{"server": map[string]any{"type": "unix", "path": sock}})
	defer c.Close()
	n := c.BDS().Node()
	ctx := context.Background()
	buf := make([]byte, 65536)
	if a := testing.AllocsPerRun(200, func() {
		if err := n.ReadAt(ctx, buf, 4096); err != nil {
			t.Fatal(err)
		}
	}); a > 0 {
		t.Errorf("ReadAt: %v allocations per request", a)
	}
	if a := testing.AllocsPerRun(200, func() {
		if err := n.WriteAt(ctx, buf, 4096, 0); err != nil {
			t.Fatal(err)
		}
	}); a > 0 {
		t.Errorf("WriteAt: %v allocations per request", a)
	}
}
