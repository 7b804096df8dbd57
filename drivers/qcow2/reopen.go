package qcow2

import (
	"context"

	"blockd/graph"
)

var (
	_ graph.BackingSetter    = (*node)(nil)
	_ graph.ReadOnlyReopener = (*node)(nil)
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

// ReopenReadOnly implements graph.ReadOnlyReopener: before the node
// becomes read-only (an external snapshot's old top layer) the caches are
// written back and the dirty bit of lazy refcounts cleared, as
// qcow2_reopen_prepare does; no request is in flight.
func (n *node) ReopenReadOnly(ctx context.Context) error {
	if n.ro || n.noIO != nil {
		return nil
	}
	n.metaMu.Lock()
	defer n.metaMu.Unlock()
	if err := n.writebackLocked(ctx, true); err != nil {
		return err
	}
	if n.dirtyMarked {
		return n.markCleanLocked(ctx)
	}
	return nil
}
