package qcow2fmt

import (
	"fmt"
	"io"
	"math"
)

// Refs are the reference counts an image's metadata implies, one per host
// cluster of the image file: the header, the active and snapshot L1 and L2
// tables and the data clusters they map, the snapshot table, the refcount
// table and blocks, the encryption header and the bitmaps.
type Refs struct {
	g      Geometry
	counts []uint32 // saturating
	// Problems are structural errors met while walking (corruptions).
	Problems []string
	// Beyond counts regions that reach a cluster or more past the end of
	// the file (QEMU's check counts each as one corruption and leaves it
	// out of the references), and BeyondMessages names them in QEMU's
	// words. They do not stop a repair of the refcounts.
	Beyond         int
	BeyondMessages []string
	// CopiedErrors counts active L1/L2 entries whose COPIED flag
	// disagrees with the refcount (filled by Check).
	CopiedErrors int
	// DataEnd is the highest byte referenced in the image file.
	DataEnd int64

	fileSize int64
}

// table reads the entries of a table that lie inside the file: those past
// its end read as zeroes (as QEMU reads them), which mean nothing, so they
// are left out and the slice may be shorter than n. Hostile sizes cannot
// make it allocate more than the file holds.
func (r *Refs) table(rd io.ReaderAt, off, n int64) ([]uint64, error) {
	if n < 0 || off < 0 {
		return nil, fmt.Errorf("table at %#x with %d entries is invalid", off, n)
	}
	if off >= r.fileSize {
		return nil, nil
	}
	if in := (r.fileSize - off) / 8; n > in {
		n = in
	}
	return ReadTable(rd, off, n)
}

// maxProblems bounds the messages kept.
const maxProblems = 100

func (r *Refs) problem(format string, a ...any) {
	if len(r.Problems) < maxProblems {
		r.Problems = append(r.Problems, fmt.Sprintf(format, a...))
	} else if len(r.Problems) == maxProblems {
		r.Problems = append(r.Problems, "(further problems not listed)")
	}
}

// Clusters is the number of clusters counted (the file size in clusters).
func (r *Refs) Clusters() int64 { return int64(len(r.counts)) }

// Count returns the number of references to cluster i.
func (r *Refs) Count(i int64) uint64 {
	if i < 0 || i >= int64(len(r.counts)) {
		return 0
	}
	return uint64(r.counts[i])
}

// Add counts one more reference to every cluster of [off, off+size), as
// qcow2_inc_refcounts_imrt: a region may end less than a cluster past the
// end of the file (a last cluster written in part), and its clusters there
// count too; a region reaching a cluster or more past the end is one
// corruption and counts nowhere.
func (r *Refs) Add(off, size int64) {
	if size <= 0 {
		return
	}
	if off < 0 || off > math.MaxInt64-size || off+size-r.fileSize >= r.g.ClusterSize {
		r.Beyond++
		if len(r.BeyondMessages) < maxProblems {
			r.BeyondMessages = append(r.BeyondMessages, fmt.Sprintf("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset %#x size %#x", uint64(off), size))
		}
		return
	}
	if end := off + size; end > r.DataEnd {
		r.DataEnd = end
	}
	first := off >> r.g.ClusterBits
	last := (off + size - 1) >> r.g.ClusterBits
	for int64(len(r.counts)) <= last {
		r.counts = append(r.counts, 0)
	}
	for c := first; c <= last; c++ {
		if r.counts[c] != math.MaxUint32 {
			r.counts[c]++
		}
	}
}

// References walks every metadata structure of the image and counts the
// references to each host cluster. It reads one table at a time; memory is
// four bytes per cluster of the file.
func References(rd io.ReaderAt, h *Header, fileSize int64) (*Refs, error) {
	g := h.Geometry()
	n := (fileSize + g.ClusterSize - 1) >> g.ClusterBits
	if n > 1<<34 {
		return nil, fmt.Errorf("image file too large to check (%d clusters)", n)
	}
	r := &Refs{g: g, counts: make([]uint32, n), fileSize: fileSize}
	cs := g.ClusterSize
	r.Add(0, cs)
	// Active L1.
	if err := r.walkL1(rd, h, int64(h.L1TableOffset), int64(h.L1Size), "active"); err != nil {
		return nil, err
	}
	// Snapshots.
	snaps, snapSize, err := Snapshots(rd, h)
	if err != nil {
		r.problem("snapshot table: %v", err)
	} else {
		r.Add(int64(h.SnapshotsOffset), snapSize)
		for i, s := range snaps {
			if err := r.walkL1(rd, h, int64(s.L1TableOffset), int64(s.L1Size), fmt.Sprintf("snapshot %d", i)); err != nil {
				return nil, err
			}
		}
	}
	// Refcount table and blocks.
	rtEntries := int64(h.RefcountTableClusters) << (g.ClusterBits - 3)
	r.Add(int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)*cs)
	rt, err := r.table(rd, int64(h.RefcountTableOffset), rtEntries)
	if err != nil {
		return nil, fmt.Errorf("reading refcount table: %w", err)
	}
	for i, e := range rt {
		off := int64(e & ReftOffsetMask)
		if e&ReftReservedMask != 0 {
			r.problem("refcount table entry %d has reserved bits set (%#x)", i, e)
		}
		if off == 0 {
			continue
		}
		if off&(cs-1) != 0 || off < 0 {
			r.problem("refblock offset %#x invalid (reftable index %d)", uint64(off), i)
			continue
		}
		r.Add(off, cs)
	}
	// Encryption header.
	if h.Crypto != nil {
		r.Add(int64(h.Crypto.Offset), int64(h.Crypto.Length))
	}
	// Bitmaps.
	if h.Bitmaps != nil {
		bms, err := Bitmaps(rd, h, fileSize)
		if err != nil {
			r.problem("bitmaps: %v", err)
		} else {
			r.Add(int64(h.Bitmaps.DirOffset), int64(h.Bitmaps.DirSize))
			for _, b := range bms {
				r.Add(int64(b.TableOffset), int64(b.TableSize)*8)
				t, err := r.table(rd, int64(b.TableOffset), int64(b.TableSize))
				if err != nil {
					r.problem("bitmap '%s' table: %v", b.Name, err)
					continue
				}
				for _, e := range t {
					if off := int64(e & 0x00fffffffffffe00); off != 0 {
						r.Add(off, cs)
					}
				}
			}
		}
	}
	return r, nil
}

func (r *Refs) walkL1(rd io.ReaderAt, h *Header, l1off, l1size int64, which string) error {
	g := r.g
	if l1size == 0 {
		return nil
	}
	r.Add(l1off, l1size*8)
	l1, err := r.table(rd, l1off, l1size)
	if err != nil {
		r.problem("reading %s L1 table: %v", which, err)
		return nil
	}
	l2 := make([]byte, g.ClusterSize)
	for i, e := range l1 {
		l2off := int64(e & L1OffsetMask)
		if l2off == 0 {
			continue
		}
		if err := g.CheckL1Entry(e); err != nil {
			r.problem("%s L1 entry %d: %v", which, i, err)
			if l2off&(g.ClusterSize-1) != 0 {
				continue
			}
		}
		r.Add(l2off, g.ClusterSize)
		if l2off >= r.fileSize {
			continue // reads as zeroes: no entries
		}
		if err := readAt(rd, l2, l2off); err != nil {
			r.problem("reading %s L2 table at %#x: %v", which, l2off, err)
			continue
		}
		for j := int64(0); j < g.L2Entries; j++ {
			le, bm := g.L2Entry(l2, j)
			if le == 0 && bm == 0 {
				continue
			}
			if err := g.CheckL2Entry(le, bm); err != nil {
				r.problem("%s L2 table at %#x, entry %d: %v", which, l2off, j, err)
				continue
			}
			switch g.ClusterType(le) {
			case ClusterCompressed:
				off, size := g.Compressed(le)
				r.Add(off, size)
			case ClusterNormal, ClusterZeroAlloc:
				if !g.DataFile {
					r.Add(HostOffset(le), g.ClusterSize)
				}
			}
		}
	}
	return nil
}

// CheckResult summarises a consistency check, as qemu-img check does.
type CheckResult struct {
	Corruptions int
	Leaks       int
	// Messages describe the first problems found.
	Messages []string
	// ImageEnd is the end of the last cluster that is referenced or has
	// a refcount (QEMU's image end offset).
	ImageEnd int64
	// Guest clusters of the active tables that are allocated (data,
	// allocated zero, compressed), of those the compressed ones, and the
	// fragmented ones: compressed, or not following the previous cluster
	// of the same L2 table on the host (QEMU's BlockFragInfo).
	Allocated, Compressed, Fragmented int64
	// CopiedErrors are the corruptions that are COPIED flags disagreeing
	// with the stored refcount (included in Corruptions).
	CopiedErrors int
	// Beyond are the corruptions that are regions reaching a cluster or
	// more past the end of the file (included in Corruptions): a repair
	// of the refcounts leaves them.
	Beyond int
	// NeedRebuild: a referenced cluster has no refcount at all (QEMU
	// rebuilds the refcount structures then, and fixing leaks alone
	// cannot help).
	NeedRebuild bool
}

// OK reports a clean image.
func (c *CheckResult) OK() bool { return c.Corruptions == 0 && c.Leaks == 0 }

// Check compares the refcounts stored in the image with those its metadata
// implies, and the COPIED flags of the active tables with the refcounts.
func Check(rd io.ReaderAt, fileSize int64) (*CheckResult, error) {
	h, err := ParseWith(rd, fileSize, ParseOptions{TablesPastEnd: true})
	if err != nil {
		return nil, err
	}
	refs, err := References(rd, h, fileSize)
	if err != nil {
		return nil, err
	}
	res := &CheckResult{}
	res.Corruptions = len(refs.Problems) + refs.Beyond
	res.Beyond = refs.Beyond
	res.Messages = append(res.Messages, refs.BeyondMessages...)
	res.Messages = append(res.Messages, refs.Problems...)
	stored, err := StoredRefcounts(rd, h, fileSize)
	if err != nil {
		return nil, err
	}
	msg := func(format string, a ...any) {
		if len(res.Messages) < maxProblems {
			res.Messages = append(res.Messages, fmt.Sprintf(format, a...))
		}
	}
	for i := int64(0); i < refs.Clusters(); i++ {
		want, got := refs.Count(i), stored(i)
		if want > refs.g.RefcountMax {
			want = refs.g.RefcountMax
		}
		if got == 0 && want > 0 {
			res.NeedRebuild = true
		}
		switch {
		case got < want:
			res.Corruptions++
			msg("ERROR cluster %d refcount=%d reference=%d", i, got, want)
		case got > want:
			res.Leaks++
			msg("Leaked cluster %d refcount=%d reference=%d", i, got, want)
		}
		if want > 0 || got > 0 {
			res.ImageEnd = (i + 1) << refs.g.ClusterBits
		}
	}
	// COPIED flags of the active L1 and L2 tables.
	g := refs.g
	l1, err := refs.table(rd, int64(h.L1TableOffset), int64(h.L1Size))
	if err == nil {
		l2 := make([]byte, g.ClusterSize)
		for i, e := range l1 {
			off := int64(e & L1OffsetMask)
			if off == 0 || off&(g.ClusterSize-1) != 0 {
				continue
			}
			if (stored(off>>g.ClusterBits) == 1) != (e&OflagCopied != 0) {
				res.Corruptions++
				res.CopiedErrors++
				msg("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, stored(off>>g.ClusterBits))
			}
			if readAt(rd, l2, off) != nil {
				continue
			}
			var next int64
			for j := int64(0); j < g.L2Entries; j++ {
				le, _ := g.L2Entry(l2, j)
				t := g.ClusterType(le)
				if t == ClusterCompressed {
					res.Allocated++
					res.Compressed++
					res.Fragmented++
				}
				if t != ClusterNormal && t != ClusterZeroAlloc {
					continue
				}
				res.Allocated++
				if host := HostOffset(le); next != 0 && host != next {
					res.Fragmented++
				}
				next = HostOffset(le) + g.ClusterSize
				if g.DataFile {
					continue
				}
				hc := HostOffset(le) >> g.ClusterBits
				if (stored(hc) == 1) != (le&OflagCopied != 0) {
					res.Corruptions++
					res.CopiedErrors++
					msg("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", le, stored(hc))
				}
			}
		}
	}
	return res, nil
}

// StoredRefcounts returns a function reading the refcounts stored in the
// image (0 for clusters without a refcount block).
func StoredRefcounts(rd io.ReaderAt, h *Header, fileSize int64) (func(int64) uint64, error) {
	g := h.Geometry()
	rtEntries := int64(h.RefcountTableClusters) << (g.ClusterBits - 3)
	rt, err := (&Refs{fileSize: fileSize}).table(rd, int64(h.RefcountTableOffset), rtEntries)
	if err != nil {
		return nil, fmt.Errorf("reading refcount table: %w", err)
	}
	var cur int64 = -1
	block := make([]byte, g.ClusterSize)
	valid := false
	return func(i int64) uint64 {
		ri := i >> g.RefblockBits
		if ri >= int64(len(rt)) {
			return 0
		}
		if ri != cur {
			cur = ri
			off := int64(rt[ri] & ReftOffsetMask)
			valid = off > 0 && off&(g.ClusterSize-1) == 0 && readAt(rd, block, off) == nil
		}
		if !valid {
			return 0
		}
		return Refcount(block, i&(g.RefblockSize-1), g.RefcountOrder)
	}, nil
}
