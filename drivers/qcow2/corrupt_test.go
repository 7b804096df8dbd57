package qcow2_test

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/qapi"
)

// l2EntryOffset returns the file offset of the L2 entry of guest offset
// off (which must be mapped).
func l2EntryOffset(t *testing.T, path string, off int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	h, err := qcow2fmt.Parse(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	g := h.Geometry()
	l1, err := qcow2fmt.ReadTable(f, int64(h.L1TableOffset), int64(h.L1Size))
	if err != nil {
		t.Fatal(err)
	}
	l2 := int64(l1[g.L1Index(off)] & qcow2fmt.L1OffsetMask)
	if l2 == 0 {
		t.Fatal("unmapped")
	}
	return l2 + g.L2Index(off)*int64(g.L2EntrySize)
}

func poke64(t *testing.T, path string, off int64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptionDetected points an L2 entry at the refcount table: the
// write is
// refused, BLOCK_IMAGE_CORRUPTED goes out, the image is marked corrupt and
// can then only be opened read-only.
func TestCorruptionDetected(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, img, `,"size":4194304`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	if err := c.WriteAt(t.Context(), pattern(200000, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	poke64(t, img, l2EntryOffset(t, img, 65536), qcow2fmt.OflagCopied|0x10000) // the refcount table
	hdrBefore, _ := os.ReadFile(img)

	g, ev := newGraph(t)
	c = openQcow2(t, g, "img", img, "")
	err := c.WriteAt(t.Context(), []byte("x"), 65536+10, 0)
	if err == nil || !strings.Contains(err.Error(), "Preventing invalid write on metadata (overlaps with refcount table)") {
		t.Fatalf("write over the header: %v", err)
	}
	names := ev.names()
	if len(names) != 1 || names[0] != "BLOCK_IMAGE_CORRUPTED" {
		t.Fatalf("events %v", names)
	}
	got := string(qapi.Marshal(ev.data[0]))
	for _, s := range []string{`"device": ""`, `"node-name": "img"`, `"fatal": true`, `"offset": 65546`, `"size": 1`} {
		if !strings.Contains(got, s) {
			t.Fatalf("event %s lacks %s", got, s)
		}
	}
	// The node is unusable now.
	if err := c.ReadAt(t.Context(), make([]byte, 512), 0); err == nil {
		t.Fatal("read after a fatal corruption succeeded")
	}
	g.Close()
	after, _ := os.ReadFile(img)
	// Nothing but the corrupt bit changed in the header cluster.
	if binary.BigEndian.Uint64(after[72:])&qcow2fmt.IncompatCorrupt == 0 {
		t.Fatal("corrupt bit not set")
	}
	binary.BigEndian.PutUint64(after[72:], binary.BigEndian.Uint64(after[72:])&^qcow2fmt.IncompatCorrupt)
	equalOrFail(t, "header", after[:65536], hdrBefore[:65536])

	g, _ = newGraph(t)
	err = addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"img","file":{"driver":"file","filename":%q}}`, img))
	if err == nil || err.Error() != "qcow2: Image is corrupt; cannot be opened read/write" {
		t.Fatalf("read-write open of a corrupt image: %v", err)
	}
	c = openQcow2(t, g, "ro", img, `,"read-only":true`)
	if err := c.ReadAt(t.Context(), make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	in := g.Lookup("ro").Node().(graph.Infoer).Info()
	if !strings.Contains(string(qapi.Marshal(in.FormatSpecific)), `"corrupt": true`) {
		t.Fatalf("info: %s", qapi.Marshal(in.FormatSpecific))
	}
	out := qemuImg(t, "info", img)
	if !strings.Contains(out, "corrupt: true") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
}

// TestCorruptionReadOnly: an unaligned L2 entry met by a read on a
// read-only node signals a non-fatal corruption and fails the read.
func TestCorruptionReadOnly(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, img, `,"size":4194304`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	if err := c.WriteAt(t.Context(), pattern(200000, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	poke64(t, img, l2EntryOffset(t, img, 0), qcow2fmt.OflagCopied|0x50200)
	g, ev := newGraph(t)
	c = openQcow2(t, g, "img", img, `,"read-only":true`)
	err := c.ReadAt(t.Context(), make([]byte, 512), 0)
	if err == nil || !strings.Contains(err.Error(), "Cluster allocation offset 0x50200 unaligned") {
		t.Fatalf("read: %v", err)
	}
	if n := ev.names(); len(n) != 1 || !strings.Contains(string(qapi.Marshal(ev.data[0])), `"fatal": false`) {
		t.Fatalf("events %v %s", n, qapi.Marshal(ev.data))
	}
	// Other clusters still read.
	if err := c.ReadAt(t.Context(), make([]byte, 512), 65536); err != nil {
		t.Fatal(err)
	}
}
