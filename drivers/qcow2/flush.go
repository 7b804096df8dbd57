package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// writeback writes dirty metadata in the order that keeps the image
// consistent after a crash at any point:
//
//  1. refcount blocks (their increments must be stable before any L2
//     entry that relies on them), then a flush of the data and the file:
//     guest data and refcounts are stable;
//  2. dirty L2 tables, then a flush: the new mappings are stable;
//  3. the references dropped by those mappings are released (pending
//     frees), and the refcount blocks they touch are written.
//
// With durable set, everything ends with a flush. metaMu is held.
func (m *image) writebackLocked(ctx context.Context, durable bool) error {
	if m.ro.Load() {
		return nil
	}
	frees := m.pendingFree
	m.pendingFree = nil
	requeue := func() { m.pendingFree = append(frees, m.pendingFree...) }
	tables := m.l2.dirtyTables()
	defer func() {
		for _, t := range tables {
			m.l2.put(t)
		}
	}()
	n, err := m.flushRefblocks(ctx)
	if err != nil {
		requeue()
		return err
	}
	_ = n
	if len(tables) > 0 {
		if err := m.flushData(ctx); err != nil {
			requeue()
			return err
		}
	}
	if len(tables) > 0 {
		buf := make([]byte, m.cs())
		for _, t := range tables {
			t.mu.RLock()
			copy(buf, t.data)
			gen, dirty := t.gen, t.dirty
			t.mu.RUnlock()
			if !dirty {
				continue
			}
			if k := m.overlaps(t.off, m.cs(), olActiveL2|olInactiveL2); k != 0 {
				requeue()
				return m.corruptLocked(ctx, true, t.off, m.cs(), "Preventing invalid write on metadata (overlaps with %s)", k)
			}
			if err := m.file.WriteAt(ctx, buf, t.off, 0); err != nil {
				requeue()
				return err
			}
			t.mu.Lock()
			if t.gen == gen && t.dirty {
				t.dirty = false
				m.l2.dirty.Add(-1)
			}
			t.mu.Unlock()
		}
	}
	if len(frees) > 0 {
		if err := m.file.Flush(ctx); err != nil {
			requeue()
			return err
		}
		if err := m.applyFrees(ctx, frees); err != nil {
			return err
		}
		if _, err := m.flushRefblocks(ctx); err != nil {
			return err
		}
	}
	if durable {
		return m.flushData(ctx)
	}
	return nil
}

// flushData flushes the data file and the image file.
func (m *image) flushData(ctx context.Context) error {
	if m.data != m.file {
		if err := m.data.Flush(ctx); err != nil {
			return err
		}
	}
	return m.file.Flush(ctx)
}

// flush makes every completed write stable.
func (m *image) flush(ctx context.Context) error {
	if m.ro.Load() {
		return nil
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	return m.writebackLocked(ctx, true)
}

// close writes everything back and, with lazy refcounts, clears the dirty
// bit.
func (m *image) close(ctx context.Context) error {
	if m.ro.Load() || m.broken.Load() {
		return nil
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if err := m.writebackLocked(ctx, true); err != nil {
		return err
	}
	if m.dirtyMarked {
		if err := m.setIncompatible(ctx, qcow2fmt.IncompatDirty, false); err != nil {
			return err
		}
		m.dirtyMarked = false
	}
	return nil
}

// truncate grows the image to size (block_resize), with preallocation.
func (m *image) truncate(ctx context.Context, size int64, mode graph.Prealloc) error {
	if m.ro.Load() {
		return graph.ErrReadOnly
	}
	if size%512 != 0 {
		return fmt.Errorf("The new size must be a multiple of %d", 512)
	}
	old := m.size.Load()
	switch mode {
	case "", graph.PreallocOff, graph.PreallocMetadata, graph.PreallocFalloc, graph.PreallocFull:
	default:
		return fmt.Errorf("Unsupported preallocation mode '%s'", mode)
	}
	if m.version < 3 && len(m.snapshots) > 0 {
		return fmt.Errorf("Can't resize a v2 image which has snapshots")
	}
	if m.hasBitmapExt {
		return fmt.Errorf("Can't resize an image which has bitmaps: %w", graph.ErrNotSupported)
	}
	if size < old {
		if mode != "" && mode != graph.PreallocOff {
			return errors.New("Preallocation can't be used for shrinking an image")
		}
		return m.shrink(ctx, size)
	}
	m.metaMu.Lock()
	err := m.growL1Locked(ctx, int64(m.g.L1EntriesFor(uint64(size))))
	if err == nil {
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(size))
		if err = m.file.WriteAt(ctx, b[:], 24, 0); err == nil {
			err = m.file.Flush(ctx)
		}
		if err == nil {
			m.h.Size = uint64(size)
			m.size.Store(size)
		}
	}
	m.metaMu.Unlock()
	if err != nil {
		return err
	}
	// A backing file larger than the old size must not show through the
	// new area (as QEMU's bdrv_co_truncate): zero it.
	if m.backing != nil && m.backing.Size() > old {
		if err := m.zeroNewArea(ctx, old, size); err != nil {
			return fmt.Errorf("Failed to zero out the new area: %w", err)
		}
	}
	if m.dataFileRaw && (mode == "" || mode == graph.PreallocOff) {
		mode = graph.PreallocMetadata
	}
	switch mode {
	case "", graph.PreallocOff:
		if m.g.DataFile {
			return m.data.Truncate(ctx, size, graph.PreallocOff)
		}
		return nil
	default:
		end, err := m.preallocate(ctx, old, size)
		if err != nil {
			return err
		}
		fmode := mode
		if fmode == graph.PreallocMetadata {
			fmode = graph.PreallocOff
		}
		if m.g.DataFile {
			end = size
		}
		if end > m.data.Size() {
			m.metaMu.Lock()
			err := m.data.Truncate(ctx, end, fmode)
			m.metaMu.Unlock()
			if err != nil {
				return err
			}
		}
		return m.flush(ctx)
	}
}

// growL1Locked grows the L1 table to n entries: a new table, stable before
// the header points to it; then the old one is freed. metaMu is held.
func (m *image) growL1Locked(ctx context.Context, n int64) error {
	m.l1mu.RLock()
	cur := int64(len(m.l1))
	m.l1mu.RUnlock()
	if n <= cur {
		return nil
	}
	if n*8 > qcow2fmt.MaxL1Size {
		return fmt.Errorf("qcow2: the L1 table would exceed %d bytes: %w", qcow2fmt.MaxL1Size, graph.ErrNoSpace)
	}
	cs := m.cs()
	bytes := n * 8
	off, err := m.allocClusters(ctx, (bytes+cs-1)/cs)
	if err != nil {
		return err
	}
	m.l1mu.RLock()
	table := make([]uint64, n)
	copy(table, m.l1)
	m.l1mu.RUnlock()
	if _, err := m.flushRefblocks(ctx); err != nil {
		return err
	}
	if k := m.overlaps(off, bytes, 0); k != 0 {
		return m.corruptLocked(ctx, true, off, bytes, "Preventing invalid write on metadata (overlaps with %s)", k)
	}
	if err := m.writeMeta(ctx, qcow2fmt.EncodeTable(table), off); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	var b [12]byte
	binary.BigEndian.PutUint32(b[0:], uint32(n))
	binary.BigEndian.PutUint64(b[4:], uint64(off))
	if err := m.file.WriteAt(ctx, b[:], 36, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	oldOff, oldN := int64(m.h.L1TableOffset), cur
	m.h.L1TableOffset, m.h.L1Size = uint64(off), uint32(n)
	m.l1mu.Lock()
	m.l1 = table
	m.l1mu.Unlock()
	m.setRange(olActiveL1, olRange{off: off, end: off + bytes})
	if oldN > 0 {
		return m.freeNow(ctx, oldOff, oldN*8)
	}
	return nil
}

// preallocate gives every unallocated cluster of guest range [from, to) a
// host cluster (metadata preallocation) and returns the end of the host
// data the range maps to.
func (m *image) preallocate(ctx context.Context, from, to int64) (int64, error) {
	var end int64
	g := m.g
	cs := g.ClusterSize
	tableSpan := int64(1) << (g.ClusterBits + g.L2Bits)
	from &^= cs - 1
	for off := from; off < to; {
		n := min(to-off, (off|(tableSpan-1))+1-off)
		t, _, err := m.l2ForWrite(ctx, off)
		if err != nil {
			return 0, err
		}
		var idx []int64
		t.mu.RLock()
		for c := off; c < off+n; c += cs {
			le, _ := g.L2Entry(t.data, g.L2Index(c))
			if g.ClusterType(le) == qcow2fmt.ClusterUnallocated {
				idx = append(idx, c)
			}
		}
		t.mu.RUnlock()
		if len(idx) > 0 {
			var base int64
			if !g.DataFile {
				m.metaMu.Lock()
				base, err = m.allocClusters(ctx, int64(len(idx)))
				m.metaMu.Unlock()
				if err != nil {
					m.l2.put(t)
					return 0, err
				}
			}
			t.mu.Lock()
			for k, c := range idx {
				host := base + int64(k)*cs
				if g.DataFile {
					host = c
				}
				_, bm := g.L2Entry(t.data, g.L2Index(c))
				g.SetL2Entry(t.data, g.L2Index(c), uint64(host)|qcow2fmt.OflagCopied, bm&^qcow2fmt.L2BitmapAllAlloc)
				end = max(end, host+min(cs, to-c))
			}
			m.l2.markDirty(t)
			t.mu.Unlock()
		}
		m.l2.put(t)
		off += n
	}
	return end, nil
}

// zeroNewArea makes [old, size) read as zeroes after growth over a larger
// backing file: zero clusters on version 3, explicit zeroes (up to the end
// of the backing file) on version 2.
func (m *image) zeroNewArea(ctx context.Context, old, size int64) error {
	st := m.lockStripes(old, size-old, true)
	defer m.unlockStripes(st)
	if m.version >= 3 {
		return m.zeroes(ctx, old, size-old, 0)
	}
	end := min(size, m.backing.Size())
	buf := make([]byte, min(end-old, 1<<20))
	for off := old; off < end; {
		n := min(int64(len(buf)), end-off)
		if err := m.write(ctx, buf[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// shrink makes the image smaller (qcow2_co_truncate): the clusters past
// the new end are freed, then the L2 tables past it, and the file loses
// the clusters at its end that are no longer in use.
func (m *image) shrink(ctx context.Context, size int64) error {
	g := m.g
	cs := g.ClusterSize
	st := m.lockStripes(0, int64(nStripes)<<g.ClusterBits, true)
	defer m.unlockStripes(st)
	old := m.size.Load()
	// The rest of the new last cluster is zeroed, so that growing the
	// image again shows zeroes there, not what the cut-off part held.
	if tail := min((size+cs-1)&^(cs-1), old) - size; tail > 0 {
		// Only data of this layer: what the backing file shows there is
		// hidden by zeroNewArea when the image grows.
		r, err := m.mapRun(ctx, size, tail)
		if err == nil && (r.typ == qcow2fmt.SubNormal || r.typ == qcow2fmt.SubCompressed || r.n < tail) {
			err = m.write(ctx, make([]byte, tail), size)
		}
		if err != nil {
			return err
		}
	}
	if start := (size + cs - 1) &^ (cs - 1); start < old {
		if err := m.changeClusters(ctx, start, old-start, opFullDiscard); err != nil {
			return fmt.Errorf("Failed to discard cropped clusters: %w", err)
		}
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if err := m.writebackLocked(ctx, true); err != nil {
		return err
	}
	m.l2.drop()
	m.l1mu.RLock()
	l1 := append([]uint64(nil), m.l1...)
	m.l1mu.RUnlock()
	var tables []int64
	for i := int64(g.L1EntriesFor(uint64(size))); i < int64(len(l1)); i++ {
		if off := int64(l1[i] & qcow2fmt.L1OffsetMask); off != 0 {
			tables = append(tables, off)
			l1[i] = 0
		}
	}
	if len(tables) > 0 {
		if err := m.writeL1Locked(ctx, l1); err != nil {
			return fmt.Errorf("Failed to reduce the number of L2 tables: %w", err)
		}
		for _, off := range tables {
			m.removeClusterKind(off, olActiveL2)
			if err := m.freeNow(ctx, off, cs); err != nil {
				return err
			}
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(size))
	if err := m.file.WriteAt(ctx, b[:], 24, 0); err != nil {
		return err
	}
	if err := m.flushRefblocks2(ctx); err != nil {
		return err
	}
	m.h.Size = uint64(size)
	m.size.Store(size)
	// The file ends after its last cluster in use.
	last := (m.file.Size()+cs-1)/cs - 1
	for ; last > 0; last-- {
		rc, err := m.refcount(ctx, last)
		if err != nil {
			return err
		}
		if rc > 0 {
			break
		}
	}
	if end := (last + 1) * cs; end < m.file.Size() {
		// As QEMU, a failure here only leaves the file longer.
		_ = m.file.Truncate(ctx, end, graph.PreallocOff)
	}
	return nil
}
