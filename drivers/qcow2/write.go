package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// errNoSpace is graph.ErrNoSpace.
var errNoSpace = graph.ErrNoSpace

// l2ForWrite returns the pinned L2 table for guest offset off, allocating
// it (or copying a shared one) first.
func (m *image) l2ForWrite(ctx context.Context, off int64) (*l2Table, int64, error) {
	for {
		l1i, e := m.l1Entry(off)
		l2off := int64(e & qcow2fmt.L1OffsetMask)
		if l2off != 0 && e&qcow2fmt.OflagCopied != 0 {
			t, err := m.loadL2(ctx, l1i, l2off)
			return t, l2off, err
		}
		m.metaMu.Lock()
		t, newOff, err := m.allocL2Locked(ctx, l1i)
		m.metaMu.Unlock()
		if err != nil {
			if msg, ok := err.(*pendingCorrupt); ok {
				return nil, 0, m.corrupt(ctx, true, -1, -1, "%s", msg.msg)
			}
			return nil, 0, err
		}
		if t != nil {
			return t, newOff, nil
		}
	}
}

// pendingCorrupt carries a corruption found under metaMu to be signalled
// after it is released.
type pendingCorrupt struct{ msg string }

func (p *pendingCorrupt) Error() string { return p.msg }

// allocL2Locked gives L1 entry l1i a new L2 table: empty, or a copy of the
// shared table it points to. It returns nil, 0, nil when another request
// did it meanwhile. metaMu is held.
func (m *image) allocL2Locked(ctx context.Context, l1i int64) (*l2Table, int64, error) {
	m.l1mu.RLock()
	if l1i >= int64(len(m.l1)) {
		m.l1mu.RUnlock()
		return nil, 0, fmt.Errorf("qcow2: L1 index %d beyond the L1 table (%d entries)", l1i, len(m.l1))
	}
	e := m.l1[l1i]
	m.l1mu.RUnlock()
	old := int64(e & qcow2fmt.L1OffsetMask)
	if old != 0 && e&qcow2fmt.OflagCopied != 0 {
		return nil, 0, nil
	}
	cs := m.cs()
	data := make([]byte, cs)
	if old != 0 {
		if old&(cs-1) != 0 || old+cs > m.file.Size() {
			return nil, 0, &pendingCorrupt{fmt.Sprintf("L2 table offset %#x unaligned or beyond the end of the image (L1 index: %#x)", old, l1i)}
		}
		// A table shared with a snapshot: copy it (its data clusters stay
		// shared, with their refcounts unchanged).
		if err := m.file.ReadAt(ctx, data, old); err != nil {
			return nil, 0, err
		}
	}
	newOff, err := m.allocClusters(ctx, 1)
	if err != nil {
		return nil, 0, err
	}
	if k := m.overlaps(newOff, cs, 0); k != 0 {
		return nil, 0, &pendingCorrupt{fmt.Sprintf("Preventing invalid write on metadata (overlaps with %s)", k)}
	}
	// The table's refcount and contents must be stable before the L1
	// entry points to it.
	if _, err := m.flushRefblocks(ctx); err != nil {
		return nil, 0, err
	}
	if err := m.writeMeta(ctx, data, newOff); err != nil {
		return nil, 0, err
	}
	if err := m.file.Flush(ctx); err != nil {
		return nil, 0, err
	}
	ne := uint64(newOff) | qcow2fmt.OflagCopied
	if err := m.writeL1Entry(ctx, l1i, ne); err != nil {
		return nil, 0, err
	}
	m.addClusterKind(newOff, olActiveL2)
	if old != 0 {
		m.removeClusterKind(old, olActiveL2)
		m.pendingFree = append(m.pendingFree, freeReq{off: old, size: cs, discard: m.passOther})
	}
	return m.l2.insert(newOff, data), newOff, nil
}

// writeL1Entry stores L1 entry i in memory and on disk. metaMu is held.
func (m *image) writeL1Entry(ctx context.Context, i int64, e uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], e)
	off := int64(m.h.L1TableOffset) + 8*i
	if k := m.overlaps(off, 8, olActiveL1); k != 0 {
		return &pendingCorrupt{fmt.Sprintf("Preventing invalid write on metadata (overlaps with %s)", k)}
	}
	if err := m.writeMeta(ctx, b[:], off); err != nil {
		return err
	}
	m.l1mu.Lock()
	m.l1[i] = e
	m.l1mu.Unlock()
	return nil
}

// plan is what a write does to one guest cluster.
type plan struct {
	gOff         int64 // guest cluster offset
	entry, bm    uint64
	reqLo, reqHi int64 // request bytes within the cluster
	wLo, wHi     int64 // bytes written to the host cluster
	host         int64
	inPlace      bool
	newEntry     uint64
	newBm        uint64
}

// write writes p at guest offset off; the stripes are held.
func (m *image) write(ctx context.Context, p []byte, off int64) error {
	g := m.g
	tableSpan := int64(1) << (g.ClusterBits + g.L2Bits)
	for len(p) > 0 {
		n := min(int64(len(p)), (off|(tableSpan-1))+1-off)
		if err := m.writeChunk(ctx, p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeChunk writes p at off, within one L2 table.
func (m *image) writeChunk(ctx context.Context, p []byte, off int64) error {
	g := m.g
	cs := g.ClusterSize
	t, l2off, err := m.l2ForWrite(ctx, off)
	if err != nil {
		return err
	}
	defer m.l2.put(t)
	end := off + int64(len(p))
	first := off &^ (cs - 1)
	nc := (end - first + cs - 1) / cs
	var small [8]plan
	plans := small[:0]
	if nc > int64(len(small)) {
		plans = make([]plan, 0, nc)
	}
	t.mu.RLock()
	for i := int64(0); i < nc; i++ {
		gOff := first + i*cs
		le, bm := g.L2Entry(t.data, g.L2Index(gOff))
		plans = append(plans, plan{gOff: gOff, entry: le, bm: bm, reqLo: max(off, gOff) - gOff, reqHi: min(end, gOff+cs) - gOff})
	}
	t.mu.RUnlock()
	need := int64(0)
	for i := range plans {
		pl := &plans[i]
		if bad := m.checkEntry(pl.entry, pl.bm, l2off, g.L2Index(pl.gOff), pl.gOff); bad != "" {
			return m.corrupt(ctx, true, -1, -1, "%s", bad)
		}
		m.planCluster(pl)
		if !pl.inPlace {
			need++
		}
	}
	// Host clusters for the new allocations, contiguous where possible.
	if need > 0 {
		if g.DataFile {
			for i := range plans {
				if !plans[i].inPlace {
					plans[i].host = plans[i].gOff
				}
			}
		} else {
			m.metaMu.Lock()
			base, err := m.allocClusters(ctx, need)
			m.metaMu.Unlock()
			if err != nil {
				return err
			}
			k := int64(0)
			for i := range plans {
				if !plans[i].inPlace {
					plans[i].host = base + k*cs
					k++
				}
			}
		}
	}
	if err := m.writePlans(ctx, plans, p, off); err != nil {
		if need > 0 && !g.DataFile {
			// The new clusters are not referenced: give them back.
			m.metaMu.Lock()
			for _, pl := range plans {
				if !pl.inPlace {
					m.pendingFree = append(m.pendingFree, freeReq{off: pl.host, size: cs})
				}
			}
			m.metaMu.Unlock()
		}
		return err
	}
	// The data is written: point the L2 entries at it.
	var frees []freeReq
	t.mu.Lock()
	changed := false
	for i := range plans {
		pl := &plans[i]
		m.finishPlan(pl)
		if pl.newEntry == pl.entry && pl.newBm == pl.bm {
			continue
		}
		g.SetL2Entry(t.data, g.L2Index(pl.gOff), pl.newEntry, pl.newBm)
		changed = true
		if !pl.inPlace {
			if f, ok := m.oldHost(pl.entry, m.passOther); ok {
				frees = append(frees, f)
			}
		}
	}
	if changed {
		m.l2.markDirty(t)
	}
	t.mu.Unlock()
	return m.afterMetaChange(ctx, frees)
}

// afterMetaChange queues frees and writes metadata back when the caches
// grow too dirty.
func (m *image) afterMetaChange(ctx context.Context, frees []freeReq) error {
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

// oldHost returns the free request for the host space an entry held.
func (m *image) oldHost(e uint64, discard bool) (freeReq, bool) {
	g := m.g
	switch g.ClusterType(e) {
	case qcow2fmt.ClusterCompressed:
		off, size := g.Compressed(e)
		return freeReq{off: off, size: size, discard: discard}, true
	case qcow2fmt.ClusterNormal, qcow2fmt.ClusterZeroAlloc:
		if g.DataFile {
			return freeReq{}, false
		}
		return freeReq{off: qcow2fmt.HostOffset(e), size: g.ClusterSize, discard: discard}, true
	}
	return freeReq{}, false
}

// planCluster decides how a write to one cluster happens: in place in its
// host cluster, or in a new one, and which host bytes it writes (the
// request plus whatever copy-on-write completes).
func (m *image) planCluster(pl *plan) {
	g := m.g
	cs := g.ClusterSize
	ct := g.ClusterType(pl.entry)
	hostPresent := ct == qcow2fmt.ClusterNormal || ct == qcow2fmt.ClusterZeroAlloc
	copied := pl.entry&qcow2fmt.OflagCopied != 0 || g.DataFile
	pl.inPlace = hostPresent && copied
	if pl.inPlace {
		pl.host = qcow2fmt.HostOffset(pl.entry)
	}
	if !g.Extended {
		if pl.inPlace && ct == qcow2fmt.ClusterNormal {
			pl.wLo, pl.wHi = pl.reqLo, pl.reqHi
		} else {
			pl.wLo, pl.wHi = 0, cs
		}
		return
	}
	sb := g.SubclusterBits
	s0, s1 := int(pl.reqLo>>sb), int((pl.reqHi-1)>>sb)
	switch {
	case pl.inPlace:
		pl.wLo, pl.wHi = pl.reqLo, pl.reqHi
		if g.Subcluster(pl.entry, pl.bm, s0) != qcow2fmt.SubNormal {
			pl.wLo = int64(s0) << sb
		}
		if g.Subcluster(pl.entry, pl.bm, s1) != qcow2fmt.SubNormal {
			pl.wHi = int64(s1+1) << sb
		}
	case hostPresent || ct == qcow2fmt.ClusterCompressed:
		pl.wLo, pl.wHi = 0, cs
	default:
		pl.wLo, pl.wHi = int64(s0)<<sb, int64(s1+1)<<sb
	}
}

// finishPlan computes the entry after the write.
func (m *image) finishPlan(pl *plan) {
	g := m.g
	if !g.Extended {
		if pl.inPlace {
			pl.newEntry = (pl.entry &^ qcow2fmt.OflagZero) | qcow2fmt.OflagCopied
		} else {
			pl.newEntry = uint64(pl.host) | qcow2fmt.OflagCopied
		}
		return
	}
	sb := g.SubclusterBits
	lo, hi := int(pl.wLo>>sb), int((pl.wHi-1)>>sb)
	mask := uint64(0)
	for s := lo; s <= hi; s++ {
		mask |= 1 << s
	}
	bm := pl.bm
	if !pl.inPlace {
		ct := g.ClusterType(pl.entry)
		if ct == qcow2fmt.ClusterCompressed || ct == qcow2fmt.ClusterNormal {
			bm = 0
		}
		pl.newEntry = uint64(pl.host) | qcow2fmt.OflagCopied
	} else {
		pl.newEntry = pl.entry | qcow2fmt.OflagCopied
	}
	pl.newBm = (bm | mask) &^ (mask << 32)
}

// seg is one host write: consecutive plans with contiguous host bytes.
type seg struct {
	host, n     int64
	plain       bool  // the bytes are exactly p[pLo:pHi]
	pLo, pHi    int64 // for plain segments
	first, last int   // plan indices
}

// writePlans writes the host bytes of every plan, merging contiguous ones
// into single writes.
func (m *image) writePlans(ctx context.Context, plans []plan, p []byte, off int64) error {
	var cur seg
	have := false
	direct := m.cipher == nil
	for i := range plans {
		pl := &plans[i]
		h := pl.host + pl.wLo
		n := pl.wHi - pl.wLo
		plain := direct && pl.wLo == pl.reqLo && pl.wHi == pl.reqHi
		if have && cur.host+cur.n == h && cur.plain == plain && (plain || cur.n+n <= bufSize) {
			cur.n += n
			cur.last = i
			cur.pHi = pl.gOff + pl.reqHi - off
			continue
		}
		if have {
			if err := m.writeSeg(ctx, cur, plans, p, off); err != nil {
				return err
			}
		}
		cur = seg{host: h, n: n, plain: plain, pLo: pl.gOff + pl.reqLo - off, pHi: pl.gOff + pl.reqHi - off, first: i, last: i}
		have = true
	}
	if have {
		return m.writeSeg(ctx, cur, plans, p, off)
	}
	return nil
}

// writeSeg performs one host write.
func (m *image) writeSeg(ctx context.Context, s seg, plans []plan, p []byte, off int64) error {
	if k := m.overlapsData(s.host, s.n); k != 0 {
		return m.corrupt(ctx, true, s.host, s.n, "Preventing invalid write on metadata (overlaps with %s)", k)
	}
	if s.host+s.n > m.data.Size() {
		m.metaMu.Lock()
		err := m.ensureSize(ctx, m.data, s.host+s.n)
		m.metaMu.Unlock()
		if err != nil {
			return err
		}
	}
	if s.plain {
		return m.data.WriteAt(ctx, p[s.pLo:s.pHi], s.host, 0)
	}
	var buf []byte
	if s.n <= bufSize {
		bp := m.getBuf()
		defer m.bufPool.Put(bp)
		buf = (*bp)[:s.n]
	} else {
		buf = make([]byte, s.n)
	}
	for i := s.first; i <= s.last; i++ {
		pl := &plans[i]
		b := buf[pl.host+pl.wLo-s.host:]
		if pl.wLo < pl.reqLo {
			if err := m.readOld(ctx, b[:pl.reqLo-pl.wLo], pl.gOff+pl.wLo, pl); err != nil {
				return err
			}
		}
		copy(b[pl.reqLo-pl.wLo:], p[pl.gOff+pl.reqLo-off:pl.gOff+pl.reqHi-off])
		if pl.reqHi < pl.wHi {
			if err := m.readOld(ctx, b[pl.reqHi-pl.wLo:pl.wHi-pl.wLo], pl.gOff+pl.reqHi, pl); err != nil {
				return err
			}
		}
	}
	if m.cipher != nil {
		if err := m.cipher.Encrypt(buf, buf, uint64(s.host)/512, 512); err != nil {
			return err
		}
	}
	return m.data.WriteAt(ctx, buf, s.host, 0)
}

// overlapsData checks a data write against the metadata (not for an
// external data file, which holds no metadata).
func (m *image) overlapsData(off, n int64) olFlags {
	if m.g.DataFile {
		return 0
	}
	return m.overlaps(off, n, 0)
}

// readOld reads guest bytes [gOff, gOff+len(dst)) of one cluster as the
// plan's old entry maps them (the copy-on-write source).
func (m *image) readOld(ctx context.Context, dst []byte, gOff int64, pl *plan) error {
	g := m.g
	for len(dst) > 0 {
		sc := int((gOff & (g.ClusterSize - 1)) >> g.SubclusterBits)
		typ := g.Subcluster(pl.entry, pl.bm, sc)
		n := int64(len(dst))
		if typ != qcow2fmt.SubCompressed {
			// Extend over following subclusters of the same type.
			subEnd := ((gOff >> g.SubclusterBits) + 1) << g.SubclusterBits
			for subEnd < gOff+n && g.Subcluster(pl.entry, pl.bm, int((subEnd&(g.ClusterSize-1))>>g.SubclusterBits)) == typ {
				subEnd += g.SubclusterSize
			}
			n = min(n, subEnd-gOff)
		}
		r := run{typ: typ, n: n, entry: pl.entry}
		if hasHost(typ) {
			r.host = qcow2fmt.HostOffset(pl.entry) + gOff&(g.ClusterSize-1)
		}
		if err := m.readRun(ctx, dst[:n], gOff, r); err != nil {
			return err
		}
		dst, gOff = dst[n:], gOff+n
	}
	return nil
}
