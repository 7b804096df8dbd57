package qcow2_test

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"blockd/internal/testutil"
)

// TestPopulateKeepsWrites copies a backing file up into its overlay
// (Populate, the stream job's copy-on-read) while writers write the same
// clusters: whatever the order, a cluster reads what its writer wrote,
// and clusters no one wrote read the backing file's data, now held by
// the overlay (the chain is clean and the overlay alone reads the same).
func TestPopulateKeepsWrites(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	const size, cs = 1 << 20, 4096
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, fmt.Sprint(size))
	qemuIO(t, "-c", fmt.Sprintf("write -P 0x5a 0 %d", size), base)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", top)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "top", top, "")
	ctx := context.Background()
	want := bytes.Repeat([]byte{0x5a}, size)

	// Written first, then populated over: the write stays.
	w := pattern(3*cs, 1)
	if err := c.WriteAt(ctx, w, 2*cs, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[2*cs:], w)
	if err := c.Populate(ctx, 0, 8*cs); err != nil {
		t.Fatal(err)
	}
	// Clusters 16..255: a writer and the copy race on each.
	var wg sync.WaitGroup
	for i := 16; i < size/cs; i++ {
		p := pattern(cs/2, uint64(i))
		off := int64(i*cs + (i%2)*cs/2)
		copy(want[off:], p)
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := c.WriteAt(ctx, p, off, 0); err != nil {
				t.Error(err)
			}
		}()
		go func(i int) {
			defer wg.Done()
			if err := c.Populate(ctx, int64(i-1)*cs, min(3*cs, size-int64(i-1)*cs)); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if err := c.Populate(ctx, 0, size); err != nil {
		t.Fatal(err)
	}
	equalOrFail(t, "overlay after populate", readAll(t, c), want)
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, top)
	// Every cluster is in the overlay now: without its backing file it
	// reads the same.
	got := qemuRaw(t, "json:"+fmt.Sprintf(`{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, top))
	equalOrFail(t, "overlay alone", got, want)
}
