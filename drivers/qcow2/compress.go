package qcow2

import (
	"context"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// WriteCompressed writes whole clusters compressed (qemu-img convert -c):
// off is cluster aligned and p a multiple of the cluster size, or it ends
// at the end of the image. A cluster that does not shrink is written
// normally, as QEMU does. Compressed data is packed byte by byte into
// shared host clusters, each holding one reference per compressed cluster
// in it.
func (n *node) WriteCompressed(ctx context.Context, p []byte, off int64) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	if n.g.DataFile {
		return fmt.Errorf("qcow2: compression is not supported with an external data file: %w", graph.ErrNotSupported)
	}
	if n.cipher != nil {
		return fmt.Errorf("qcow2: compression is not supported with encryption: %w", graph.ErrNotSupported)
	}
	cs := n.cs()
	end := off + int64(len(p))
	if off < 0 || off&(cs-1) != 0 || (int64(len(p))&(cs-1) != 0 && end != n.Size()) || end > n.Size() {
		return fmt.Errorf("qcow2: compressed writes must cover whole clusters (offset %d, length %d): %w", off, len(p), graph.ErrRange)
	}
	for len(p) > 0 {
		k := min(int64(len(p)), cs)
		if err := n.writeCompressedCluster(ctx, p[:k], off); err != nil {
			return err
		}
		p, off = p[k:], off+k
	}
	return nil
}

// writeCompressedCluster writes one cluster (the last may be short: it is
// padded with zeroes).
func (m *image) writeCompressedCluster(ctx context.Context, p []byte, off int64) error {
	g := m.g
	cs := g.ClusterSize
	src := p
	if int64(len(p)) < cs {
		src = make([]byte, cs)
		copy(src, p)
	}
	out, err := qcow2fmt.Compress(m.compression, src)
	if err != nil {
		return err
	}
	st := m.lockStripes(off, cs, true)
	defer m.unlockStripes(st)
	if out == nil {
		return m.write(ctx, p, off)
	}
	t, l2off, err := m.l2ForWrite(ctx, off)
	if err != nil {
		return err
	}
	defer m.l2.put(t)
	idx := g.L2Index(off)
	t.mu.RLock()
	le, bm := g.L2Entry(t.data, idx)
	t.mu.RUnlock()
	if bad := m.checkEntry(le, bm, l2off, idx, off); bad != "" {
		return m.corrupt(ctx, true, -1, -1, "%s", bad)
	}
	size := int64(len(out))
	m.metaMu.Lock()
	host, err := m.allocBytesLocked(ctx, size)
	if err == nil {
		err = m.ensureSize(ctx, m.file, host+size)
	}
	m.metaMu.Unlock()
	if err != nil {
		return err
	}
	entry, err := g.CompressedEntry(host, size)
	if err == nil {
		if k := m.overlapsData(host, size); k != 0 {
			err = m.corrupt(ctx, true, host, size, "Preventing invalid write on metadata (overlaps with %s)", k)
		} else {
			err = m.file.WriteAt(ctx, out, host, 0)
		}
	}
	if err != nil {
		// Not referenced: give the bytes back.
		m.metaMu.Lock()
		m.pendingFree = append(m.pendingFree, freeReq{off: host, size: size})
		m.metaMu.Unlock()
		return err
	}
	var frees []freeReq
	if f, ok := m.oldHost(le, m.passOther); ok {
		frees = append(frees, f)
	}
	t.mu.Lock()
	g.SetL2Entry(t.data, idx, entry, 0)
	m.l2.markDirty(t)
	t.mu.Unlock()
	return m.afterMetaChange(ctx, frees)
}

// allocBytesLocked allocates size bytes (less than a cluster) for
// compressed data, after the previous compressed cluster where it fits
// (qcow2_alloc_bytes): every host cluster the bytes touch gains one
// reference. metaMu is held.
func (m *image) allocBytesLocked(ctx context.Context, size int64) (int64, error) {
	cs := m.cs()
	off := m.packOff
	if off != 0 {
		rc, err := m.refcount(ctx, off>>m.g.ClusterBits)
		if err != nil {
			return 0, err
		}
		if rc == 0 || rc >= m.g.RefcountMax {
			off = 0
		}
	}
	free := cs - off&(cs-1)
	switch {
	case off != 0 && free >= size:
		// Within the current cluster.
		if err := m.addRefcount(ctx, off>>m.g.ClusterBits, 1); err != nil {
			return 0, err
		}
	default:
		nc, err := m.allocClusters(ctx, 1) // refcount 1: this reference
		if err != nil {
			return 0, err
		}
		if off != 0 && (off|(cs-1))+1 == nc {
			// The new cluster follows the current one: the bytes
			// span both, and the current one gains a reference.
			if err := m.addRefcount(ctx, off>>m.g.ClusterBits, 1); err != nil {
				return 0, err
			}
		} else {
			off = nc
		}
	}
	m.packOff = off + size
	if m.packOff&(cs-1) == 0 {
		m.packOff = 0
	}
	return off, nil
}
