package qcow2_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"blockd/drivers/blkdebug"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/testutil"
)

// diskHeader parses the header of the qcow2 image at path.
func diskHeader(t *testing.T, path string) *qcow2fmt.Header {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	h, err := qcow2fmt.Parse(f, st.Size())
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return h
}

func changer(t *testing.T, b *graph.BDS) graph.BackingFileChanger {
	t.Helper()
	ch, ok := b.Node().(graph.BackingFileChanger)
	if !ok {
		t.Fatalf("%T is no graph.BackingFileChanger", b.Node())
	}
	return ch
}

// TestChangeBackingFileOneWrite checks that a backing file change is one
// write of the header: the file below fails every header write after the
// first, so a change made of two writes would fail half done.
func TestChangeBackingFileOneWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, p, `,"size":8388608`)
	g, _ := newGraph(t)
	g.Register(blkdebug.Driver())
	add(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"q","file":{"driver":"blkdebug",
		"inject-error":[{"iotype":"write","sector":0,"after":1,"errno":%d}],
		"image":{"driver":"file","filename":%q}}}`, int(syscall.EIO), p))
	backend(t, g, "q", true)
	ch := changer(t, g.Lookup("q"))
	ctx := context.Background()
	if err := ch.ChangeBackingFile(ctx, "base.qcow2", "qcow2"); err != nil {
		t.Fatalf("first change: %v", err)
	}
	h := diskHeader(t, p)
	if h.BackingFile != "base.qcow2" || h.BackingFormat != "qcow2" {
		t.Fatalf("header names %q (%q), want base.qcow2 (qcow2)", h.BackingFile, h.BackingFormat)
	}
	// The second header write fails: the header keeps the first name and
	// the node reports it too.
	err := ch.ChangeBackingFile(ctx, "other-name.img", "raw")
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("second change: %v, want the injected EIO", err)
	}
	if h := diskHeader(t, p); h.BackingFile != "base.qcow2" || h.BackingFormat != "qcow2" {
		t.Fatalf("after a failed change the header names %q (%q)", h.BackingFile, h.BackingFormat)
	}
	if ii := g.Lookup("q").ImageInfo(false); ii.BackingFilename != "base.qcow2" || ii.BackingFilenameFormat != "qcow2" {
		t.Fatalf("after a failed change the node reports %q (%q)", ii.BackingFilename, ii.BackingFilenameFormat)
	}
}

// TestChangeBackingFile changes, replaces and removes the backing file
// name of images with big and small clusters and checks the header fields
// and what the node reports, and the refusals.
func TestChangeBackingFile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, p, `,"size":8388608`)
	g, _ := newGraph(t)
	openQcow2(t, g, "q", p, "")
	b := g.Lookup("q")
	ch := changer(t, b)
	long := strings.Repeat("n", 1000)
	for _, c := range []struct{ name, format string }{
		{"base.qcow2", "qcow2"}, {long, "raw"}, {"b", ""}, {"", ""},
	} {
		if err := ch.ChangeBackingFile(ctx, c.name, c.format); err != nil {
			t.Fatalf("change to %q (%q): %v", c.name, c.format, err)
		}
		h := diskHeader(t, p)
		if h.BackingFile != c.name || h.BackingFormat != c.format {
			t.Fatalf("header names %q (%q), want %q (%q)", h.BackingFile, h.BackingFormat, c.name, c.format)
		}
		if (h.BackingFileOffset == 0) != (c.name == "") || h.BackingFileSize != uint32(len(c.name)) {
			t.Fatalf("backing file offset %d, size %d for %q", h.BackingFileOffset, h.BackingFileSize, c.name)
		}
		ii := b.ImageInfo(false)
		full := ""
		if c.name != "" {
			full = filepath.Join(dir, c.name)
		}
		if ii.BackingFilename != c.name || ii.BackingFilenameFormat != c.format || ii.FullBackingFilename != full {
			t.Fatalf("node reports %q (%q, %q)", ii.BackingFilename, ii.BackingFilenameFormat, ii.FullBackingFilename)
		}
	}
	selfCheck(t, p)
	for _, c := range []struct {
		name, format string
		want         error
	}{
		{strings.Repeat("n", 1024), "qcow2", graph.ErrBackingName},
		{"", "qcow2", graph.ErrBackingName},
		{"x", strings.Repeat("f", 16), graph.ErrBackingName},
	} {
		if err := ch.ChangeBackingFile(ctx, c.name, c.format); !errors.Is(err, c.want) {
			t.Errorf("change to %d bytes (%q): %v, want %v", len(c.name), c.format, err, c.want)
		}
	}

	// 512-byte clusters: the header, the extensions and the name share
	// one cluster.
	small := filepath.Join(dir, "small.qcow2")
	blockdevCreate(t, small, `,"size":1048576,"cluster-size":512`)
	openQcow2(t, g, "s", small, "")
	ch = changer(t, g.Lookup("s"))
	if err := ch.ChangeBackingFile(ctx, "base.qcow2", "qcow2"); err != nil {
		t.Fatal(err)
	}
	if err := ch.ChangeBackingFile(ctx, strings.Repeat("n", 450), "qcow2"); !errors.Is(err, graph.ErrNoSpace) {
		t.Fatalf("450 bytes in a 512-byte cluster: %v, want ErrNoSpace", err)
	}
	if h := diskHeader(t, small); h.BackingFile != "base.qcow2" {
		t.Fatalf("after a refused change the header names %q", h.BackingFile)
	}
	selfCheck(t, small)
}

// TestChangeBackingFileReadOnly: a read-only node refuses the change.
func TestChangeBackingFileReadOnly(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	blockdevCreate(t, p, `,"size":1048576`)
	g, _ := newGraph(t)
	openQcow2(t, g, "q", p, `,"read-only":true`)
	if err := changer(t, g.Lookup("q")).ChangeBackingFile(context.Background(), "b", "raw"); !errors.Is(err, graph.ErrReadOnly) {
		t.Fatalf("read-only node: %v", err)
	}
}

// TestMakeEmpty: after MakeEmpty the overlay reads its backing file
// everywhere and holds no data clusters.
func TestMakeEmpty(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	blockdevCreate(t, base, `,"size":4194304`)
	blockdevCreate(t, top, `,"size":4194304,"backing-file":"base.qcow2","backing-fmt":"qcow2"`)
	g, _ := newGraph(t)
	bc := openQcow2(t, g, "b", base, "")
	data := pattern(4<<20, 1)
	if err := bc.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	g.ReleaseBackend(bc)
	if err := g.Del("b"); err != nil {
		t.Fatal(err)
	}
	tc := openQcow2(t, g, "t", top, "")
	if err := tc.WriteAt(ctx, pattern(1<<20, 2), 512<<10, 0); err != nil {
		t.Fatal(err)
	}
	if err := tc.WriteZeroes(ctx, 3<<20, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	me, ok := g.Lookup("t").Node().(graph.MakeEmptier)
	if !ok {
		t.Fatal("qcow2 node is no graph.MakeEmptier")
	}
	if err := me.MakeEmpty(ctx); err != nil {
		t.Fatal(err)
	}
	equalOrFail(t, "top after MakeEmpty", readAll(t, tc), data)
	ext, err := tc.BlockStatus(ctx, 0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 1 || ext[0].Length != 4<<20 || ext[0].Flags&graph.ExtentHole == 0 || ext[0].Flags&graph.ExtentZero != 0 {
		t.Fatalf("block status after MakeEmpty: %+v", ext)
	}
	g.ReleaseBackend(tc)
	if err := g.Del("t"); err != nil {
		t.Fatal(err)
	}
	selfCheck(t, top)
}

// TestChangeBackingFileAfterCopy: data written to the image (a stream's
// copy) is mapped on disk before the header stops naming the backing file,
// so another reader of the file (what remains after a crash) sees the
// data and not the zeroes of an image without backing.
func TestChangeBackingFileAfterCopy(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	ctx := context.Background()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	blockdevCreate(t, base, `,"size":8388608`)
	blockdevCreate(t, top, `,"size":8388608,"backing-file":"base.qcow2","backing-fmt":"qcow2"`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "q", top, "")
	data := pattern(1<<20, 7)
	if err := c.WriteAt(ctx, data, 2<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := changer(t, g.Lookup("q")).ChangeBackingFile(ctx, "", ""); err != nil {
		t.Fatal(err)
	}
	// The node is still open: read the file as a crash would leave it.
	raw := qemuRaw(t, "-U", top)
	equalOrFail(t, "image read by another process", raw[2<<20:3<<20], data)
}
