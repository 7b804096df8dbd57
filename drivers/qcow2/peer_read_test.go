package qcow2_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// mkRaw writes a raw file of size bytes: random data with zero runs.
func mkRaw(t testing.TB, path string, size int, seed uint64) {
	t.Helper()
	p := pattern(size, seed)
	for off := 0; off < size; off += 96 << 10 {
		end := min(off+40<<10, size)
		clear(p[off:end])
	}
	if err := os.WriteFile(path, p, 0o644); err != nil {
		t.Fatal(err)
	}
}

// readCompare opens path in blockd with extra options and compares the
// whole guest view with qemu-img convert's.
func readCompare(t *testing.T, path, extra string, qemuArgs ...string) {
	t.Helper()
	want := qemuRaw(t, append(qemuArgs, path)...)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", path, extra)
	got := readAll(t, c)
	equalOrFail(t, "guest data", got, want)
	// Unaligned, odd-sized reads across clusters.
	buf := make([]byte, 100_003)
	for _, off := range []int64{0, 511, 65535, 1<<20 + 7, c.Size() - 100_003} {
		if off < 0 || off+int64(len(buf)) > c.Size() {
			continue
		}
		if err := c.ReadAt(t.Context(), buf, off); err != nil {
			t.Fatal(err)
		}
		equalOrFail(t, fmt.Sprintf("read at %d", off), buf, want[off:off+int64(len(buf))])
	}
	g.Close()
}

// TestReadQemuImages reads images qemu-img and qemu-io made, in every
// variant, and compares with qemu-img convert -O raw.
func TestReadQemuImages(t *testing.T) {
	const size = 6 << 20
	io := func(t *testing.T, img string, cmds ...string) {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		qemuIO(t, append(args, img)...)
	}
	cases := []struct {
		name    string
		convert []string // qemu-img convert options (from the raw file)
		io      []string // qemu-io commands afterwards
	}{
		{"v2", []string{"-o", "compat=0.10"}, []string{"write -P 0x11 1000 5000"}},
		{"v3", nil, []string{"write -z 0 65536", "write -z 200000 300000", "write -P 0x22 3M 4096"}},
		{"c512", []string{"-o", "cluster_size=512"}, []string{"write -z 1024 2048", "discard 4096 8192"}},
		{"c4k", []string{"-o", "cluster_size=4096"}, []string{"write -z 1M 1M"}},
		{"c2m", []string{"-o", "cluster_size=2M"}, []string{"write -z 2M 2M", "write -P 0x33 100 100"}},
		{"c16k-refcount1", []string{"-o", "cluster_size=16384,refcount_bits=1"}, nil},
		{"refcount64", []string{"-o", "refcount_bits=64"}, nil},
		{"zlib", []string{"-c"}, []string{"write -P 0x44 70000 1000"}},
		{"zstd", []string{"-c", "-o", "compression_type=zstd"}, []string{"write -P 0x55 70000 1000"}},
		{"zlib-c4k", []string{"-c", "-o", "cluster_size=4096"}, nil},
		{"zstd-c2m", []string{"-c", "-o", "compression_type=zstd,cluster_size=2M"}, nil},
		{"extl2", []string{"-o", "extended_l2=on"}, []string{"write -z 4096 8192", "write -P 0x66 130000 3000", "discard 1M 64k"}},
		{"extl2-zstd", []string{"-c", "-o", "extended_l2=on,compression_type=zstd"}, []string{"write -P 0x77 2048 2048"}},
		{"lazy", []string{"-o", "lazy_refcounts=on"}, []string{"write -P 0x88 0 1M"}},
		{"prealloc", []string{"-o", "preallocation=metadata"}, []string{"write -z 0 1M"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			src, img := filepath.Join(dir, "src.raw"), filepath.Join(dir, "img.qcow2")
			mkRaw(t, src, size, 7)
			qemuImg(t, append(append([]string{"convert", "-f", "raw", "-O", "qcow2"}, c.convert...), src, img)...)
			if len(c.io) > 0 {
				io(t, img, c.io...)
			}
			readCompare(t, img, "")
		})
	}
}

// TestReadBackingChain reads a chain of three qcow2 layers over a raw base,
// opened implicitly from the headers.
func TestReadBackingChain(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	mkRaw(t, base, 4<<20, 1)
	l1 := filepath.Join(dir, "l1.qcow2")
	l2 := filepath.Join(dir, "l2.qcow2")
	l3 := filepath.Join(dir, "l3.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", l1)
	qemuIO(t, "-c", "write -P 0x01 0 100000", "-c", "write -z 1M 64k", l1)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "l1.qcow2", "-F", "qcow2", l2, "6M")
	qemuIO(t, "-c", "write -P 0x02 50000 100000", "-c", "write -P 0x03 5M 4096", l2)
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "l2.qcow2", "-F", "qcow2", l3)
	qemuIO(t, "-c", "write -P 0x04 70000 700", "-c", "discard 2M 64k", l3)
	readCompare(t, l3, "")

	// The chain shows in the graph: auto-named read-only nodes.
	g, _ := newGraph(t)
	openQcow2(t, g, "top", l3, "")
	var nodes []string
	for _, b := range g.Nodes() {
		nodes = append(nodes, fmt.Sprintf("%s:%s:%v", b.Driver().Name, b.Name(), b.ReadOnly()))
	}
	joined := strings.Join(nodes, " ")
	if strings.Count(joined, "qcow2:#block") != 2 || strings.Count(joined, "raw:#block") != 1 {
		t.Fatalf("backing nodes: %s", joined)
	}
	info := g.Lookup("top").DeviceInfo(false)
	if info.BackingFileDepth != 3 || info.BackingFile != filepath.Join(dir, "l2.qcow2") {
		t.Fatalf("backing_file %q depth %d", info.BackingFile, info.BackingFileDepth)
	}
	if info.Image.BackingImage == nil || info.Image.BackingImage.BackingImage == nil {
		t.Fatal("no backing images in the query")
	}
}

// TestReadDataFile reads an image with an external data file, named in
// the header and given as an option.
func TestReadDataFile(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(fmt.Sprint("raw=", raw), func(t *testing.T) {
			dir := t.TempDir()
			img, data := filepath.Join(dir, "img.qcow2"), filepath.Join(dir, "img.data")
			o := "data_file=" + data
			if raw {
				o += ",data_file_raw=on"
			}
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", o, img, "4M")
			qemuIO(t, "-c", "write -P 0x31 0 70000", "-c", "write -z 1M 64k", "-c", "write -P 0x32 3M 5000", img)
			readCompare(t, img, "")
			readCompare(t, img, fmt.Sprintf(`,"data-file":{"driver":"file","filename":%q}`, data))
		})
	}
}

// TestReadSnapshotImage reads the active layer of an image with an
// internal snapshot, and writes to it (copy-on-write of shared clusters
// and tables).
func TestReadSnapshotImage(t *testing.T) {
	dir := t.TempDir()
	src, img := filepath.Join(dir, "src.raw"), filepath.Join(dir, "img.qcow2")
	mkRaw(t, src, 3<<20, 3)
	qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", src, img)
	qemuImg(t, "snapshot", "-c", "snap1", img)
	qemuIO(t, "-c", "write -P 0x99 100000 200000", img)
	readCompare(t, img, "")
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	want := readAll(t, c)
	p := pattern(300_000, 5)
	if err := c.WriteAt(t.Context(), p, 1<<20+3, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[1<<20+3:], p)
	if err := c.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	equalOrFail(t, "after write", readAll(t, c), want)
	g.Close()
	checkClean(t, img)
	equalOrFail(t, "qemu view", qemuRaw(t, img), want)
	// The snapshot is intact.
	snap := qemuRaw(t, "-l", "snap1", img)
	srcb, _ := os.ReadFile(src)
	equalOrFail(t, "snapshot", snap, srcb)
}
