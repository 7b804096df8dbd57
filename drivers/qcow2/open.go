package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/blockcrypto"
)

// imageParams are what newImage needs besides the header.
type imageParams struct {
	file, data  *graph.Child
	ro          bool
	name        string
	emit        func(string, any)
	l2Tables    int
	rcBlocks    int
	lazy        bool
	passRequest bool
	passOther   bool
	passSnap    bool
	overlap     olFlags
	cipher      *blockcrypto.Cipher
	luks        *luksfmt.Header
	// noRepair skips the repair of a dirty image (create).
	noRepair bool
}

// readTable reads a table of n entries; bytes past the end of the file
// read as zeroes.
func readTable(ctx context.Context, c *graph.Child, off, n int64) ([]uint64, error) {
	buf := make([]byte, 8*n)
	if err := readChild(ctx, c, buf, off); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[8*i:])
	}
	return t, nil
}

// newImage sets up an image from its parsed header: it reads the L1 and
// refcount tables and the snapshot table, and, when writable, brings the
// header up to date (unknown autoclear bits, stale bitmaps) and repairs a
// dirty image.
func newImage(ctx context.Context, h *qcow2fmt.Header, p imageParams) (*image, error) {
	g := h.Geometry()
	m := &image{
		file: p.file, data: p.data, g: g, emit: p.emit, name: p.name,
		version: h.Version, compression: h.CompressionType, dataFileRaw: h.DataFileRaw(),
		lazy: p.lazy, passRequest: p.passRequest, passOther: p.passOther, passSnap: p.passSnap, overlap: p.overlap,
		cipher: p.cipher, luks: p.luks, h: h, hasBitmapExt: h.Bitmaps != nil,
	}
	if m.data == nil {
		m.data = m.file
	}
	m.size.Store(int64(h.Size))
	cs := g.ClusterSize
	m.l2 = newL2Cache(p.l2Tables, cs)
	m.rc = newRCCache(p.rcBlocks)
	var err error
	if m.l1, err = readTable(ctx, m.file, int64(h.L1TableOffset), int64(h.L1Size)); err != nil {
		return nil, fmt.Errorf("Could not read L1 table: %w", err)
	}
	if m.reftable, err = readTable(ctx, m.file, int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)*cs/8); err != nil {
		return nil, fmt.Errorf("Could not initialize refcount handling: %w", err)
	}
	snaps, snapSize, err := qcow2fmt.Snapshots(graph.NewSectionIO(ctx, m.file, 0, -1), h)
	if err != nil {
		return nil, err
	}
	m.snapshots = snaps
	// Where the metadata is, for overlap checks.
	m.ov.setRange(olMainHeader, olRange{0, cs, 0})
	m.ov.setRange(olActiveL1, olRange{int64(h.L1TableOffset), int64(h.L1TableOffset) + 8*int64(h.L1Size), 0})
	m.ov.setRange(olRefcountTable, olRange{int64(h.RefcountTableOffset), int64(h.RefcountTableOffset) + int64(h.RefcountTableClusters)*cs, 0})
	m.ov.setRange(olSnapshotTable, olRange{int64(h.SnapshotsOffset), int64(h.SnapshotsOffset) + snapSize, 0})
	var inactive []olRange
	for _, s := range snaps {
		inactive = append(inactive, olRange{int64(s.L1TableOffset), int64(s.L1TableOffset) + 8*int64(s.L1Size), 0})
	}
	m.ov.setRange(olInactiveL1, inactive...)
	if h.Bitmaps != nil {
		m.ov.setRange(olBitmapDirectory, olRange{int64(h.Bitmaps.DirOffset), int64(h.Bitmaps.DirOffset + h.Bitmaps.DirSize), 0})
	}
	if h.Crypto != nil {
		m.ov.setRange(olCryptoHeader, olRange{int64(h.Crypto.Offset), int64(h.Crypto.Offset + h.Crypto.Length), 0})
	}
	m.ov.clusters = map[int64]olFlags{}
	for _, e := range m.l1 {
		if off := int64(e & qcow2fmt.L1OffsetMask); off != 0 {
			m.ov.clusters[off>>g.ClusterBits] |= olActiveL2
		}
	}
	for _, e := range m.reftable {
		if off := int64(e & qcow2fmt.ReftOffsetMask); off != 0 {
			m.ov.clusters[off>>g.ClusterBits] |= olRefcountBlock
		}
	}
	if m.overlap&olInactiveL2 != 0 {
		for _, s := range snaps {
			t, err := readTable(ctx, m.file, int64(s.L1TableOffset), int64(s.L1Size))
			if err != nil {
				return nil, err
			}
			for _, e := range t {
				if off := int64(e & qcow2fmt.L1OffsetMask); off != 0 {
					m.ov.clusters[off>>g.ClusterBits] |= olInactiveL2
				}
			}
		}
	}
	m.ro.Store(p.ro)
	if p.ro {
		return m, nil
	}
	if err := m.makeWritable(ctx, p.noRepair); err != nil {
		return nil, err
	}
	return m, nil
}

// makeWritable does what a writable open does and a read-only one skips:
// the header is brought up to date (unknown autoclear bits, stale
// bitmaps), enabled bitmaps are marked in use, and a dirty image is
// repaired unless noRepair. newImage calls it at open, PrepareReopen when
// a read-only node becomes writable.
func (m *image) makeWritable(ctx context.Context, noRepair bool) error {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	h := m.h
	update := h.BitmapsIgnored
	if h.AutoclearFeatures&^qcow2fmt.AutoclearMask != 0 {
		h.AutoclearFeatures &= qcow2fmt.AutoclearMask
		update = true
	}
	if update {
		if err := m.writeHeader(ctx); err != nil {
			return fmt.Errorf("Could not update qcow2 header: %w", err)
		}
	}
	if h.Bitmaps != nil {
		if err := m.markBitmapsInUse(ctx); err != nil {
			return err
		}
	}
	if h.IncompatibleFeatures&qcow2fmt.IncompatDirty != 0 && !noRepair {
		if err := m.repairLocked(ctx, false); err != nil {
			return fmt.Errorf("Could not repair dirty image: %w", err)
		}
	}
	return nil
}

// markBitmapsInUse flags the enabled ("auto") persistent bitmaps as in use:
// blockd does not track writes in them, so once it writes they are
// inconsistent. Disabled bitmaps stay valid. metaMu is held.
func (m *image) markBitmapsInUse(ctx context.Context) error {
	bms, err := qcow2fmt.Bitmaps(graph.NewSectionIO(ctx, m.file, 0, -1), m.h, m.file.Size())
	if err != nil {
		return err
	}
	changed := false
	for _, b := range bms {
		if b.Flags&qcow2fmt.BitmapAuto != 0 && b.Flags&qcow2fmt.BitmapInUse == 0 {
			var f [4]byte
			binary.BigEndian.PutUint32(f[:], b.Flags|qcow2fmt.BitmapInUse)
			if err := m.file.WriteAt(ctx, f[:], int64(m.h.Bitmaps.DirOffset)+b.DirOffset+12, 0); err != nil {
				return err
			}
			changed = true
		}
	}
	if changed {
		return m.file.Flush(ctx)
	}
	return nil
}

// closeQuiet releases what an image holds without writing.
func (m *image) closeQuiet() {
	if m.cipher != nil {
		m.cipher.Wipe()
	}
}

// cryptoRegion is the LUKS header area of an encrypted image, which the
// header's crypto extension places in file.
func cryptoRegion(ctx context.Context, file *graph.Child, h *qcow2fmt.Header) *graph.SectionIO {
	return graph.NewSectionIO(ctx, file, int64(h.Crypto.Offset), int64(h.Crypto.Length))
}

// openLUKS opens the LUKS header of an encrypted image and unlocks the
// volume key with pass (which it wipes), within the KDF limits lim.
func openLUKS(ctx context.Context, file *graph.Child, h *qcow2fmt.Header, pass []byte, lim luksfmt.KDFLimits) (*blockcrypto.Cipher, *luksfmt.Header, error) {
	defer luksfmt.Wipe(pass)
	hdr, err := luksfmt.Open(cryptoRegion(ctx, file, h), int64(h.Crypto.Length))
	if err != nil {
		return nil, nil, qcrypto.GraphError(err)
	}
	if ss := hdr.SectorSize(); ss != 512 {
		return nil, nil, fmt.Errorf("qcow2: LUKS encryption sector size %d is not supported (QEMU uses 512)", ss)
	}
	key, _, err := hdr.Unlock(ctx, pass, luksfmt.AnySlot, lim)
	if err != nil {
		return nil, nil, qcrypto.GraphError(err)
	}
	defer luksfmt.Wipe(key)
	c, err := blockcrypto.New(hdr.CipherSpec(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("qcow2: %w", err)
	}
	return c, hdr, nil
}
