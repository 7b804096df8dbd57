package qcow2

// olFlags are kinds of metadata, for overlap checks (QEMU's
// QCow2MetadataOverlap bits, plus the encryption header).
type olFlags uint32

const (
	olMainHeader olFlags = 1 << iota
	olActiveL1
	olActiveL2
	olRefcountTable
	olRefcountBlock
	olSnapshotTable
	olInactiveL1
	olInactiveL2
	olBitmapDirectory
	olCryptoHeader

	olConstant = olMainHeader | olActiveL1 | olRefcountTable | olSnapshotTable | olBitmapDirectory | olCryptoHeader
	olCached   = olConstant | olActiveL2 | olRefcountBlock | olInactiveL1
	olAll      = olCached | olInactiveL2
)

var olNames = []string{"qcow2_header", "active L1 table", "active L2 table", "refcount table", "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table", "bitmap directory", "encryption header"}

// String names the lowest kind set.
func (f olFlags) String() string {
	for i, n := range olNames {
		if f&(1<<i) != 0 {
			return n
		}
	}
	return "metadata"
}

type olRange struct {
	off, end int64
	kind     olFlags
}

// overlapMap knows where the metadata is: contiguous areas (header, L1,
// refcount table, snapshot table and L1s, bitmap directory, encryption
// header) and single clusters (L2 tables, refcount blocks).
type overlapMap struct {
	ranges   []olRange
	clusters map[int64]olFlags // cluster index → kinds
}

// setRange replaces the ranges of one kind.
func (o *overlapMap) setRange(kind olFlags, rs ...olRange) {
	out := o.ranges[:0:0]
	for _, r := range o.ranges {
		if r.kind != kind {
			out = append(out, r)
		}
	}
	for _, r := range rs {
		if r.end > r.off {
			r.kind = kind
			out = append(out, r)
		}
	}
	o.ranges = out
}

// overlaps returns the kind of metadata [off, off+size) touches among the
// enabled checks, ignoring the kinds in ignore, or 0.
func (m *image) overlaps(off, size int64, ignore olFlags) olFlags {
	check := m.overlap &^ ignore
	if check == 0 || size <= 0 {
		return 0
	}
	m.ovMu.RLock()
	defer m.ovMu.RUnlock()
	end := off + size
	for _, r := range m.ov.ranges {
		if r.kind&check != 0 && off < r.end && r.off < end {
			return r.kind
		}
	}
	if check&(olActiveL2|olRefcountBlock|olInactiveL2) != 0 && len(m.ov.clusters) > 0 {
		for c := off >> m.g.ClusterBits; c <= (end-1)>>m.g.ClusterBits; c++ {
			if k := m.ov.clusters[c] & check; k != 0 {
				return k
			}
		}
	}
	return 0
}

// addClusterKind records a metadata cluster.
func (m *image) addClusterKind(off int64, kind olFlags) {
	m.ovMu.Lock()
	if m.ov.clusters == nil {
		m.ov.clusters = map[int64]olFlags{}
	}
	m.ov.clusters[off>>m.g.ClusterBits] |= kind
	m.ovMu.Unlock()
}

// removeClusterKind forgets a metadata cluster.
func (m *image) removeClusterKind(off int64, kind olFlags) {
	m.ovMu.Lock()
	c := off >> m.g.ClusterBits
	if k := m.ov.clusters[c] &^ kind; k != 0 {
		m.ov.clusters[c] = k
	} else {
		delete(m.ov.clusters, c)
	}
	m.ovMu.Unlock()
}

func (m *image) setRange(kind olFlags, rs ...olRange) {
	m.ovMu.Lock()
	m.ov.setRange(kind, rs...)
	m.ovMu.Unlock()
}
