package qcow2fmt

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// seeds adds a few built images and the images in testdata, cut to
// limit bytes (large inputs make the fuzzer's minimisation very slow).
func seeds(f *testing.F, limit int) {
	for _, v := range []uint32{2, 3} {
		for _, bits := range []uint32{9, 12} {
			f.Add(minimal(v, bits, 1<<20))
		}
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow2"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b[:min(len(b), limit)])
		}
	}
}

// FuzzHeader parses arbitrary bytes as an image header with extensions;
// whatever parses must marshal and parse again to the same header.
func FuzzHeader(f *testing.F) {
	seeds(f, 4096)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := Parse(memImage(data), int64(len(data)))
		if err != nil {
			return
		}
		if h.ClusterSize() < HeaderV2Len || h.L1Size > MaxL1Size/8 {
			t.Fatalf("accepted hostile geometry %+v", h)
		}
		h.BitmapsIgnored = false
		buf, err := h.Marshal(true)
		if err != nil {
			return // extensions that do not fit with the feature table
		}
		img := append(buf, make([]byte, max(0, len(data)-len(buf)))...)
		copy(img[len(buf):], data[min(len(buf), len(data)):])
		h2, err := Parse(memImage(img), int64(len(img)))
		if err != nil {
			t.Fatalf("re-parse of a marshalled header: %v", err)
		}
		if h2.BackingFile != h.BackingFile || h2.BackingFormat != h.BackingFormat || h2.Size != h.Size || len(h2.Unknown) != len(h.Unknown) {
			t.Fatalf("round trip: %+v vs %+v", h2, h)
		}
	})
}

// FuzzL2 decodes arbitrary L2 tables in every geometry: entry types,
// compressed descriptors and validation never panic and agree.
func FuzzL2(f *testing.F) {
	f.Add(make([]byte, 512), uint8(9), false, false)
	e := make([]byte, 64)
	binary.BigEndian.PutUint64(e, OflagCopied|0x10000)
	binary.BigEndian.PutUint64(e[8:], 0x1|1<<33)
	binary.BigEndian.PutUint64(e[16:], OflagCompressed|0x123456)
	f.Add(e, uint8(16), true, false)
	f.Add(e, uint8(14), false, true)
	f.Fuzz(func(t *testing.T, table []byte, bits uint8, ext, dataFile bool) {
		cb := uint32(MinClusterBits + int(bits)%(MaxClusterBits-MinClusterBits+1))
		if ext && cb < 14 {
			cb = 14
		}
		g := NewGeometry(cb, ext, 4, dataFile)
		n := int64(len(table) / g.L2EntrySize)
		for i := int64(0); i < n; i++ {
			le, bm := g.L2Entry(table, i)
			err := g.CheckL2Entry(le, bm)
			for sc := 0; sc < g.Subclusters; sc++ {
				st := g.Subcluster(le, bm, sc)
				if err == nil && st == SubInvalid {
					t.Fatalf("valid entry %#x/%#x has an invalid subcluster %d", le, bm, sc)
				}
			}
			if g.ClusterType(le) == ClusterCompressed {
				off, size := g.Compressed(le)
				if off < 0 || size <= 0 || size > 2*g.ClusterSize {
					t.Fatalf("compressed %#x: %#x+%d", le, off, size)
				}
				if e2, err := g.CompressedEntry(off, size); err == nil {
					if o2, s2 := g.Compressed(e2); o2 != off || s2 != size {
						t.Fatalf("descriptor round trip %#x: %#x+%d vs %#x+%d", le, off, size, o2, s2)
					}
				}
			}
			g.SetL2Entry(table, i, le, bm)
		}
	})
}

// FuzzRefcount stores and loads refcounts of every width.
func FuzzRefcount(f *testing.F) {
	f.Add(make([]byte, 64), uint8(4), uint16(3), uint64(7))
	f.Fuzz(func(t *testing.T, block []byte, order uint8, idx uint16, v uint64) {
		o := uint32(order % 7)
		if len(block) == 0 {
			return
		}
		n := int64(len(block)*8) >> o
		if n == 0 {
			return
		}
		i := int64(idx) % n
		width := uint(1) << o
		if width < 64 {
			v &= 1<<width - 1
		}
		before := append([]byte(nil), block...)
		SetRefcount(block, i, o, v)
		if got := Refcount(block, i, o); got != v {
			t.Fatalf("order %d index %d: %d, want %d", o, i, got, v)
		}
		for j := int64(0); j < n; j++ {
			if j != i && Refcount(block, j, o) != Refcount(before, j, o) {
				t.Fatalf("order %d: writing %d changed %d", o, i, j)
			}
		}
	})
}

// FuzzCheck walks every table of an arbitrary image (bounded by its size)
// without panicking or allocating beyond it.
func FuzzCheck(f *testing.F) {
	seeds(f, 8<<10)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4<<20 {
			return
		}
		res, err := Check(memImage(data), int64(len(data)))
		if err != nil || res == nil {
			return
		}
		if res.ImageEnd > int64(len(data))+(2<<20) {
			t.Fatalf("image end %d beyond %d", res.ImageEnd, len(data))
		}
	})
}

// FuzzDecompress feeds arbitrary compressed data to both decoders.
func FuzzDecompress(f *testing.F) {
	src := bytes.Repeat([]byte("abc"), 200)
	for _, typ := range []uint8{CompressionZlib, CompressionZstd} {
		c, _ := Compress(typ, append(src, make([]byte, 512-len(src)%512)...))
		f.Add(typ, c)
	}
	f.Fuzz(func(t *testing.T, typ uint8, data []byte) {
		dst := make([]byte, 4096)
		_ = Decompress(typ%2, dst, data)
	})
}

// FuzzSnapshots parses arbitrary snapshot tables.
func FuzzSnapshots(f *testing.F) {
	f.Add([]byte{}, uint8(1))
	f.Fuzz(func(t *testing.T, table []byte, n uint8) {
		img := minimal(3, 12, 1<<20)
		off := len(img)
		img = append(img, table...)
		h, err := Parse(memImage(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		h.NbSnapshots = uint32(n)
		h.SnapshotsOffset = uint64(off)
		snaps, size, err := Snapshots(memImage(img), h)
		if err == nil && (len(snaps) != int(n) || size > int64(len(table))) {
			t.Fatalf("%d snapshots of %d bytes from a %d-byte table", len(snaps), size, len(table))
		}
		if err != nil {
			return
		}
		// What parses, MarshalSnapshots writes back to the same entries.
		again := append(img[:off:off], MarshalSnapshots(snaps)...)
		back, _, err := Snapshots(memImage(again), h)
		if err != nil {
			t.Fatalf("re-reading a written table: %v", err)
		}
		for i := range snaps {
			a, b := snaps[i], back[i]
			a.ExtraData, b.ExtraData = nil, nil
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("snapshot %d: wrote %+v, read %+v", i, a, b)
			}
		}
	})
}
