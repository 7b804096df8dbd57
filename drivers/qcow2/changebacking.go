package qcow2

import (
	"context"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

var (
	_ graph.BackingFileChanger = (*node)(nil)
	_ graph.MakeEmptier        = (*node)(nil)
)

// ChangeBackingFile implements graph.BackingFileChanger as QEMU's
// qcow2_change_backing_file: the caches are written back and flushed
// first, then the backing format extension, the name after the extensions
// and the header fields that locate it are rebuilt in a copy of the
// header, and the whole header cluster is written with one write, then
// flushed. A crash therefore leaves the old or the new header
// (a torn cluster write aside, which the file below would have to cause),
// never a name pointing past a changed extension area. The node's backing
// child stays as it is.
func (n *node) ChangeBackingFile(ctx context.Context, name, format string) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	switch {
	case name == "" && format != "":
		return fmt.Errorf("qcow2: a backing format needs a backing file: %w", graph.ErrBackingName)
	case len(name) > qcow2fmt.MaxBackingFileName:
		return fmt.Errorf("qcow2: backing file name longer than %d bytes: %w", qcow2fmt.MaxBackingFileName, graph.ErrBackingName)
	case len(format) >= 16:
		// The extension reader refuses 16 bytes and more.
		return fmt.Errorf("qcow2: backing format name longer than 15 bytes: %w", graph.ErrBackingName)
	}
	m := n.image
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	if name != "" && m.dataFileRaw {
		// The raw data file alone would no longer show the contents.
		return fmt.Errorf("qcow2: an image with a raw external data file cannot have a backing file: %w", graph.ErrBackingName)
	}
	h := m.h.Clone()
	h.BackingFile, h.BackingFormat = name, format
	buf, err := h.Marshal(true)
	if err != nil {
		if _, cur := m.h.Clone().Marshal(true); cur == nil {
			// Only the new name can have made it fail: it does not fit.
			return fmt.Errorf("qcow2: %v: %w", err, graph.ErrNoSpace)
		}
		return err
	}
	// Everything the new header relies on is stable before it is written:
	// the data a stream or commit copied in and the L2 tables that map it
	// (held in the write-back cache until now). Otherwise a crash right
	// after a stream could leave a header without a backing file over
	// tables that do not map the copy yet, and the image would read
	// zeroes where the backing file's data was (QEMU 7.2 has this hole).
	if err := m.writebackLocked(ctx, true); err != nil {
		return err
	}
	// One write of the header cluster: the only write of the change itself.
	if err := m.file.WriteAt(ctx, buf, 0, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	m.h = h
	n.backName = ""
	if name != "" {
		if full, err := resolveBacking(n.file, name); err == nil {
			n.backName = full
		}
	}
	if n.explicitBacking {
		n.headerBacking = name
	}
	return nil
}

// MakeEmpty implements graph.MakeEmptier with QEMU's general way of
// qcow2_make_empty: every cluster of the active L2 tables is discarded
// completely (the entries become unallocated, not zero), so the image
// reads from its backing file everywhere. QEMU rebuilds small version 3
// images without snapshots from scratch instead, which also gives the file
// back; the contents are the same.
func (n *node) MakeEmpty(ctx context.Context) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	m := n.image
	st := m.lockStripes(0, int64(nStripes)<<m.g.ClusterBits, true)
	defer m.unlockStripes(st)
	if size := m.size.Load(); size > 0 {
		if err := m.changeClusters(ctx, 0, size, opFullDiscard); err != nil {
			return err
		}
	}
	return m.flush(ctx)
}
