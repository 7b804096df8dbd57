package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"syscall"
	"time"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// Internal snapshots (QEMU's block/qcow2-snapshot.c): a snapshot is a copy
// of the active L1 table plus one more reference on every L2 table and
// data cluster it reaches; writes to shared clusters copy them first
// (their COPIED flags are clear). Every operation runs with all requests
// held off and the metadata caches written back, and orders its writes so
// that a crash at any point leaves at worst leaked clusters.

// SnapshotInfo describes one snapshot (qemu-img reads the members by
// name).
type SnapshotInfo = graph.SnapshotInfo

// snapshotInfosLocked describes the snapshots (nil without any). metaMu
// is held.
func (m *image) snapshotInfosLocked() []SnapshotInfo {
	if len(m.snapshots) == 0 {
		return nil
	}
	out := make([]SnapshotInfo, 0, len(m.snapshots))
	for _, s := range m.snapshots {
		si := SnapshotInfo{
			ID: s.ID, Name: s.Name, VMStateSize: int64(s.VMStateSize),
			DateSec: int64(s.DateSec), DateNsec: int64(s.DateNsec),
			VMClockSec: int64(s.VMClockNsec / 1e9), VMClockNsec: int64(s.VMClockNsec % 1e9),
		}
		if s.Icount != -1 {
			v := s.Icount
			si.Icount = &v
		}
		out = append(out, si)
	}
	return out
}

// snapshotable checks that the image can change its snapshots.
func (n *node) snapshotable() error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	if n.g.DataFile {
		return fmt.Errorf("qcow2: internal snapshots are not supported with an external data file: %w", syscall.ENOTSUP)
	}
	return nil
}

// exclusive holds off every request, writes the cached metadata back and
// empties the L2 cache, so that tables can be changed on disk directly.
// The function returned releases everything. metaMu is held on return.
func (m *image) exclusive(ctx context.Context) (func(), error) {
	st := m.lockStripes(0, int64(nStripes)<<m.g.ClusterBits, true)
	m.metaMu.Lock()
	release := func() {
		m.metaMu.Unlock()
		m.unlockStripes(st)
	}
	if err := m.writebackLocked(ctx, true); err != nil {
		release()
		return nil, err
	}
	m.l2.drop()
	return release, nil
}

// findSnapshot returns the index of the snapshot with id (or, failing
// that, name) key, or -1 (find_snapshot_by_id_or_name).
func (m *image) findSnapshot(key string) int {
	for i, s := range m.snapshots {
		if s.ID == key {
			return i
		}
	}
	for i, s := range m.snapshots {
		if s.Name == key {
			return i
		}
	}
	return -1
}

// CreateSnapshot makes a snapshot of the current contents named name
// (qcow2_snapshot_create); its ID is one more than the largest numeric ID.
func (n *node) CreateSnapshot(ctx context.Context, name string, date time.Time) error {
	if err := n.snapshotable(); err != nil {
		return err
	}
	m := n.image
	release, err := m.exclusive(ctx)
	if err != nil {
		return err
	}
	defer release()
	if len(m.snapshots) >= qcow2fmt.MaxSnapshots {
		return fmt.Errorf("qcow2: too many snapshots: %w", syscall.EFBIG)
	}
	if len(name) > 0xffff {
		return fmt.Errorf("qcow2: snapshot name too long: %w", syscall.EINVAL)
	}
	var maxID uint64
	for _, s := range m.snapshots {
		if v, err := strconv.ParseUint(leadingDigits(s.ID), 10, 64); err == nil && v > maxID {
			maxID = v
		}
	}
	m.l1mu.RLock()
	l1 := slices.Clone(m.l1)
	m.l1mu.RUnlock()
	// The snapshot's copy of the L1 table.
	cs := m.cs()
	var l1off int64
	if len(l1) > 0 {
		bytes := int64(len(l1)) * 8
		if l1off, err = m.allocClusters(ctx, (bytes+cs-1)/cs); err != nil {
			return err
		}
		if k := m.overlaps(l1off, bytes, 0); k != 0 {
			return m.corruptLocked(ctx, true, l1off, bytes, "Preventing invalid write on metadata (overlaps with %s)", k)
		}
		cp := make([]uint64, len(l1))
		for i, e := range l1 {
			cp[i] = e &^ qcow2fmt.OflagCopied
		}
		if err := m.writeMeta(ctx, qcow2fmt.EncodeTable(cp), l1off); err != nil {
			return err
		}
	}
	// One more reference on everything it reaches; the shared clusters
	// lose their COPIED flags.
	if err := m.snapshotRefsLocked(ctx, l1, true, 1); err != nil {
		return err
	}
	s := qcow2fmt.Snapshot{
		L1TableOffset: uint64(l1off), L1Size: uint32(len(l1)),
		ID: strconv.FormatUint(maxID+1, 10), Name: name,
		DateSec: uint32(date.Unix()), DateNsec: uint32(date.Nanosecond() / 1000 * 1000),
		DiskSize: uint64(m.size.Load()), Icount: 0,
	}
	if err := m.writeSnapshotsLocked(ctx, append(slices.Clone(m.snapshots), s)); err != nil {
		return err
	}
	return m.refreshOverlapLocked()
}

// leadingDigits is the numeric prefix strtoul reads.
func leadingDigits(s string) string {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return s[:i]
}

// ApplySnapshot reverts the image to a snapshot (qcow2_snapshot_goto).
func (n *node) ApplySnapshot(ctx context.Context, key string) error {
	if err := n.snapshotable(); err != nil {
		return err
	}
	m := n.image
	release, err := m.exclusive(ctx)
	if err != nil {
		return err
	}
	defer release()
	i := m.findSnapshot(key)
	if i < 0 {
		return fmt.Errorf("qcow2: no snapshot '%s': %w", key, syscall.ENOENT)
	}
	s := m.snapshots[i]
	if int64(s.DiskSize) != m.size.Load() {
		return fmt.Errorf("qcow2: loading a snapshot of a different disk size is not supported: %w", syscall.ENOTSUP)
	}
	if err := m.growL1Locked(ctx, int64(s.L1Size)); err != nil {
		return err
	}
	snapL1, err := readTable(ctx, m.file, int64(s.L1TableOffset), int64(s.L1Size))
	if err != nil {
		return err
	}
	m.l1mu.RLock()
	old := slices.Clone(m.l1)
	m.l1mu.RUnlock()
	next := make([]uint64, len(old))
	copy(next, snapL1)
	// References for the new active tables first, then the new L1 on
	// disk, then the old tables' references go.
	if err := m.snapshotRefsLocked(ctx, snapL1, false, 1); err != nil {
		return err
	}
	if err := m.writeL1Locked(ctx, next); err != nil {
		return err
	}
	if err := m.snapshotRefsLocked(ctx, old, false, -1); err != nil {
		return err
	}
	if err := m.snapshotRefsLocked(ctx, next, true, 0); err != nil {
		return err
	}
	if err := m.flushRefblocks2(ctx); err != nil {
		return err
	}
	return m.refreshOverlapLocked()
}

// DeleteSnapshot removes a snapshot, found by ID or name
// (qcow2_snapshot_delete).
func (n *node) DeleteSnapshot(ctx context.Context, key string) error {
	if err := n.snapshotable(); err != nil {
		return err
	}
	m := n.image
	release, err := m.exclusive(ctx)
	if err != nil {
		return err
	}
	defer release()
	i := m.findSnapshot(key)
	if i < 0 {
		return fmt.Errorf("Can't find the snapshot: %w", syscall.ENOENT)
	}
	s := m.snapshots[i]
	// Out of the table first: a crash from here on leaks, nothing worse.
	if err := m.writeSnapshotsLocked(ctx, slices.Delete(slices.Clone(m.snapshots), i, i+1)); err != nil {
		return err
	}
	snapL1, err := readTable(ctx, m.file, int64(s.L1TableOffset), int64(s.L1Size))
	if err != nil {
		return err
	}
	if err := m.snapshotRefsLocked(ctx, snapL1, false, -1); err != nil {
		return err
	}
	var freed []int64
	if s.L1Size > 0 {
		off, n := int64(s.L1TableOffset), int64(s.L1Size)*8
		if err := m.freeNow(ctx, off, n); err != nil {
			return err
		}
		for c := off >> m.g.ClusterBits; c <= (off+n-1)>>m.g.ClusterBits && m.passSnap; c++ {
			if rc, err := m.refcount(ctx, c); err == nil && rc == 0 {
				freed = append(freed, c)
			}
		}
	}
	m.l1mu.RLock()
	cur := slices.Clone(m.l1)
	m.l1mu.RUnlock()
	if err := m.snapshotRefsLocked(ctx, cur, true, 0); err != nil {
		return err
	}
	if err := m.flushRefblocks2(ctx); err != nil {
		return err
	}
	m.discardClusters(ctx, freed)
	return m.refreshOverlapLocked()
}

// flushRefblocks2 writes the refcount blocks and flushes the file.
func (m *image) flushRefblocks2(ctx context.Context) error {
	if _, err := m.flushRefblocks(ctx); err != nil {
		return err
	}
	return m.file.Flush(ctx)
}

// snapshotRefsLocked adds addend references to every L2 table and data
// cluster an L1 table reaches (qcow2_update_snapshot_refcount), makes the
// refcounts stable, and then sets the COPIED flags of the tables it
// reaches where the refcount is one; with active set, l1 is the active
// table and its entries are updated too. The L2 cache is empty and
// metaMu is held.
func (m *image) snapshotRefsLocked(ctx context.Context, l1 []uint64, active bool, addend int64) error {
	g := m.g
	cs := g.ClusterSize
	buf := make([]byte, cs)
	readL2 := func(i int, e uint64) (int64, bool, error) {
		off := int64(e & qcow2fmt.L1OffsetMask)
		if off == 0 {
			return 0, false, nil
		}
		if off&(cs-1) != 0 || off+cs > m.file.Size() {
			return 0, false, m.corruptLocked(ctx, true, -1, -1, "L2 table offset %#x unaligned or beyond the end of the image (L1 index: %#x)", off, i)
		}
		return off, true, m.file.ReadAt(ctx, buf, off)
	}
	var freed []int64 // clusters a negative addend freed
	dec := func(c int64) error {
		if err := m.addRefcount(ctx, c, addend); err != nil {
			return err
		}
		if addend < 0 && m.passSnap {
			if rc, err := m.refcount(ctx, c); err == nil && rc == 0 {
				freed = append(freed, c)
			}
		}
		return nil
	}
	if addend != 0 {
		for i, e := range l1 {
			off, ok, err := readL2(i, e)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
			for j := int64(0); j < g.L2Entries; j++ {
				le, _ := g.L2Entry(buf, j)
				switch g.ClusterType(le) {
				case qcow2fmt.ClusterCompressed:
					coff, size := g.Compressed(le)
					for c := coff >> g.ClusterBits; c <= (coff+size-1)>>g.ClusterBits; c++ {
						if err := dec(c); err != nil {
							return err
						}
					}
				case qcow2fmt.ClusterNormal, qcow2fmt.ClusterZeroAlloc:
					host := qcow2fmt.HostOffset(le)
					if host&(cs-1) != 0 || host == 0 {
						return m.corruptLocked(ctx, true, -1, -1, "Cluster allocation offset %#x unaligned (L2 offset: %#x, L2 index: %#x)", host, off, j)
					}
					if err := dec(host >> g.ClusterBits); err != nil {
						return err
					}
				}
			}
			if err := dec(off >> g.ClusterBits); err != nil {
				return err
			}
		}
		if err := m.flushRefblocks2(ctx); err != nil {
			return err
		}
		m.discardClusters(ctx, freed)
	}
	// COPIED flags, on tables that are still in use.
	next := slices.Clone(l1)
	for i, e := range l1 {
		off, ok, err := readL2(i, e)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		rc, err := m.refcount(ctx, off>>g.ClusterBits)
		if err != nil {
			return err
		}
		if rc == 0 {
			continue
		}
		changed := false
		for j := int64(0); j < g.L2Entries; j++ {
			le, bm := g.L2Entry(buf, j)
			t := g.ClusterType(le)
			if t != qcow2fmt.ClusterNormal && t != qcow2fmt.ClusterZeroAlloc {
				continue
			}
			drc, err := m.refcount(ctx, qcow2fmt.HostOffset(le)>>g.ClusterBits)
			if err != nil {
				return err
			}
			nle := le &^ qcow2fmt.OflagCopied
			if drc == 1 {
				nle |= qcow2fmt.OflagCopied
			}
			if nle != le {
				g.SetL2Entry(buf, j, nle, bm)
				changed = true
			}
		}
		if changed {
			if err := m.file.WriteAt(ctx, buf, off, 0); err != nil {
				return err
			}
		}
		ne := e &^ qcow2fmt.OflagCopied
		if rc == 1 {
			ne |= qcow2fmt.OflagCopied
		}
		next[i] = ne
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	if active && !slices.Equal(next, l1) {
		return m.writeL1Locked(ctx, next)
	}
	return nil
}

// writeL1Locked replaces the active L1 table's entries (same size) on
// disk and in memory. metaMu is held.
func (m *image) writeL1Locked(ctx context.Context, l1 []uint64) error {
	off := int64(m.h.L1TableOffset)
	if err := m.writeMeta(ctx, qcow2fmt.EncodeTable(l1), off); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	m.l1mu.Lock()
	m.l1 = slices.Clone(l1)
	m.l1mu.Unlock()
	return nil
}

// writeSnapshotsLocked writes a new snapshot table, points the header at
// it and frees the old one (qcow2_write_snapshots). metaMu is held.
func (m *image) writeSnapshotsLocked(ctx context.Context, snaps []qcow2fmt.Snapshot) error {
	data := qcow2fmt.MarshalSnapshots(snaps)
	if len(data) > qcow2fmt.MaxSnapshotsSize {
		return fmt.Errorf("qcow2: snapshot table too big: %w", syscall.EFBIG)
	}
	cs := m.cs()
	var off int64
	if len(data) > 0 {
		var err error
		if off, err = m.allocClusters(ctx, (int64(len(data))+cs-1)/cs); err != nil {
			return err
		}
		if err := m.flushRefblocks2(ctx); err != nil {
			return err
		}
		if k := m.overlaps(off, int64(len(data)), 0); k != 0 {
			return m.corruptLocked(ctx, true, off, int64(len(data)), "Preventing invalid write on metadata (overlaps with %s)", k)
		}
		if err := m.writeMeta(ctx, data, off); err != nil {
			return err
		}
		if err := m.file.Flush(ctx); err != nil {
			return err
		}
	}
	// The count and the offset change in one write.
	var b [12]byte
	binary.BigEndian.PutUint32(b[0:], uint32(len(snaps)))
	binary.BigEndian.PutUint64(b[4:], uint64(off))
	if err := m.file.WriteAt(ctx, b[:], 60, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	oldOff, oldSize := int64(m.h.SnapshotsOffset), int64(len(qcow2fmt.MarshalSnapshots(m.snapshots)))
	m.h.NbSnapshots, m.h.SnapshotsOffset = uint32(len(snaps)), uint64(off)
	m.snapshots = snaps
	m.setRange(olSnapshotTable, olRange{off: off, end: off + int64(len(data))})
	if oldOff != 0 && oldSize > 0 {
		return m.freeNow(ctx, oldOff, oldSize)
	}
	return nil
}

// refreshOverlapLocked recomputes where the snapshot L1 tables and the
// active and inactive L2 tables are, for the overlap checks. metaMu is
// held.
func (m *image) refreshOverlapLocked() error {
	g := m.g
	var inactive []olRange
	for _, s := range m.snapshots {
		inactive = append(inactive, olRange{off: int64(s.L1TableOffset), end: int64(s.L1TableOffset) + 8*int64(s.L1Size)})
	}
	m.setRange(olInactiveL1, inactive...)
	clusters := map[int64]olFlags{}
	m.ovMu.RLock()
	for c, k := range m.ov.clusters {
		if k &^= olActiveL2 | olInactiveL2; k != 0 {
			clusters[c] = k
		}
	}
	m.ovMu.RUnlock()
	m.l1mu.RLock()
	for _, e := range m.l1 {
		if off := int64(e & qcow2fmt.L1OffsetMask); off != 0 {
			clusters[off>>g.ClusterBits] |= olActiveL2
		}
	}
	m.l1mu.RUnlock()
	if m.overlap&olInactiveL2 != 0 {
		for _, s := range m.snapshots {
			t, err := readTable(context.Background(), m.file, int64(s.L1TableOffset), int64(s.L1Size))
			if err != nil {
				return err
			}
			for _, e := range t {
				if off := int64(e & qcow2fmt.L1OffsetMask); off != 0 {
					clusters[off>>g.ClusterBits] |= olInactiveL2
				}
			}
		}
	}
	m.ovMu.Lock()
	m.ov.clusters = clusters
	m.ovMu.Unlock()
	return nil
}

// LoadSnapshot makes a read-only image show a snapshot's contents from
// now on (qcow2_snapshot_load_tmp, qemu-img convert -l): the snapshot is
// found by ID and name where both are given, else by the one given.
func (n *node) LoadSnapshot(ctx context.Context, id, name string) error {
	if err := n.check(); err != nil {
		return err
	}
	if !n.ro.Load() {
		return &causeError{"Device is not readonly", syscall.EINVAL}
	}
	m := n.image
	release, err := m.exclusive(ctx)
	if err != nil {
		return err
	}
	defer release()
	i := -1
	for j, s := range m.snapshots {
		if (id == "" || s.ID == id) && (name == "" || s.Name == name) && (id != "" || name != "") {
			i = j
			break
		}
	}
	if i < 0 {
		return &causeError{"Can't find snapshot", syscall.ENOENT}
	}
	s := m.snapshots[i]
	l1, err := readTable(ctx, m.file, int64(s.L1TableOffset), int64(s.L1Size))
	if err != nil {
		return &causeError{"Failed to read l1 table for snapshot", err}
	}
	m.l1mu.Lock()
	m.l1 = l1
	m.l1mu.Unlock()
	return nil
}

// discardClusters passes discards for freed clusters to the file
// (pass-discard-snapshot), merging neighbours; the refcounts are stable.
// Errors are ignored: a discard is a hint.
func (m *image) discardClusters(ctx context.Context, cs []int64) {
	slices.Sort(cs)
	size := m.cs()
	for i := 0; i < len(cs); {
		j := i + 1
		for j < len(cs) && cs[j] <= cs[j-1]+1 {
			j++
		}
		off, end := cs[i]*size, (cs[j-1]+1)*size
		if end > m.file.Size() {
			end = m.file.Size()
		}
		if end > off {
			_ = m.file.Discard(ctx, off, end-off)
		}
		i = j
	}
}

// causeError is an error whose text is QEMU's message alone (what
// qemu-img prints) and whose cause, an errno or an I/O error, is kept
// for errors.Is.
type causeError struct {
	msg   string
	cause error
}

func (e *causeError) Error() string { return e.msg }
func (e *causeError) Unwrap() error { return e.cause }
