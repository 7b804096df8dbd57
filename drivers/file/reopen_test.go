package file

import (
	"bytes"
	"context"
	"testing"

	"blockd/graph"
)

// TestReopenFd: a read-only file node reopened read-write gets a
// read-write descriptor that carries its image locks (another process
// sees the write lock once a writer attaches), writes reach the file, and
// back to read-only a second descriptor sees the write lock gone; a
// writer blocks the read-only direction and keeps writing on the same
// descriptor.
func TestReopenFd(t *testing.T) {
	ctx := context.Background()
	p, data := mkfile(t, 1<<16)
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"f","filename":%s,"read-only":true,"locking":"on"}`, q(p))
	n := fileNode(b)
	if _, err := g.NewBackend("f", "", rw, graph.PermAll); err == nil {
		t.Fatal("writer attached to a read-only node")
	}
	if err := g.Reopen(ctx, b, false); err != nil {
		t.Fatal(err)
	}
	if !n.rw {
		t.Fatal("descriptor still read-only")
	}
	w, err := g.NewBackend("f", "", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteAt(ctx, []byte("reopened"), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, p); !bytes.Equal(got[:8], []byte("reopened")) || !bytes.Equal(got[8:], data[8:]) {
		t.Fatal("write did not reach the file")
	}
	// Another open of the file (a second descriptor, as another process
	// would have) sees the write lock (byte 101) and the unshared write
	// (byte 201) on the new descriptor.
	other := addNode(t, g, `{"driver":"file","node-name":"o","filename":%s,"read-only":true,"locking":"on"}`, q(p))
	on := fileNode(other)
	for _, off := range []int64{lockPermBase + 1, lockSharedBase + 1} {
		if busy, err := lockTest(on.fd, off); err != nil || !busy {
			t.Errorf("lock byte %d after reopen: busy=%v err=%v", off, busy, err)
		}
	}
	if err := g.Reopen(ctx, b, true); err == nil {
		t.Fatal("read-only reopen with a writer succeeded")
	}
	if !n.rw || b.ReadOnly() {
		t.Fatal("refused reopen changed the node")
	}
	if err := w.WriteAt(ctx, []byte("still"), 0, 0); err != nil {
		t.Fatalf("write after the refused reopen: %v", err)
	}
	g.ReleaseBackend(w)
	if err := g.Reopen(ctx, b, true); err != nil {
		t.Fatal(err)
	}
	if n.rw || !b.ReadOnly() {
		t.Fatal("node still writable")
	}
	for _, off := range []int64{lockPermBase + 1, lockSharedBase + 1} {
		if busy, err := lockTest(on.fd, off); err != nil || busy {
			t.Errorf("lock byte %d after read-only reopen: busy=%v err=%v", off, busy, err)
		}
	}
	// The read-only descriptor refuses writes at the system level too.
	if err := pwriteFull(n.fd, []byte("x"), 0); err == nil {
		t.Error("read-only descriptor accepted a write")
	}
}
