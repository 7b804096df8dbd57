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
	"blockd/internal/testutil"
)

func openErr(t *testing.T, path, extra string) error {
	t.Helper()
	g, _ := newGraph(t)
	defer g.Close()
	return addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":%q}%s}`, path, extra))
}

// TestOpenErrors covers option errors and hostile images with QEMU's
// messages.
func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, img, `,"size":1048576`)
	v2 := filepath.Join(dir, "v2.qcow2")
	blockdevCreate(t, v2, `,"size":1048576,"version":"v2"`)
	cases := []struct {
		path, extra, want string
	}{
		{img, `,"encrypt":{"format":"luks","key-secret":"sec0"}`, "No encryption in image header, but options specified format 'luks'"},
		{img, `,"cache-size":1000,"l2-cache-size":100,"refcount-cache-size":100`, "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"},
		{img, `,"cache-size":1000,"l2-cache-size":2000`, "l2-cache-size may not exceed cache-size"},
		{img, `,"cache-size":1000,"refcount-cache-size":2000`, "refcount-cache-size may not exceed cache-size"},
		{img, `,"l2-cache-entry-size":1000`, "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"},
		{img, `,"overlap-check":"bogus"`, "Parameter 'overlap-check' does not accept value 'bogus'"},
		{img, `,"overlap-check":{"template":"all","bogus":true}`, "Parameter 'overlap-check.bogus' is unexpected"},
		{img, `,"data-file":{"driver":"file","filename":"/dev/null"}`, "'data-file' can only be set for images with an external data file"},
		{v2, `,"lazy-refcounts":true`, "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"},
		{img, `,"backing":{"driver":"file","filename":"/nonexistent"}`, "Could not open '/nonexistent'"},
	}
	for _, c := range cases {
		if err := openErr(t, c.path, c.extra); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.extra, err, c.want)
		}
	}
	// Accepted option forms.
	for _, extra := range []string{`,"overlap-check":"all"`, `,"overlap-check":{"template":"none","main-header":true}`, `,"cache-size":1048576`, `,"l2-cache-size":1048576,"l2-cache-entry-size":4096`, `,"lazy-refcounts":true,"pass-discard-other":true,"cache-clean-interval":0`} {
		if err := openErr(t, img, extra); err != nil {
			t.Errorf("%s: %v", extra, err)
		}
	}
}

// TestHostileImages opens damaged images: they fail cleanly.
func TestHostileImages(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	blockdevCreate(t, base, `,"size":1048576`)
	orig, _ := os.ReadFile(base)
	be := binary.BigEndian
	cases := []struct {
		name string
		mod  func(b []byte) []byte
		want string
	}{
		{"huge L1", func(b []byte) []byte { be.PutUint32(b[36:], 1<<30); return b }, "Active L1 table too large"},
		{"L1 beyond the file", func(b []byte) []byte { be.PutUint64(b[40:], 1<<40); return b }, "extends beyond the end of the file"},
		{"unknown feature", func(b []byte) []byte { be.PutUint64(b[72:], 1<<20); return b }, "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"},
		{"named feature", func(b []byte) []byte {
			be.PutUint64(b[72:], 1<<7)
			b[qcow2fmt.HeaderLen+8+1] = 7 // first table entry now names bit 7
			return b
		}, "Unsupported qcow2 feature(s): dirty bit"},
		{"truncated", func(b []byte) []byte { return b[:50] }, "qcow2 header too short"},
		{"not qcow2", func(b []byte) []byte { return make([]byte, 4096) }, "Image is not in qcow2 format"},
		{"aes", func(b []byte) []byte { be.PutUint32(b[32:], 1); return b }, "legacy AES encryption"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_")+".qcow2")
			if err := os.WriteFile(p, c.mod(append([]byte(nil), orig...)), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := openErr(t, p, ""); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
}

// TestBackingLoop: a chain that loops back fails to open.
func TestBackingLoop(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", a, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
	qemuImg(t, "rebase", "-q", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
	err := openErr(t, b, "")
	if err == nil || !strings.Contains(err.Error(), "creates a loop in the backing chain") {
		t.Fatalf("loop: %v", err)
	}
	// A self-reference too.
	qemuImg(t, "rebase", "-q", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
	if err := openErr(t, a, ""); err == nil || !strings.Contains(err.Error(), "loop") {
		t.Fatalf("self loop: %v", err)
	}
	// With backing: null it opens.
	if err := openErr(t, a, `,"backing":null`); err != nil {
		t.Fatal(err)
	}
}

// TestLazyRefcountsRepair leaves a lazy-refcount image dirty (as a crash
// would) and checks that a writable open repairs it.
func TestLazyRefcountsRepair(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, img, `,"size":4194304,"lazy-refcounts":true,"cluster-size":4096`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	p := pattern(1<<20, 3)
	if err := c.WriteAt(t.Context(), p, 100, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Copy the image while it is open and dirty: that is the crash.
	crashed := filepath.Join(dir, "crashed.qcow2")
	b, _ := os.ReadFile(img)
	if binary.BigEndian.Uint64(b[72:])&qcow2fmt.IncompatDirty == 0 {
		t.Fatal("lazy refcounts did not set the dirty bit")
	}
	// Make the refcounts wrong: forget the refcount block contents.
	clear(b[2*4096 : 3*4096])
	if err := os.WriteFile(crashed, b, 0o644); err != nil {
		t.Fatal(err)
	}
	g.Close()
	// Read-only opens do not repair.
	g2, _ := newGraph(t)
	ro := openQcow2(t, g2, "ro", crashed, `,"read-only":true`)
	equalOrFail(t, "read-only", readAll(t, ro)[100:100+len(p)], p)
	g2.Close()
	g3, _ := newGraph(t)
	c3 := openQcow2(t, g3, "rw", crashed, "")
	got := readAll(t, c3)
	equalOrFail(t, "repaired", got[100:100+len(p)], p)
	if *g3.Lookup("rw").Node().(graph.Infoer).Info().DirtyFlag {
		t.Fatal("still dirty after repair")
	}
	g3.Close()
	checkClean(t, crashed)
}

// TestBlockStatus reports data, zero and unallocated ranges from the
// metadata, through the backing chain.
func TestBlockStatus(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img.qcow2")
	blockdevCreate(t, img, fmt.Sprintf(`,"size":2097152,"backing-file":%q,"backing-fmt":"raw"`, base))
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, "")
	ctx := t.Context()
	if err := c.WriteAt(ctx, []byte("data"), 65536, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 3*65536, 2*65536, 0); err != nil {
		t.Fatal(err)
	}
	ext, err := c.BlockStatus(ctx, 0, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []graph.Extent{
		{Length: 65536, Flags: graph.ExtentHole},
		{Length: 65536, Flags: 0},
		{Length: 65536, Flags: graph.ExtentHole},
		{Length: 2 * 65536, Flags: graph.ExtentZero},
		{Length: 1<<20 - 5*65536, Flags: graph.ExtentHole},
		{Length: 1 << 20, Flags: graph.ExtentHole | graph.ExtentZero},
	}
	if fmt.Sprint(ext) != fmt.Sprint(want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
}

// TestCreateVariants creates images with blockdev-create that qemu-img
// checks and reads: data files, preallocation, resize with preallocation.
func TestCreateVariants(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ name, opts string }{
		{"falloc", `,"preallocation":"falloc"`},
		{"full", `,"preallocation":"full","cluster-size":4096`},
		{"extl2-backing-metadata", `,"preallocation":"metadata","extended-l2":true,"backing-file":"base.raw","backing-fmt":"raw"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, "base.raw"), pattern(1<<20, 9), 0o644); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, c.name+".qcow2")
			blockdevCreate(t, img, `,"size":3145728`+c.opts)
			checkClean(t, img)
			want := qemuRaw(t, img)
			g, _ := newGraph(t)
			ch := openQcow2(t, g, "img", img, "")
			equalOrFail(t, "content", readAll(t, ch), want)
			if err := ch.Truncate(t.Context(), 4<<20, graph.PreallocMetadata); err != nil {
				t.Fatal(err)
			}
			g.Close()
			checkClean(t, img)
			equalOrFail(t, "after resize", qemuRaw(t, img)[:3<<20], want)
		})
	}
	t.Run("data-file", func(t *testing.T) {
		img, data := filepath.Join(dir, "df.qcow2"), filepath.Join(dir, "df.raw")
		if err := os.WriteFile(data, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		g, _ := newGraph(t)
		add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"f","filename":%q}`, img))
		add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"d","filename":%q}`, data))
		if err := g.Create(t.Context(), testutil.Tree(t, `{"driver":"qcow2","file":"f","data-file":"d","data-file-raw":true,"size":2097152}`)); err != nil {
			t.Fatal(err)
		}
		g.Close()
		g, _ = newGraph(t)
		c := openQcow2(t, g, "img", img, `,"discard":"unmap"`)
		p := pattern(300000, 4)
		if err := c.WriteAt(t.Context(), p, 12345, 0); err != nil {
			t.Fatal(err)
		}
		if err := c.WriteZeroes(t.Context(), 65536, 65536, graph.MayUnmap); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, 2<<20)
		copy(want[12345:], p)
		clear(want[65536 : 2*65536])
		g.Close()
		checkClean(t, img)
		equalOrFail(t, "qemu view", qemuRaw(t, img), want)
		raw, _ := os.ReadFile(data)
		equalOrFail(t, "raw data file", raw, want)
	})
	errs := []struct{ opts, want string }{
		{`,"size":1000`, "Image size must be a multiple of 512 bytes"},
		{`,"size":1048576,"cluster-size":1000`, "Cluster size must be a power of two between 512 and 2048k"},
		{`,"size":1048576,"extended-l2":true,"cluster-size":4096`, "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
		{`,"size":1048576,"version":"v2","extended-l2":true`, "Extended L2 entries are only supported with compatibility level 1.1"},
		{`,"size":1048576,"version":"v2","refcount-bits":8`, "Different refcount widths than 16 bits require compatibility level 1.1"},
		{`,"size":1048576,"refcount-bits":3`, "Refcount width must be a power of two and may not exceed 64 bits"},
		{`,"size":1048576,"backing-fmt":"raw"`, "Backing format cannot be used without backing file"},
		{`,"size":1048576,"backing-file":"x","preallocation":"metadata"`, "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
		{`,"size":1048576,"data-file-raw":true`, "data-file-raw requires data-file"},
		{`,"size":1048576,"version":"v2","lazy-refcounts":true`, "Lazy refcounts only supported with compatibility level 1.1"},
		{`,"size":1048576,"version":"v2","compression-type":"zstd"`, "Non-zlib compression type is only supported with compatibility level 1.1"},
		{`,"size":1048576,"encrypt":{"format":"qcow","key-secret":"sec0"}`, "legacy AES encryption"},
		{`,"size":1048576,"encrypt":{"format":"luks"}`, "Parameter 'encrypt.key-secret' is required for cipher"},
	}
	for _, e := range errs {
		p := filepath.Join(dir, "err.qcow2")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		g, _ := newGraph(t)
		add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"f","filename":%q}`, p))
		err := g.Create(t.Context(), testutil.Tree(t, `{"driver":"qcow2","file":"f"`+e.opts+`}`))
		if err == nil || !strings.Contains(err.Error(), e.want) {
			t.Errorf("%s: got %v, want %q", e.opts, err, e.want)
		}
		g.Close()
	}
}
