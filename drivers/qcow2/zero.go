package qcow2

import (
	"context"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// zeroOp says how clusters are changed by metadata-only operations.
type zeroOp int

const (
	opZero        zeroOp = iota // read as zeroes, keep host clusters
	opZeroUnmap                 // read as zeroes, free host clusters
	opDiscard                   // guest discard (reads as zeroes on v3 where that is cheap)
	opFullDiscard               // fall through to the backing file
)

// zeroes implements WriteZeroes; the stripes are held.
func (m *image) zeroes(ctx context.Context, off, n int64, f graph.ReqFlags) error {
	g := m.g
	if m.dataFileRaw {
		// The data file must stay a faithful raw image.
		if err := m.data.WriteZeroes(ctx, off, n, f); err != nil {
			return err
		}
		return m.ensureMapped(ctx, off, n)
	}
	gran := g.SubclusterSize
	end := off + n
	// Unaligned head and tail: zero clusters where they already read as
	// zeroes, else write zeroes.
	head := min((off+gran-1)&^(gran-1), end)
	if head > off {
		if err := m.zeroPartial(ctx, off, head-off, f); err != nil {
			return err
		}
		off = head
	}
	tail := end &^ (gran - 1)
	if tail < off {
		tail = off
	}
	if end > tail {
		// The last partial subcluster at the end of the image counts as
		// whole.
		if end == m.size.Load() && tail < end {
			tail = end
		} else if err := m.zeroPartial(ctx, tail, end-tail, f); err != nil {
			return err
		}
	}
	if tail > off {
		op := opZero
		if f&graph.MayUnmap != 0 {
			op = opZeroUnmap
		}
		return m.changeClusters(ctx, off, tail-off, op)
	}
	return nil
}

// zeroPartial zeroes part of a subcluster.
func (m *image) zeroPartial(ctx context.Context, off, n int64, f graph.ReqFlags) error {
	z, err := m.readsAsZero(ctx, off, n)
	if err != nil {
		return err
	}
	if z {
		return nil
	}
	if f&graph.NoFallback != 0 {
		return graph.ErrNotSupported
	}
	buf := make([]byte, n)
	return m.write(ctx, buf, off)
}

// readsAsZero reports whether the metadata says [off, off+n) reads as
// zeroes.
func (m *image) readsAsZero(ctx context.Context, off, n int64) (bool, error) {
	for n > 0 {
		r, err := m.mapRun(ctx, off, n)
		if err != nil {
			return false, err
		}
		switch r.typ {
		case qcow2fmt.SubZeroPlain, qcow2fmt.SubZeroAlloc:
		case qcow2fmt.SubUnallocatedPlain, qcow2fmt.SubUnallocatedAlloc:
			if m.backing != nil && off < m.backing.Size() {
				return false, nil
			}
		default:
			return false, nil
		}
		off, n = off+r.n, n-r.n
	}
	return true, nil
}

// discard implements Discard: whole clusters only (and the partial last
// cluster of the image); the rest is ignored, as QEMU does.
func (m *image) discard(ctx context.Context, off, n int64) error {
	if m.dataFileRaw {
		return graph.ErrNotSupported
	}
	cs := m.cs()
	end := off + n
	start := (off + cs - 1) &^ (cs - 1)
	stop := end &^ (cs - 1)
	if end == m.size.Load() && end > stop {
		stop = end
	}
	if stop <= start {
		return nil
	}
	return m.changeClusters(ctx, start, stop-start, opDiscard)
}

// changeClusters applies a metadata-only operation to [off, off+n), which
// is subcluster aligned (or ends at the end of the image).
func (m *image) changeClusters(ctx context.Context, off, n int64, op zeroOp) error {
	g := m.g
	tableSpan := int64(1) << (g.ClusterBits + g.L2Bits)
	end := off + n
	for off < end {
		l := min(end-off, (off|(tableSpan-1))+1-off)
		if err := m.changeChunk(ctx, off, l, op); err != nil {
			return err
		}
		off += l
	}
	return nil
}

func (m *image) changeChunk(ctx context.Context, off, n int64, op zeroOp) error {
	g := m.g
	cs := g.ClusterSize
	// An unallocated table needs no change for discards when nothing can
	// show through.
	_, e := m.l1Entry(off)
	if e&qcow2fmt.L1OffsetMask == 0 && (op == opFullDiscard || ((op == opDiscard) && (m.backing == nil || m.version < 3))) {
		return nil
	}
	t, l2off, err := m.l2ForWrite(ctx, off)
	if err != nil {
		return err
	}
	defer m.l2.put(t)
	var frees []freeReq
	var bad string
	type piece struct{ off, n int64 }
	var rewrite []piece // compressed clusters zeroed in part
	end := off + n
	t.mu.Lock()
	changed := false
	for pos := off; pos < end; {
		gOff := pos &^ (cs - 1)
		cEnd := min(gOff+cs, end)
		idx := g.L2Index(pos)
		le, bm := g.L2Entry(t.data, idx)
		if bad = m.checkEntry(le, bm, l2off, idx, pos); bad != "" {
			break
		}
		whole := pos == gOff && (cEnd == gOff+cs || cEnd == m.size.Load())
		if !whole && g.ClusterType(le) == qcow2fmt.ClusterCompressed {
			if op == opZero || op == opZeroUnmap {
				rewrite = append(rewrite, piece{pos, cEnd - pos})
			}
			pos = cEnd
			continue
		}
		ne, nbm, free := m.changeEntry(le, bm, pos-gOff, cEnd-gOff, whole, op)
		if ne != le || nbm != bm {
			g.SetL2Entry(t.data, idx, ne, nbm)
			changed = true
			if free {
				discard := m.passRequest
				if f, ok := m.oldHost(le, discard); ok {
					frees = append(frees, f)
				} else if g.DataFile && discard && g.ClusterType(le) != qcow2fmt.ClusterUnallocated {
					// Clusters of a data file are not refcounted; pass
					// the discard on directly (after the metadata).
					frees = append(frees, freeReq{off: gOff, size: cs, discard: true, dataFile: true})
				}
			}
		}
		pos = cEnd
	}
	if changed {
		m.l2.markDirty(t)
	}
	t.mu.Unlock()
	if bad != "" {
		return m.corrupt(ctx, true, -1, -1, "%s", bad)
	}
	for _, r := range rewrite {
		if err := m.write(ctx, make([]byte, r.n), r.off); err != nil {
			return err
		}
	}
	if len(frees) == 0 && !m.l2.overfull() {
		return nil
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	m.pendingFree = append(m.pendingFree, frees...)
	if len(m.pendingFree) > 4096 || m.l2.overfull() {
		return m.writebackLocked(ctx, false)
	}
	return nil
}

// changeEntry computes the new entry for the byte range [lo, hi) of one
// cluster (subcluster aligned); free reports that the old host space is
// released.
func (m *image) changeEntry(le, bm uint64, lo, hi int64, whole bool, op zeroOp) (uint64, uint64, bool) {
	g := m.g
	ct := g.ClusterType(le)
	allocated := ct == qcow2fmt.ClusterNormal || ct == qcow2fmt.ClusterZeroAlloc || ct == qcow2fmt.ClusterCompressed
	if !g.Extended {
		switch op {
		case opFullDiscard:
			return 0, 0, allocated
		case opDiscard:
			if m.backing != nil || allocated {
				if m.version >= 3 {
					return qcow2fmt.OflagZero, 0, allocated
				}
				return 0, 0, allocated
			}
			return 0, 0, false
		case opZeroUnmap:
			return qcow2fmt.OflagZero, 0, allocated
		default:
			if ct == qcow2fmt.ClusterCompressed {
				return qcow2fmt.OflagZero, 0, true
			}
			if ct == qcow2fmt.ClusterNormal || ct == qcow2fmt.ClusterZeroAlloc {
				return le | qcow2fmt.OflagZero, 0, false
			}
			return qcow2fmt.OflagZero, 0, false
		}
	}
	// Extended L2.
	if whole {
		switch op {
		case opFullDiscard:
			return 0, 0, allocated
		case opDiscard:
			if m.backing != nil || allocated {
				return 0, qcow2fmt.L2BitmapAllZero, allocated
			}
			return 0, 0, false
		case opZeroUnmap:
			return 0, qcow2fmt.L2BitmapAllZero, allocated
		default:
			if ct == qcow2fmt.ClusterCompressed {
				return 0, qcow2fmt.L2BitmapAllZero, true
			}
			return le, qcow2fmt.L2BitmapAllZero, false
		}
	}
	// Some subclusters of the cluster.
	if ct == qcow2fmt.ClusterCompressed {
		// Compressed clusters have no subclusters; callers only pass
		// whole clusters for them (see zeroes).
		return le, bm, false
	}
	sb := g.SubclusterBits
	mask := uint64(0)
	for s := lo >> sb; s < (hi+g.SubclusterSize-1)>>sb; s++ {
		mask |= 1 << s
	}
	switch op {
	case opFullDiscard:
		return le, bm &^ (mask | mask<<32), false
	default:
		return le, (bm &^ mask) | mask<<32, false
	}
}

// ensureMapped makes sure [off, off+n) has host clusters (data-file-raw
// images keep a 1:1 mapping).
func (m *image) ensureMapped(ctx context.Context, off, n int64) error {
	_, err := m.preallocate(ctx, off, off+n)
	return err
}
