package qcow2

import (
	"context"
	"errors"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

var (
	_ graph.BackingSetter = (*node)(nil)
	_ graph.Reopener      = (*node)(nil)
)

// SetBacking implements graph.BackingSetter: the overlay of an external
// snapshot, opened with "backing": null, takes its backing node. The
// header keeps the backing file name it was created with.
func (n *node) SetBacking(c *graph.Child) {
	n.backing = c
	n.noBacking = false
	n.explicitBacking = true
	n.headerBacking = n.h.BackingFile
}

// PrepareReopen implements graph.Reopener, as qcow2_reopen_prepare does.
// Becoming read-only, the caches are written back and the dirty bit of
// lazy refcounts cleared while the file is still writable; the node
// refuses writes once committed. Becoming writable (called once the file
// child is writable), the image must be one a writable open accepts (not
// marked corrupt, its tables inside the file, opened with its key and
// data file), and what a writable open does that a read-only one skipped
// is done now: the header update, bitmaps marked in use, the repair of a
// dirty image; an abort writes back and marks the image clean again. No
// request is in flight.
func (n *node) PrepareReopen(ctx context.Context, readOnly bool) (commit, abort func(), err error) {
	if readOnly {
		if n.ro.Load() || n.noIO != nil || n.broken.Load() {
			return func() { n.ro.Store(true) }, nil, nil
		}
		n.metaMu.Lock()
		defer n.metaMu.Unlock()
		if err := n.writebackLocked(ctx, true); err != nil {
			return nil, nil, err
		}
		if n.dirtyMarked {
			if err := n.markCleanLocked(ctx); err != nil {
				return nil, nil, err
			}
		}
		return func() { n.ro.Store(true) }, nil, nil
	}
	if !n.ro.Load() {
		return nil, nil, nil
	}
	if err := n.check(); err != nil {
		return nil, nil, err
	}
	n.metaMu.Lock()
	corrupt := n.h.IncompatibleFeatures&qcow2fmt.IncompatCorrupt != 0
	n.metaMu.Unlock()
	if corrupt {
		return nil, nil, errors.New("qcow2: Image is corrupt; cannot be opened read/write")
	}
	if _, err := qcow2fmt.ParseWith(graph.NewSectionIO(ctx, n.file, 0, -1), n.file.Size(), qcow2fmt.ParseOptions{}); err != nil {
		return nil, nil, err
	}
	n.ro.Store(false)
	if err := n.makeWritable(ctx, false); err != nil {
		n.ro.Store(true)
		return nil, nil, err
	}
	return nil, func() {
		// Undone while the file is still writable: leave the image
		// clean on disk, as a read-only node must.
		n.metaMu.Lock()
		if n.writebackLocked(ctx, true) == nil && n.dirtyMarked {
			_ = n.markCleanLocked(ctx)
		}
		n.metaMu.Unlock()
		n.ro.Store(true)
	}, nil
}
