package qcow2

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// CheckReport is the result of Check, with the members of QEMU's
// BdrvCheckResult (qemu-img check reads them by name).
type CheckReport struct {
	CorruptionsFixed, LeaksFixed                                             int64
	CheckErrors, Corruptions, Leaks                                          int64
	ImageEndOffset                                                           int64
	TotalClusters, AllocatedClusters, FragmentedClusters, CompressedClusters int64
	// Messages describe the first problems found.
	Messages []string
}

// Check fixes.
const (
	FixLeaks  = 1 // lower refcounts that are too high
	FixErrors = 2 // also raise refcounts that are too low and fix COPIED flags
)

// Check compares the image's refcounts with the references its metadata
// implies (qcow2_co_check): every request is held off and the caches are
// written back first, so the file is checked as it stands. With fix, the
// problems it can repair are repaired; the caller checks again to see
// what remains, as qemu-img does.
func (n *node) Check(ctx context.Context, fix int) (*CheckReport, error) {
	if fix != 0 && n.ro.Load() {
		return nil, graph.ErrReadOnly
	}
	if n.broken.Load() && fix != 0 {
		return nil, errBroken
	}
	m := n.image
	st := m.lockStripes(0, int64(nStripes)<<m.g.ClusterBits, true)
	defer m.unlockStripes(st)
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if !m.ro.Load() && !m.broken.Load() {
		if err := m.writebackLocked(ctx, true); err != nil {
			return nil, err
		}
	}
	res, err := qcow2fmt.Check(graph.NewSectionIO(ctx, m.file, 0, -1), m.file.Size())
	if err != nil {
		return &CheckReport{CheckErrors: 1}, err
	}
	r := &CheckReport{
		Corruptions:        int64(res.Corruptions),
		Leaks:              int64(res.Leaks),
		ImageEndOffset:     res.ImageEnd,
		TotalClusters:      (m.size.Load() + m.cs() - 1) / m.cs(),
		AllocatedClusters:  res.Allocated,
		FragmentedClusters: res.Fragmented,
		CompressedClusters: res.Compressed,
		Messages:           res.Messages,
	}
	if fix == 0 || (r.Leaks == 0 && r.Corruptions == 0) {
		return r, nil
	}
	leaksOnly := fix&FixErrors == 0
	if leaksOnly && res.NeedRebuild {
		r.CheckErrors++
		r.Messages = append(r.Messages, "ERROR need to rebuild refcount structures")
		return r, fmt.Errorf("qcow2: the refcount structures need a rebuild (check -r all): %w", syscall.EIO)
	}
	if leaksOnly && r.Leaks == 0 {
		return r, nil
	}
	// The repair reads and writes tables directly: start from an empty,
	// clean L2 cache and leave one.
	m.l2.drop()
	movedReftable := !leaksOnly && m.reftablePastEnd()
	copied, err := m.repairCountLocked(ctx, leaksOnly)
	if err != nil {
		r.CheckErrors++
		return r, errors.Join(errors.New("qcow2: repair failed"), err)
	}
	m.l2.drop()
	r.LeaksFixed = r.Leaks
	r.Leaks = 0
	if !leaksOnly {
		// As QEMU: the refcounts are fixed first, then the COPIED flags
		// that still disagree with them; regions past the end of the
		// file stay (the check after the repair finds them again),
		// unless the refcount table was one of them and moved into the
		// file.
		r.CorruptionsFixed = r.Corruptions - int64(res.CopiedErrors) - int64(res.Beyond) + int64(copied)
		if movedReftable {
			r.CorruptionsFixed++
		}
		r.Corruptions = 0
	}
	return r, nil
}

// HostOffset maps guest range [off, off+n) to its place in the data file
// (the image file without an external one): the host offset of off, how
// many bytes from there are contiguous with one mapping, and ok false
// where there is no host offset (unallocated, compressed, encrypted: QEMU
// reports none for encrypted images either).
func (n *node) HostOffset(ctx context.Context, off, l int64) (int64, int64, bool, error) {
	if err := n.check(); err != nil {
		return 0, 0, false, err
	}
	if n.cipher != nil || l <= 0 || off < 0 || off >= n.Size() {
		return 0, 0, false, nil
	}
	st := n.lockStripes(off, l, false)
	defer n.unlockStripes(st)
	r, err := n.mapRun(ctx, off, min(l, n.Size()-off))
	if err != nil || !hasHost(r.typ) {
		return 0, 0, false, err
	}
	return r.host, r.n, true, nil
}
