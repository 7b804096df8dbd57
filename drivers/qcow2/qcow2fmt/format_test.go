package qcow2fmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memImage is an io.ReaderAt over bytes.
type memImage []byte

func (m memImage) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(m)) {
		return 0, errEOF
	}
	n := copy(p, m[off:])
	if n < len(p) {
		return n, errEOF
	}
	return n, nil
}

var errEOF = errors.New("EOF")

// minimal builds a consistent empty image: header, refcount table and
// block, L1 table.
func minimal(version uint32, clusterBits uint32, size uint64) []byte {
	cs := uint64(1) << clusterBits
	h := &Header{Version: version, ClusterBits: clusterBits, Size: size, RefcountTableOffset: cs, RefcountTableClusters: 1, RefcountOrder: 4, L1TableOffset: 3 * cs}
	g := h.Geometry()
	h.L1Size = uint32(g.L1EntriesFor(size))
	hdr, err := h.Marshal(true)
	if err != nil {
		panic(err)
	}
	img := make([]byte, 4*cs)
	copy(img, hdr)
	binary.BigEndian.PutUint64(img[cs:], 2*cs)
	for c := int64(0); c < 4; c++ {
		SetRefcount(img[2*cs:3*cs], c, 4, 1)
	}
	return img
}

func TestRefcountWidths(t *testing.T) {
	for order := uint32(0); order <= 6; order++ {
		block := make([]byte, 512)
		n := int64(512*8) >> order
		max := uint64(1)<<(1<<order) - 1
		if order == 6 {
			max = ^uint64(0)
		}
		r := rand.New(rand.NewPCG(uint64(order), 3))
		want := make([]uint64, n)
		for i := range want {
			want[i] = r.Uint64() & max
			SetRefcount(block, int64(i), order, want[i])
		}
		for i := range want {
			if got := Refcount(block, int64(i), order); got != want[i] {
				t.Fatalf("order %d entry %d: %d, want %d", order, i, got, want[i])
			}
		}
		g := NewGeometry(9, false, order, false)
		if g.RefcountMax != max || g.RefblockSize != n {
			t.Fatalf("order %d: max %d entries %d", order, g.RefcountMax, g.RefblockSize)
		}
	}
}

func TestCompressedDescriptor(t *testing.T) {
	for bits := uint32(9); bits <= 21; bits++ {
		g := NewGeometry(bits, false, 4, false)
		for _, c := range []struct{ off, size int64 }{{0x10000, 100}, {0x10000 + 511, 2}, {0x123400 + 17, g.ClusterSize}} {
			e, err := g.CompressedEntry(c.off, c.size)
			if err != nil {
				t.Fatal(err)
			}
			if g.ClusterType(e) != ClusterCompressed {
				t.Fatal("not compressed")
			}
			off, size := g.Compressed(e)
			if off != c.off || size < c.size || size >= c.size+512 {
				t.Fatalf("bits %d: %#x+%d decoded as %#x+%d", bits, c.off, c.size, off, size)
			}
		}
	}
}

func TestSubclusterTypes(t *testing.T) {
	g := NewGeometry(16, true, 4, false)
	host := uint64(0x50000) | OflagCopied
	cases := []struct {
		e, bm uint64
		sc    int
		want  SubclusterType
	}{
		{0, 0, 0, SubUnallocatedPlain},
		{0, 1 << 33, 1, SubZeroPlain},
		{0, 1, 0, SubInvalid},
		{host, 1 << 5, 5, SubNormal},
		{host, 1 << 5, 4, SubUnallocatedAlloc},
		{host, 1 << 36, 4, SubZeroAlloc},
		{host, 1<<36 | 1<<4, 4, SubInvalid},
		{OflagCompressed | 0x1000, 0, 7, SubCompressed},
	}
	for _, c := range cases {
		if got := g.Subcluster(c.e, c.bm, c.sc); got != c.want {
			t.Errorf("entry %#x bitmap %#x sc %d: %v, want %v", c.e, c.bm, c.sc, got, c.want)
		}
	}
	std := NewGeometry(16, false, 4, false)
	if std.Subcluster(OflagZero, 0, 0) != SubZeroPlain || std.Subcluster(host|OflagZero, 0, 0) != SubZeroAlloc {
		t.Fatal("standard zero clusters")
	}
	df := NewGeometry(16, false, 4, true)
	if df.ClusterType(OflagCopied) != ClusterNormal || std.ClusterType(OflagCopied) != ClusterUnallocated {
		t.Fatal("offset 0 with a data file")
	}
}

// TestHeaderRoundTrip keeps every extension, unknown ones included, and
// unknown header fields.
func TestHeaderRoundTrip(t *testing.T) {
	img := minimal(3, 16, 1<<20)
	h, err := Parse(memImage(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	h.BackingFile = "base image.qcow2"
	h.BackingFormat = "qcow2"
	h.IncompatibleFeatures |= IncompatDataFile
	h.DataFile, h.HasDataFileName = "data.raw", true
	h.AutoclearFeatures |= AutoclearBitmaps | AutoclearDataFileRaw
	h.Bitmaps = &BitmapsExt{NbBitmaps: 1, DirSize: 32, DirOffset: 0x40000}
	h.Unknown = []Extension{{Magic: 0x12345678, Data: []byte("hello, future")}}
	h.UnknownFields = []byte{1, 2, 3, 4, 5, 6, 7, 8}
	buf, err := h.Marshal(true)
	if err != nil {
		t.Fatal(err)
	}
	copy(img, buf)
	h2, err := Parse(memImage(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if h2.BackingFile != h.BackingFile || h2.BackingFormat != "qcow2" || h2.DataFile != "data.raw" || !h2.HasDataFileName ||
		h2.Bitmaps == nil || *h2.Bitmaps != *h.Bitmaps || len(h2.Unknown) != 1 || string(h2.Unknown[0].Data) != "hello, future" ||
		!bytes.Equal(h2.UnknownFields, h.UnknownFields) || h2.HeaderLength != HeaderLen+8 || len(h2.FeatureTable) != len(DefaultFeatureTable) {
		t.Fatalf("round trip lost something: %+v", h2)
	}
	buf2, err := h2.Marshal(true)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, buf2) {
		t.Fatal("second marshal differs")
	}
}

func TestHostileHeaders(t *testing.T) {
	be := binary.BigEndian
	cases := []struct {
		name string
		mod  func(b []byte)
		want string
	}{
		{"magic", func(b []byte) { b[0] = 'X' }, "Image is not in qcow2 format"},
		{"version", func(b []byte) { be.PutUint32(b[4:], 4) }, "Unsupported qcow2 version 4"},
		{"cluster bits", func(b []byte) { be.PutUint32(b[20:], 22) }, "Unsupported cluster size: 2^22"},
		{"header length", func(b []byte) { be.PutUint32(b[100:], 100) }, "qcow2 header too short"},
		{"header too long", func(b []byte) { be.PutUint32(b[100:], 1<<20) }, "qcow2 header exceeds cluster size"},
		{"unknown feature", func(b []byte) { be.PutUint64(b[72:], 1<<40|IncompatDirty) }, "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"},
		{"named feature", func(b []byte) {
			be.PutUint64(b[72:], 1<<5)
			// Rename the first feature table entry to bit 5.
			off := HeaderLen + 8
			b[off+1] = 5
			copy(b[off+2:off+48], "time travel\x00\x00\x00")
		}, "Unsupported qcow2 feature(s): time travel"},
		{"huge L1", func(b []byte) { be.PutUint32(b[36:], 0xffffffff) }, "Active L1 table too large"},
		{"L1 beyond file", func(b []byte) { be.PutUint64(b[40:], 1<<40) }, "Active L1 table (offset 0x10000000000, 1 entries) extends beyond the end of the file"},
		{"L1 unaligned", func(b []byte) { be.PutUint64(b[40:], 3*65536+8) }, "Active L1 table offset invalid"},
		{"L1 too small", func(b []byte) { be.PutUint64(b[24:], 1<<40) }, "L1 table is too small"},
		{"too big", func(b []byte) { be.PutUint64(b[24:], 1<<62) }, "Image is too big"},
		{"no reftable", func(b []byte) { be.PutUint32(b[56:], 0) }, "Image does not contain a reference count table"},
		{"reftable too large", func(b []byte) { be.PutUint32(b[56:], 1<<20) }, "Reference count table too large"},
		{"reftable beyond file", func(b []byte) { be.PutUint64(b[48:], 1<<45) }, "Reference count table (offset 0x200000000000, 1 clusters) extends beyond the end of the file"},
		{"refcount order", func(b []byte) { be.PutUint32(b[96:], 7) }, "Reference count entry width too large; may not exceed 64 bits"},
		{"snapshots", func(b []byte) { be.PutUint32(b[60:], 1<<20) }, "Snapshot table too large"},
		{"backing offset", func(b []byte) { be.PutUint64(b[8:], 1<<20) }, "Invalid backing file offset"},
		{"backing name", func(b []byte) { be.PutUint64(b[8:], 60000); be.PutUint32(b[16:], 5000) }, "Backing file name too long"},
		{"extension too large", func(b []byte) { be.PutUint32(b[HeaderLen+4:], 1<<20) }, "Header extension too large"},
		{"compression", func(b []byte) { b[104] = 1 }, "qcow2: Compression type incompatible feature bit must be set"},
		{"compression type", func(b []byte) { b[104] = 9; be.PutUint64(b[72:], IncompatCompression) }, "qcow2: unknown compression type: 9"},
		{"extl2 subclusters", func(b []byte) { be.PutUint32(b[20:], 12); be.PutUint64(b[72:], IncompatExtL2) }, "Unsupported subcluster size: 128"},
		{"luks without header", func(b []byte) { be.PutUint32(b[32:], 2) }, "Missing CRYPTO header for crypt method 2"},
		{"crypt method", func(b []byte) { be.PutUint32(b[32:], 7) }, "Unsupported encryption method 7"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := minimal(3, 16, 1<<20)
			c.mod(img)
			_, err := Parse(memImage(img), int64(len(img)))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
}

func TestCheckMinimal(t *testing.T) {
	for _, v := range []uint32{2, 3} {
		img := minimal(v, 16, 1<<20)
		res, err := Check(memImage(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		if !res.OK() {
			t.Fatalf("v%d: %+v", v, res)
		}
		// A leak and a missing reference.
		SetRefcount(img[2<<16:3<<16], 1, 4, 0)
		SetRefcount(img[2<<16:3<<16], 3, 4, 2)
		res, err = Check(memImage(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		if res.Corruptions != 1 || res.Leaks != 1 {
			t.Fatalf("v%d: %+v", v, res)
		}
	}
}

// TestCheckTablesPastEnd checks images whose L1 or refcount table lies
// past the end of the file as QEMU's check counts them: a region reaching
// a cluster or more past the end is one corruption and counts nowhere, a
// region ending less than a cluster past it counts there, and table
// entries past the end read as zeroes.
func TestCheckTablesPastEnd(t *testing.T) {
	be := binary.BigEndian
	cases := []struct {
		name                       string
		mod                        func(b []byte)
		corruptions, leaks, beyond int
		rebuild                    bool
	}{
		// The old L1 cluster leaks; the table is one corruption.
		{"L1 far past the end", func(b []byte) { be.PutUint64(b[40:], 1<<40) }, 1, 1, 1, false},
		// The L1 table ends 8 bytes into cluster 4, which has no refcount.
		{"L1 at the end", func(b []byte) { be.PutUint64(b[40:], 4<<16) }, 1, 1, 0, true},
		// Nothing has a refcount: the header and the L1 table are errors.
		{"refcount table past the end", func(b []byte) { be.PutUint64(b[48:], 1<<40) }, 3, 0, 1, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := minimal(3, 16, 1<<20)
			c.mod(img)
			if _, err := Parse(memImage(img), int64(len(img))); err == nil && c.beyond > 0 {
				t.Fatal("a normal parse accepted a table past the end of the file")
			}
			if _, err := ParseWith(memImage(img), int64(len(img)), ParseOptions{TablesPastEnd: true}); err != nil {
				t.Fatal(err)
			}
			res, err := Check(memImage(img), int64(len(img)))
			if err != nil {
				t.Fatal(err)
			}
			if res.Corruptions != c.corruptions || res.Leaks != c.leaks || res.Beyond != c.beyond || res.NeedRebuild != c.rebuild {
				t.Fatalf("got %d corruptions, %d leaks, %d past the end, rebuild %v (%q); want %d, %d, %d, %v",
					res.Corruptions, res.Leaks, res.Beyond, res.NeedRebuild, res.Messages, c.corruptions, c.leaks, c.beyond, c.rebuild)
			}
		})
	}
}

func TestDecompressRoundTrip(t *testing.T) {
	src := bytes.Repeat([]byte("qcow2 compressed cluster "), 3000)[:65536]
	for _, typ := range []uint8{CompressionZlib, CompressionZstd} {
		c, err := Compress(typ, src)
		if err != nil || c == nil {
			t.Fatal(err)
		}
		// Trailing garbage up to the sector end is allowed.
		c = append(c, 0xde, 0xad, 0xbe, 0xef)
		dst := make([]byte, len(src))
		if err := Decompress(typ, dst, c); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(dst, src) {
			t.Fatalf("type %d: round trip differs", typ)
		}
		if err := Decompress(typ, dst, c[:len(c)/2]); err == nil {
			t.Fatalf("type %d: truncated data decompressed", typ)
		}
	}
}

// TestTestdata checks every image in testdata (made by qemu-img) with the
// package's own checker, and the bitmap directory of bitmap.qcow2.
func TestTestdata(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow2"))
	if len(files) == 0 {
		t.Fatal("no testdata")
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		res, err := Check(memImage(b), int64(len(b)))
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if !res.OK() {
			t.Fatalf("%s: %+v", p, res)
		}
		if filepath.Base(p) == "bitmap.qcow2" {
			h, _ := Parse(memImage(b), int64(len(b)))
			bms, err := Bitmaps(memImage(b), h, int64(len(b)))
			if err != nil || len(bms) != 2 || bms[0].Name != "b0" || bms[0].Flags != BitmapAuto || bms[1].Flags != 0 || bms[0].GranularityBits != 12 {
				t.Fatalf("bitmaps %+v %v", bms, err)
			}
		}
		if filepath.Base(p) == "snap.qcow2" {
			h, _ := Parse(memImage(b), int64(len(b)))
			s, _, err := Snapshots(memImage(b), h)
			if err != nil || len(s) != 1 || s[0].Name != "s1" || s[0].DiskSize != 64<<10 {
				t.Fatalf("snapshots %+v %v", s, err)
			}
		}
	}
}
