package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// adjust records, during a repair, references the repair itself adds or
// drops (new refcount blocks and tables). metaMu is held.
func (m *image) adjust(c, delta int64) {
	if m.repairAdj != nil {
		m.repairAdj[c] += delta
	}
}

// repairLocked makes the stored refcounts match the references the
// metadata implies (after a crash with lazy refcounts, or any leak), fixes
// the COPIED flags of the active tables and clears the dirty bit. It
// refuses images whose tables are damaged. With leaksOnly it only lowers
// refcounts that are too high (check -r leaks). metaMu is held.
func (m *image) repairLocked(ctx context.Context, leaksOnly bool) error {
	_, err := m.repairCountLocked(ctx, leaksOnly)
	return err
}

// repairCountLocked is repairLocked, returning how many COPIED flags it
// corrected.
func (m *image) repairCountLocked(ctx context.Context, leaksOnly bool) (int, error) {
	refs, err := qcow2fmt.References(graph.NewSectionIO(ctx, m.file, 0, -1), m.h, m.file.Size())
	if err != nil {
		return 0, err
	}
	if len(refs.Problems) > 0 {
		return 0, fmt.Errorf("%s", refs.Problems[0])
	}
	m.repairAdj = map[int64]int64{}
	want := func(c int64) uint64 {
		v := int64(refs.Count(c)) + m.repairAdj[c]
		if v < 0 {
			return 0
		}
		return min(uint64(v), m.g.RefcountMax)
	}
	m.reserved = func(c int64) bool { return want(c) > 0 }
	defer func() { m.reserved, m.repairAdj = nil, nil }()
	if rt := int64(m.h.RefcountTableOffset); m.reftablePastEnd() {
		// The refcount table lies past the end of the file (it read as
		// zeroes): refcount blocks cannot be hooked up there without
		// growing the file to it, so the table moves into the file
		// first, as QEMU's rebuild does.
		if leaksOnly {
			return 0, fmt.Errorf("qcow2: the refcount table at %#x lies past the end of the file", rt)
		}
		if err := m.relocateReftableLocked(ctx, want); err != nil {
			return 0, err
		}
	}
	bits := m.g.RefblockBits
	limit := max(refs.Clusters(), int64(len(m.reftable))<<bits)
	for c := int64(0); c < limit; c++ {
		b, err := m.refblock(ctx, c>>bits)
		if err != nil {
			return 0, err
		}
		if b == nil && want(c) == 0 {
			// Nothing stored here: only references (and what the
			// repair itself placed) need a block.
			continue
		}
		if leaksOnly {
			cur, err := m.refcount(ctx, c)
			if err != nil {
				return 0, err
			}
			if cur <= want(c) {
				continue
			}
		}
		if err := m.setRefcount(ctx, c, want(c)); err != nil {
			return 0, err
		}
	}
	if leaksOnly {
		_, err := m.flushRefblocks(ctx)
		return 0, err
	}
	copied, err := m.fixCopiedLocked(ctx)
	if err != nil {
		return 0, err
	}
	if _, err := m.flushRefblocks(ctx); err != nil {
		return 0, err
	}
	if err := m.file.Flush(ctx); err != nil {
		return 0, err
	}
	m.freeHint = 0
	return copied, m.setIncompatible(ctx, qcow2fmt.IncompatDirty, false)
}

// fixCopiedLocked sets the COPIED flag of active L1 and L2 entries exactly
// where the refcount is one (always for an external data file). metaMu is
// held and the L2 cache is empty.
func (m *image) fixCopiedLocked(ctx context.Context) (int, error) {
	fixed := 0
	g := m.g
	cs := g.ClusterSize
	buf := make([]byte, cs)
	for i, e := range m.l1 {
		off := int64(e & qcow2fmt.L1OffsetMask)
		if off == 0 {
			continue
		}
		rc, err := m.refcount(ctx, off>>g.ClusterBits)
		if err != nil {
			return 0, err
		}
		ne := e &^ qcow2fmt.OflagCopied
		if rc == 1 {
			ne |= qcow2fmt.OflagCopied
		}
		if ne != e {
			fixed++
			if err := m.writeL1Entry(ctx, int64(i), ne); err != nil {
				return 0, err
			}
		}
		if err := m.file.ReadAt(ctx, buf, off); err != nil {
			return 0, err
		}
		changed := false
		for j := int64(0); j < g.L2Entries; j++ {
			le, bm := g.L2Entry(buf, j)
			t := g.ClusterType(le)
			if t != qcow2fmt.ClusterNormal && t != qcow2fmt.ClusterZeroAlloc {
				continue
			}
			copied := true
			if !g.DataFile {
				rc, err := m.refcount(ctx, qcow2fmt.HostOffset(le)>>g.ClusterBits)
				if err != nil {
					return 0, err
				}
				copied = rc == 1
			}
			nle := le &^ qcow2fmt.OflagCopied
			if copied {
				nle |= qcow2fmt.OflagCopied
			}
			if nle != le {
				fixed++
				g.SetL2Entry(buf, j, nle, bm)
				changed = true
			}
		}
		if changed {
			if err := m.file.WriteAt(ctx, buf, off, 0); err != nil {
				return 0, err
			}
		}
	}
	return fixed, nil
}

// relocateReftableLocked writes the in-memory refcount table (its entries
// past the end of the file are zeroes) to the first free run of clusters,
// by the references the metadata implies, and points the header at it.
// The repair that follows counts it (repairAdj) and hooks up the refcount
// blocks in it. metaMu is held.
func (m *image) relocateReftableLocked(ctx context.Context, want func(int64) uint64) error {
	cs := m.cs()
	nt := int64(m.h.RefcountTableClusters)
	start, run := int64(1), int64(0)
	for c := int64(1); run < nt; c++ {
		if c > qcow2fmt.MaxClusterOffset>>m.g.ClusterBits {
			return fmt.Errorf("qcow2: no room for the refcount table: %w", errNoSpace)
		}
		if want(c) > 0 {
			run = 0
			continue
		}
		if run == 0 {
			start = c
		}
		run++
	}
	off := start * cs
	if k := m.overlaps(off, nt*cs, olRefcountTable); k != 0 {
		return m.corruptLocked(ctx, true, off, nt*cs, "Preventing invalid write on metadata (overlaps with %s)", k)
	}
	table := make([]byte, nt*cs)
	copy(table, qcow2fmt.EncodeTable(m.reftable))
	if err := m.writeMeta(ctx, table, off); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(off))
	if err := m.file.WriteAt(ctx, hdr[:], 48, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	m.h.RefcountTableOffset = uint64(off)
	m.setRange(olRefcountTable, olRange{off: off, end: off + nt*cs})
	for c := start; c < start+nt; c++ {
		m.adjust(c, 1)
	}
	return nil
}

// reftablePastEnd reports a refcount table that starts past the end of
// the file (in a cluster the file does not reach). metaMu is held.
func (m *image) reftablePastEnd() bool {
	cs := m.cs()
	return int64(m.h.RefcountTableOffset) >= (m.file.Size()+cs-1)/cs*cs
}
