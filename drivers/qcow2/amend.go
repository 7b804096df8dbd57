package qcow2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"blockd/drivers/luks/qcrypto"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// ImageAmend is what qemu-img amend may change in a qcow2 image
// (qcow2_amend_options); nil or zero members stay as they are. QMP's
// x-blockdev-amend has none of these for qcow2.
type ImageAmend struct {
	Version       int   // 2 or 3
	Size          int64 // new virtual size
	LazyRefcounts *bool
	RefcountBits  int
	BackingFile   *string
	BackingFormat *string
	DataFile      *string
	DataFileRaw   *bool
}

// AmendImage changes image options in QEMU's order: upgrade, refcount
// width, data file flags, lazy refcounts, size, downgrade.
func (n *node) AmendImage(ctx context.Context, a *ImageAmend, force bool) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	m := n.image
	m.metaMu.Lock()
	h := m.h.Clone()
	m.metaMu.Unlock()
	newVersion := int(h.Version)
	if a.Version != 0 {
		newVersion = a.Version
	}
	if a.RefcountBits != 0 && (a.RefcountBits > 64 || bits.OnesCount(uint(a.RefcountBits)) != 1) {
		return errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if a.DataFile != nil && *a.DataFile != "" && !h.HasDataFile() {
		return errors.New("data-file can only be set for images that use an external data file")
	}
	if a.DataFileRaw != nil && *a.DataFileRaw && !h.DataFileRaw() {
		return errors.New("data-file-raw cannot be set on existing images")
	}
	err := m.amendLocked(ctx, func() error {
		if newVersion > int(m.h.Version) {
			m.h.Version = uint32(newVersion)
			m.version = uint32(newVersion)
			if err := m.writeHeader(ctx); err != nil {
				return fmt.Errorf("Failed to update the image header: %w", err)
			}
		}
		if a.RefcountBits != 0 && a.RefcountBits != m.h.RefcountBits() {
			if newVersion < 3 && a.RefcountBits != 16 {
				return errors.New("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
			}
			if err := m.changeRefcountOrderLocked(ctx, uint32(bits.TrailingZeros(uint(a.RefcountBits)))); err != nil {
				return err
			}
		}
		if a.DataFileRaw != nil && !*a.DataFileRaw {
			m.h.AutoclearFeatures &^= qcow2fmt.AutoclearDataFileRaw
			m.dataFileRaw = false
		}
		if a.DataFile != nil {
			m.h.DataFile, m.h.HasDataFileName = *a.DataFile, *a.DataFile != ""
		}
		if err := m.writeHeader(ctx); err != nil {
			return fmt.Errorf("Failed to update the image header: %w", err)
		}
		if a.BackingFile != nil && *a.BackingFile != m.h.BackingFile ||
			a.BackingFormat != nil && *a.BackingFormat != m.h.BackingFormat {
			return errors.New("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
		}
		if a.LazyRefcounts != nil && *a.LazyRefcounts != m.lazy {
			if *a.LazyRefcounts {
				if newVersion < 3 {
					return errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
				}
				m.h.CompatibleFeatures |= qcow2fmt.CompatLazyRefcounts
			} else {
				if err := m.markCleanLocked(ctx); err != nil {
					return fmt.Errorf("Failed to make the image clean: %w", err)
				}
				m.h.CompatibleFeatures &^= qcow2fmt.CompatLazyRefcounts
			}
			if err := m.writeHeader(ctx); err != nil {
				return fmt.Errorf("Failed to update the image header: %w", err)
			}
			m.lazy = *a.LazyRefcounts
		}
		return nil
	})
	if err != nil {
		return err
	}
	if a.Size != 0 && a.Size != m.size.Load() {
		if err := m.truncate(ctx, a.Size, graph.PreallocOff); err != nil {
			return err
		}
	}
	if newVersion < int(h.Version) {
		return m.amendLocked(ctx, func() error { return m.downgradeLocked(ctx) })
	}
	return nil
}

// amendLocked runs f with every request held off and the caches written
// back and empty.
func (m *image) amendLocked(ctx context.Context, f func() error) error {
	release, err := m.exclusive(ctx)
	if err != nil {
		return err
	}
	defer release()
	return f()
}

// markCleanLocked makes the refcounts stable and clears the dirty bit
// (qcow2_mark_clean). metaMu is held.
func (m *image) markCleanLocked(ctx context.Context) error {
	if err := m.writebackLocked(ctx, true); err != nil {
		return err
	}
	if err := m.setIncompatible(ctx, qcow2fmt.IncompatDirty, false); err != nil {
		return err
	}
	m.dirtyMarked = false
	return nil
}

// downgradeLocked turns a version 3 image into a version 2 one
// (qcow2_downgrade): zero clusters become data clusters of zeroes (or
// unallocated clusters without a backing file). metaMu is held and the
// L2 cache is empty.
func (m *image) downgradeLocked(ctx context.Context) error {
	h := m.h
	if h.RefcountOrder != 4 {
		return errors.New("compat=0.10 requires refcount_bits=16")
	}
	if h.HasDataFile() {
		return errors.New("Cannot downgrade an image with a data file")
	}
	for _, s := range m.snapshots {
		if s.VMStateSize > 0xffffffff || int64(s.DiskSize) != m.size.Load() {
			return errors.New("Internal snapshots prevent downgrade of image")
		}
	}
	if h.IncompatibleFeatures&qcow2fmt.IncompatDirty != 0 {
		if err := m.markCleanLocked(ctx); err != nil {
			return fmt.Errorf("Failed to make the image clean: %w", err)
		}
	}
	if f := h.IncompatibleFeatures &^ qcow2fmt.IncompatCompression; f != 0 {
		return fmt.Errorf("Cannot downgrade an image with incompatible features %#x set", f)
	}
	compressed, err := m.expandZeroClustersLocked(ctx)
	if err != nil {
		return fmt.Errorf("Failed to turn zero into data clusters: %w", err)
	}
	if h.IncompatibleFeatures&qcow2fmt.IncompatCompression != 0 {
		if compressed {
			return errors.New("Cannot downgrade an image with zstd compression type and existing compressed clusters")
		}
		h.IncompatibleFeatures &^= qcow2fmt.IncompatCompression
		h.CompressionType = qcow2fmt.CompressionZlib
		m.compression = qcow2fmt.CompressionZlib
	}
	h.CompatibleFeatures, h.AutoclearFeatures = 0, 0
	h.Version = 2
	if err := m.writeHeader(ctx); err != nil {
		h.Version = 3
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	m.version, m.lazy = 2, false
	return nil
}

// expandZeroClustersLocked rewrites the zero clusters of the active and
// the snapshot tables for a version 2 image (qcow2_expand_zero_clusters),
// and reports whether compressed clusters exist. An L2 table shared by
// several L1 tables is rewritten once; a zero cluster whose host cluster
// other entries also use gets a cluster of its own. metaMu is held and
// the L2 cache is empty.
func (m *image) expandZeroClustersLocked(ctx context.Context) (bool, error) {
	g := m.g
	cs := g.ClusterSize
	m.l1mu.RLock()
	tables := [][]uint64{append([]uint64(nil), m.l1...)}
	m.l1mu.RUnlock()
	for _, s := range m.snapshots {
		t, err := readTable(ctx, m.file, int64(s.L1TableOffset), int64(s.L1Size))
		if err != nil {
			return false, err
		}
		tables = append(tables, t)
	}
	buf := make([]byte, cs)
	zero := make([]byte, cs)
	compressed := false
	done := map[int64]bool{}
	// zeroCluster gives an entry a fresh cluster of zeroes holding refs
	// references.
	zeroCluster := func(refs int64) (int64, error) {
		host, err := m.allocClusters(ctx, 1)
		if err != nil {
			return 0, err
		}
		if refs > 1 {
			if err := m.addRefcount(ctx, host>>g.ClusterBits, refs-1); err != nil {
				return 0, err
			}
		}
		if err := m.ensureSize(ctx, m.data, host+cs); err != nil {
			return 0, err
		}
		return host, m.data.WriteAt(ctx, zero, host, 0)
	}
	for _, l1 := range tables {
		for i, e := range l1 {
			off := int64(e & qcow2fmt.L1OffsetMask)
			if off == 0 || done[off] {
				continue
			}
			done[off] = true
			if off&(cs-1) != 0 || off+cs > m.file.Size() {
				return false, m.corruptLocked(ctx, true, -1, -1, "L2 table offset %#x unaligned or beyond the end of the image (L1 index: %#x)", off, i)
			}
			if err := m.file.ReadAt(ctx, buf, off); err != nil {
				return false, err
			}
			l2rc, err := m.refcount(ctx, off>>g.ClusterBits)
			if err != nil {
				return false, err
			}
			refs := int64(max(l2rc, 1))
			copied := uint64(0)
			if refs == 1 {
				copied = qcow2fmt.OflagCopied
			}
			changed := false
			for j := int64(0); j < g.L2Entries; j++ {
				le, _ := g.L2Entry(buf, j)
				switch g.ClusterType(le) {
				case qcow2fmt.ClusterCompressed:
					compressed = true
				case qcow2fmt.ClusterZeroAlloc:
					host := qcow2fmt.HostOffset(le)
					hrc, err := m.refcount(ctx, host>>g.ClusterBits)
					if err != nil {
						return false, err
					}
					if int64(hrc) == refs {
						// Only this entry uses the cluster: zero it.
						if err := m.ensureSize(ctx, m.data, host+cs); err != nil {
							return false, err
						}
						if err := m.data.WriteAt(ctx, zero, host, 0); err != nil {
							return false, err
						}
						g.SetL2Entry(buf, j, le&^qcow2fmt.OflagZero, 0)
					} else {
						nh, err := zeroCluster(refs)
						if err != nil {
							return false, err
						}
						if err := m.addRefcount(ctx, host>>g.ClusterBits, -refs); err != nil {
							return false, err
						}
						g.SetL2Entry(buf, j, uint64(nh)|copied, 0)
					}
					changed = true
				case qcow2fmt.ClusterZeroPlain:
					ne := uint64(0)
					if m.backing != nil {
						nh, err := zeroCluster(refs)
						if err != nil {
							return false, err
						}
						ne = uint64(nh) | copied
					}
					g.SetL2Entry(buf, j, ne, 0)
					changed = true
				}
			}
			if changed {
				// The zeroes and the refcounts first, then the entries.
				if err := m.flushRefblocks2(ctx); err != nil {
					return false, err
				}
				if err := m.data.Flush(ctx); err != nil {
					return false, err
				}
				if err := m.file.WriteAt(ctx, buf, off, 0); err != nil {
					return false, err
				}
			}
		}
	}
	return compressed, m.file.Flush(ctx)
}

// changeRefcountOrderLocked rewrites the refcount structures with another
// entry width (qcow2_change_refcount_order): new blocks and a new table
// after the end of the file hold the counts the metadata implies; one
// header write switches to them, and the old structures become free
// space. metaMu is held and the caches are written back.
func (m *image) changeRefcountOrderLocked(ctx context.Context, order uint32) error {
	refs, err := qcow2fmt.References(graph.NewSectionIO(ctx, m.file, 0, -1), m.h, m.file.Size())
	if err != nil {
		return err
	}
	if len(refs.Problems) > 0 {
		return fmt.Errorf("qcow2: cannot change the refcount width of an inconsistent image: %s", refs.Problems[0])
	}
	g := m.g
	cs := g.ClusterSize
	// The old refcount table and blocks do not count.
	adj := map[int64]int64{}
	rt := int64(m.h.RefcountTableOffset) >> g.ClusterBits
	for c := rt; c < rt+int64(m.h.RefcountTableClusters); c++ {
		adj[c]--
	}
	for _, e := range m.reftable {
		if off := int64(e & qcow2fmt.ReftOffsetMask); off != 0 {
			adj[off>>g.ClusterBits]--
		}
	}
	start := refs.Clusters()
	count := func(c int64) uint64 {
		if c >= start {
			return 1 // the new structures
		}
		return uint64(max(int64(refs.Count(c))+adj[c], 0))
	}
	ng := qcow2fmt.NewGeometry(g.ClusterBits, g.Extended, order, g.DataFile)
	for c := int64(0); c < start; c++ {
		if v := count(c); v > ng.RefcountMax {
			return fmt.Errorf("Cannot decrease refcount entry width to %d bits: Cluster at offset %#x has a refcount of %d", ng.RefcountBits, c*cs, v)
		}
	}
	// Room for blocks covering everything, themselves and the table.
	var nb, nt int64
	for {
		total := start + nb + nt
		nb2 := (total + ng.RefblockSize - 1) / ng.RefblockSize
		nt2 := (nb2*8 + cs - 1) / cs
		if nb2 == nb && nt2 == nt {
			break
		}
		nb, nt = nb2, nt2
	}
	total := start + nb + nt
	table := make([]uint64, nt*cs/8)
	blk := make([]byte, cs)
	for b := int64(0); b < nb; b++ {
		clear(blk)
		for i := int64(0); i < ng.RefblockSize; i++ {
			c := b*ng.RefblockSize + i
			if c >= total {
				break
			}
			if v := count(c); v != 0 {
				qcow2fmt.SetRefcount(blk, i, order, v)
			}
		}
		off := (start + b) * cs
		if err := m.writeMeta(ctx, blk, off); err != nil {
			return err
		}
		table[b] = uint64(off)
	}
	tOff := (start + nb) * cs
	if err := m.writeMeta(ctx, qcow2fmt.EncodeTable(table), tOff); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	oldOrder, oldOff, oldN := m.h.RefcountOrder, m.h.RefcountTableOffset, m.h.RefcountTableClusters
	m.h.RefcountOrder, m.h.RefcountTableOffset, m.h.RefcountTableClusters = order, uint64(tOff), uint32(nt)
	if err := m.writeHeader(ctx); err != nil {
		m.h.RefcountOrder, m.h.RefcountTableOffset, m.h.RefcountTableClusters = oldOrder, oldOff, oldN
		return fmt.Errorf("Failed to update the image header: %w", err)
	}
	m.g = ng
	m.reftable = table
	m.rc = newRCCache(m.rc.capacity)
	m.freeHint, m.packOff = 0, 0
	m.setRange(olRefcountTable, olRange{off: tOff, end: tOff + nt*cs})
	m.ovMu.Lock()
	for c, k := range m.ov.clusters {
		if k &^= olRefcountBlock; k != 0 {
			m.ov.clusters[c] = k
		} else {
			delete(m.ov.clusters, c)
		}
	}
	for b := int64(0); b < nb; b++ {
		m.ov.clusters[start+b] |= olRefcountBlock
	}
	m.ovMu.Unlock()
	return nil
}

// AmendOptions is BlockdevAmendOptionsQcow2: x-blockdev-amend changes the
// keyslots of an encrypted image's LUKS header.
type AmendOptions struct {
	Encrypt *EncryptAmend `json:"encrypt,omitempty"`
}

// EncryptAmend is QCryptoBlockAmendOptions (format luks).
type EncryptAmend struct {
	Format CryptoFormat `json:"format"`
	qcrypto.AmendOptions
}

// Amend implements graph.Amender (qcow2_co_amend).
func (n *node) Amend(ctx context.Context, v any, force bool) error {
	o := v.(*AmendOptions)
	if o.Encrypt == nil {
		return nil
	}
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return errors.New("Block node is read-only")
	}
	if n.luks == nil {
		return errors.New("image is not encrypted, can't amend")
	}
	if o.Encrypt.Format != "luks" {
		return fmt.Errorf("Amend can't be used to change the qcow2 encryption format")
	}
	n.amendMu.Lock()
	defer n.amendMu.Unlock()
	m := n.image
	k := &qcrypto.Keyslots{
		Header: n.luks, KeySecret: n.keySecret, Secret: n.secrets, Limits: n.kdfLimits,
		Writer: func(ctx context.Context) (io.WriterAt, func(), error) {
			m.metaMu.Lock()
			h := m.h
			m.metaMu.Unlock()
			return cryptoRegion(ctx, m.file, h), func() { _ = m.file.Flush(ctx) }, nil
		},
	}
	return k.Amend(ctx, &o.Encrypt.AmendOptions, force)
}
