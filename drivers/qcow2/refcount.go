package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"blockd/drivers/qcow2/qcow2fmt"
)

// rblock is a cached refcount block.
type rblock struct {
	off   int64
	data  []byte
	dirty bool
	used  uint64
}

// rcCache caches refcount blocks by refcount table index. It is only used
// with image.metaMu held.
type rcCache struct {
	m        map[int64]*rblock
	capacity int
	tick     uint64
}

func newRCCache(capacity int) *rcCache {
	return &rcCache{m: map[int64]*rblock{}, capacity: max(capacity, 4)}
}

// errRefcountRange is returned when a refcount would overflow.
var errRefcountRange = errors.New("qcow2: refcount overflow")

// refblock returns the refcount block for table index ri, or nil when it is
// not allocated. metaMu is held.
func (m *image) refblock(ctx context.Context, ri int64) (*rblock, error) {
	if b := m.rc.m[ri]; b != nil {
		m.rc.tick++
		b.used = m.rc.tick
		return b, nil
	}
	if ri >= int64(len(m.reftable)) {
		return nil, nil
	}
	e := m.reftable[ri]
	off := int64(e & qcow2fmt.ReftOffsetMask)
	if off == 0 {
		return nil, nil
	}
	if off&(m.cs()-1) != 0 || off < 0 {
		return nil, m.corruptLocked(ctx, true, -1, -1, "Refblock offset %#x unaligned (reftable index: %#x)", uint64(off), ri)
	}
	if off+m.cs() > m.file.Size() {
		return nil, m.corruptLocked(ctx, true, -1, -1, "Refblock offset %#x beyond the end of the image file (reftable index: %#x)", off, ri)
	}
	if err := m.evictRefblocks(ctx); err != nil {
		return nil, err
	}
	b := &rblock{off: off, data: make([]byte, m.cs())}
	if err := m.file.ReadAt(ctx, b.data, off); err != nil {
		return nil, err
	}
	m.rc.tick++
	b.used = m.rc.tick
	m.rc.m[ri] = b
	return b, nil
}

// evictRefblocks makes room for one more block, writing dirty ones back if
// every block is dirty. metaMu is held.
func (m *image) evictRefblocks(ctx context.Context) error {
	for len(m.rc.m) >= m.rc.capacity {
		var victim int64 = -1
		var oldest uint64
		for ri, b := range m.rc.m {
			if !b.dirty && (victim < 0 || b.used < oldest) {
				victim, oldest = ri, b.used
			}
		}
		if victim < 0 {
			if _, err := m.flushRefblocks(ctx); err != nil {
				return err
			}
			continue
		}
		delete(m.rc.m, victim)
	}
	return nil
}

// refcount returns the refcount of host cluster c. metaMu is held.
func (m *image) refcount(ctx context.Context, c int64) (uint64, error) {
	b, err := m.refblock(ctx, c>>m.g.RefblockBits)
	if err != nil || b == nil {
		return 0, err
	}
	return qcow2fmt.Refcount(b.data, c&(m.g.RefblockSize-1), m.g.RefcountOrder), nil
}

// addRefcount changes the refcount of cluster c by delta, creating its
// refcount block if needed. metaMu is held.
func (m *image) addRefcount(ctx context.Context, c int64, delta int64) error {
	ri := c >> m.g.RefblockBits
	b, err := m.refblock(ctx, ri)
	if err != nil {
		return err
	}
	if b == nil {
		if delta < 0 {
			return m.corruptLocked(ctx, true, -1, -1, "Preventing invalid refcount decrement of cluster %#x without a refcount block", c<<m.g.ClusterBits)
		}
		if err := m.createRefblock(ctx, ri, m.refblockSpot(ctx, ri, -1, -1)); err != nil {
			return err
		}
		if b, err = m.refblock(ctx, ri); err != nil {
			return err
		}
		if b == nil {
			return fmt.Errorf("qcow2: refcount block %d missing after allocation", ri)
		}
	}
	i := c & (m.g.RefblockSize - 1)
	v := qcow2fmt.Refcount(b.data, i, m.g.RefcountOrder)
	switch {
	case delta > 0 && v+uint64(delta) > m.g.RefcountMax:
		return errRefcountRange
	case delta < 0 && v < uint64(-delta):
		return m.corruptLocked(ctx, true, c<<m.g.ClusterBits, m.cs(), "Preventing invalid refcount decrement of cluster %#x (refcount %d)", c<<m.g.ClusterBits, v)
	}
	nv := uint64(int64(v) + delta)
	qcow2fmt.SetRefcount(b.data, i, m.g.RefcountOrder, nv)
	b.dirty = true
	if nv == 0 && c < m.freeHint {
		m.freeHint = c
	}
	if nv == 0 && m.packOff != 0 && m.packOff>>m.g.ClusterBits == c {
		// The cluster compressed data was packed into is free now.
		m.packOff = 0
	}
	return nil
}

// setRefcount stores an absolute refcount (repair). metaMu is held.
func (m *image) setRefcount(ctx context.Context, c int64, v uint64) error {
	cur, err := m.refcount(ctx, c)
	if err != nil {
		return err
	}
	if cur == v {
		return nil
	}
	if v > cur {
		return m.addRefcount(ctx, c, int64(v-cur))
	}
	return m.addRefcount(ctx, c, -int64(cur-v))
}

// flushRefblocks writes the dirty refcount blocks and returns how many.
// metaMu is held.
func (m *image) flushRefblocks(ctx context.Context) (int, error) {
	var dirty []int64
	for ri, b := range m.rc.m {
		if b.dirty {
			dirty = append(dirty, ri)
		}
	}
	slices.SortFunc(dirty, func(a, b int64) int { return int(m.rc.m[a].off>>20) - int(m.rc.m[b].off>>20) })
	for _, ri := range dirty {
		b := m.rc.m[ri]
		if k := m.overlaps(b.off, m.cs(), olRefcountBlock); k != 0 {
			return 0, m.corruptLocked(ctx, true, b.off, m.cs(), "Preventing invalid write on metadata (overlaps with %s)", k)
		}
		if err := m.file.WriteAt(ctx, b.data, b.off, 0); err != nil {
			return 0, err
		}
		b.dirty = false
	}
	return len(dirty), nil
}

// free reports whether cluster c may be allocated. metaMu is held.
func (m *image) isFree(ctx context.Context, c int64) (bool, error) {
	if m.reserved != nil && m.reserved(c) {
		return false, nil
	}
	v, err := m.refcount(ctx, c)
	return v == 0, err
}

// findFree returns the first run of n free clusters at or after from.
// metaMu is held.
func (m *image) findFree(ctx context.Context, from, n int64) (int64, error) {
	start, run := from, int64(0)
	for c := from; ; c++ {
		if c > qcow2fmt.MaxClusterOffset>>m.g.ClusterBits {
			return 0, fmt.Errorf("qcow2: image file full: %w", errNoSpace)
		}
		// Skip whole ranges without a refcount block quickly.
		if c&(m.g.RefblockSize-1) == 0 && m.reserved == nil {
			ri := c >> m.g.RefblockBits
			if _, cached := m.rc.m[ri]; !cached && (ri >= int64(len(m.reftable)) || m.reftable[ri] == 0) {
				if run == 0 {
					start = c
				}
				if run+m.g.RefblockSize >= n {
					return start, nil
				}
				run += m.g.RefblockSize
				c += m.g.RefblockSize - 1
				continue
			}
		}
		ok, err := m.isFree(ctx, c)
		if err != nil {
			return 0, err
		}
		if !ok {
			run = 0
			continue
		}
		if run == 0 {
			start = c
		}
		run++
		if run == n {
			return start, nil
		}
	}
}

// refblockSpot chooses where the refcount block for table index ri goes:
// the first free cluster after an allocation [lo, hi) if that is in ri's
// own range (what QEMU does), else the first free cluster of ri's range
// outside it. metaMu is held.
func (m *image) refblockSpot(ctx context.Context, ri, lo, hi int64) int64 {
	first := ri << m.g.RefblockBits
	last := first + m.g.RefblockSize
	if hi >= 0 {
		if c, err := m.findFree(ctx, hi, 1); err == nil && c >= first && c < last {
			return c
		}
	}
	for c := first; c < last; c++ {
		if c >= lo && c < hi {
			continue
		}
		if m.reserved == nil || !m.reserved(c) {
			return c
		}
	}
	return first
}

// createRefblock makes a new, empty refcount block for table index ri at
// cluster at, which must lie in ri's range (so that the block counts
// itself). metaMu is held.
func (m *image) createRefblock(ctx context.Context, ri, at int64) error {
	if ri >= int64(len(m.reftable)) {
		if err := m.growReftable(ctx, ri); err != nil {
			return err
		}
		if m.reftable[ri] != 0 {
			return nil
		}
	}
	if at>>m.g.RefblockBits != ri {
		return fmt.Errorf("qcow2: refcount block %d placed outside its range", ri)
	}
	cs := m.cs()
	data := make([]byte, cs)
	qcow2fmt.SetRefcount(data, at&(m.g.RefblockSize-1), m.g.RefcountOrder, 1)
	off := at * cs
	if k := m.overlaps(off, cs, 0); k != 0 {
		return m.corruptLocked(ctx, true, off, cs, "Preventing invalid write on metadata (overlaps with %s)", k)
	}
	if err := m.writeMeta(ctx, data, off); err != nil {
		return err
	}
	// The block must be stable before the table points to it.
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], uint64(off))
	if err := m.writeMeta(ctx, e[:], int64(m.h.RefcountTableOffset)+8*ri); err != nil {
		return err
	}
	m.reftable[ri] = uint64(off)
	m.adjust(at, 1)
	m.addClusterKind(off, olRefcountBlock)
	if err := m.evictRefblocks(ctx); err != nil {
		return err
	}
	m.rc.tick++
	m.rc.m[ri] = &rblock{off: off, data: data, used: m.rc.tick}
	return nil
}

// growReftable makes the refcount table cover index need: new refcount
// blocks and a new, larger table go at the end of the file, counting
// themselves (QEMU's qcow2_refcount_area), then the header switches to the
// new table and the old one is freed. metaMu is held.
func (m *image) growReftable(ctx context.Context, need int64) error {
	cs := m.cs()
	bits := m.g.RefblockBits
	oldN := int64(len(m.reftable))
	fileEnd := (m.file.Size() + cs - 1) / cs
	s := max(fileEnd, oldN<<bits)
	for m.reserved != nil && m.reserved(s) {
		s++
	}
	nb, nt := int64(1), int64(0)
	var newN int64
	for {
		end := s + nb + nt
		firstRi, lastRi := s>>bits, (end-1)>>bits
		newN = max(need+1, lastRi+1, oldN)
		nt2 := (newN*8 + cs - 1) / cs
		nb2 := lastRi - firstRi + 1
		if nb2 == nb && nt2 == nt {
			break
		}
		nb, nt = nb2, nt2
	}
	if nt*cs > qcow2fmt.MaxReftableSize {
		return fmt.Errorf("qcow2: refcount table would exceed %d bytes: %w", qcow2fmt.MaxReftableSize, errNoSpace)
	}
	newN = nt * cs / 8
	area := make([]byte, (nb+nt)*cs)
	firstRi := s >> bits
	table := make([]uint64, newN)
	copy(table, m.reftable)
	for k := int64(0); k < nb; k++ {
		table[firstRi+k] = uint64((s + k) * cs)
	}
	for c := s; c < s+nb+nt; c++ {
		m.adjust(c, 1)
		k := (c >> bits) - firstRi
		qcow2fmt.SetRefcount(area[k*cs:(k+1)*cs], c&(m.g.RefblockSize-1), m.g.RefcountOrder, 1)
	}
	copy(area[nb*cs:], qcow2fmt.EncodeTable(table))
	if err := m.writeMeta(ctx, area, s*cs); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[0:], uint64((s+nb)*cs))
	binary.BigEndian.PutUint32(hdr[8:], uint32(nt))
	if err := m.file.WriteAt(ctx, hdr[:], 48, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	oldOff, oldClusters := int64(m.h.RefcountTableOffset), int64(m.h.RefcountTableClusters)
	m.h.RefcountTableOffset = uint64((s + nb) * cs)
	m.h.RefcountTableClusters = uint32(nt)
	m.reftable = table
	m.setRange(olRefcountTable, olRange{off: (s + nb) * cs, end: (s + nb + nt) * cs})
	for k := int64(0); k < nb; k++ {
		m.addClusterKind((s+k)*cs, olRefcountBlock)
		m.rc.tick++
		m.rc.m[firstRi+k] = &rblock{off: (s + k) * cs, data: area[k*cs : (k+1)*cs], used: m.rc.tick}
	}
	for c := oldOff / cs; c < oldOff/cs+oldClusters; c++ {
		m.adjust(c, -1)
		if err := m.addRefcount(ctx, c, -1); err != nil {
			return err
		}
	}
	return m.evictRefblocks(ctx)
}

// allocClusters allocates n contiguous clusters (refcount 1) and returns
// the offset of the first; the caller's writes grow the file. metaMu is
// held.
func (m *image) allocClusters(ctx context.Context, n int64) (int64, error) {
	if err := m.markDirtyForLazy(ctx); err != nil {
		return 0, err
	}
	for tries := 0; ; tries++ {
		if tries > 1<<16 {
			return 0, fmt.Errorf("qcow2: cannot allocate %d clusters", n)
		}
		c0, err := m.findFree(ctx, m.freeHint, n)
		if err != nil {
			return 0, err
		}
		missing := int64(-1)
		for ri := c0 >> m.g.RefblockBits; ri <= (c0+n-1)>>m.g.RefblockBits; ri++ {
			b, err := m.refblock(ctx, ri)
			if err != nil {
				return 0, err
			}
			if b == nil {
				missing = ri
				break
			}
		}
		if missing >= 0 {
			if err := m.createRefblock(ctx, missing, m.refblockSpot(ctx, missing, c0, c0+n)); err != nil {
				return 0, err
			}
			continue
		}
		for c := c0; c < c0+n; c++ {
			if err := m.addRefcount(ctx, c, 1); err != nil {
				return 0, err
			}
		}
		m.freeHint = c0 + n
		return c0 * m.cs(), nil
	}
}

// markDirtyForLazy sets the dirty bit before the first allocation with
// lazy refcounts. metaMu is held.
func (m *image) markDirtyForLazy(ctx context.Context) error {
	if !m.lazy || m.dirtyMarked {
		return nil
	}
	if err := m.setIncompatible(ctx, qcow2fmt.IncompatDirty, true); err != nil {
		return err
	}
	m.dirtyMarked = true
	return nil
}

// freeNow drops one reference from every cluster of [off, off+size) at
// once; only for structures whose replacement is already stable. metaMu
// is held.
func (m *image) freeNow(ctx context.Context, off, size int64) error {
	for c := off >> m.g.ClusterBits; c <= (off+size-1)>>m.g.ClusterBits; c++ {
		if err := m.addRefcount(ctx, c, -1); err != nil {
			return err
		}
	}
	return nil
}

// applyFrees drops the references of frees whose L2 entries are stable,
// passing discards to the file for clusters that became free. metaMu is
// held.
func (m *image) applyFrees(ctx context.Context, frees []freeReq) error {
	type rng struct{ off, end int64 }
	var discards []rng
	cs := m.cs()
	for _, f := range frees {
		if f.dataFile {
			if f.discard {
				_ = m.data.Discard(ctx, f.off, min(f.size, max(m.data.Size()-f.off, 0)))
			}
			continue
		}
		for c := f.off >> m.g.ClusterBits; c <= (f.off+f.size-1)>>m.g.ClusterBits; c++ {
			if err := m.addRefcount(ctx, c, -1); err != nil {
				return err
			}
			if !f.discard {
				continue
			}
			if v, err := m.refcount(ctx, c); err == nil && v == 0 {
				if n := len(discards); n > 0 && discards[n-1].end == c*cs {
					discards[n-1].end += cs
				} else {
					discards = append(discards, rng{c * cs, (c + 1) * cs})
				}
			}
		}
	}
	for _, d := range discards {
		if d.end > m.file.Size() {
			d.end = m.file.Size()
		}
		if d.end > d.off {
			_ = m.file.Discard(ctx, d.off, d.end-d.off)
		}
	}
	return nil
}
