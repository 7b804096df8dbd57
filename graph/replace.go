package graph

import (
	"context"
	"errors"
	"fmt"
)

// BackingSetter is implemented by format nodes whose backing child can be
// attached after open: the overlay of an external snapshot, opened with
// "backing": null (QEMU's drivers with supports_backing).
type BackingSetter interface {
	// SetBacking makes c the node's backing child. The node has no
	// backing child and no users when it is called; c is attached.
	SetBacking(c *Child)
}

// Snapshot puts overlay on top of node, as QEMU's blockdev-snapshot does
// (external_snapshot_action, bdrv_append): the requests in flight on node
// finish (a drain), node is flushed, overlay takes it as its backing child,
// every parent of node and every user from outside the graph (NBD exports)
// moves to overlay, and node becomes read-only. Overlay reads what it does
// not hold from node, so a reader sees the same data across the switch.
// On error nothing has changed.
func (g *Graph) Snapshot(ctx context.Context, nodeName, overlayName string) error {
	g.mu.Lock()
	old := g.byName[nodeName]
	g.mu.Unlock()
	if old == nil {
		return fmt.Errorf("Cannot find device='%s' nor node-name='%s'", nodeName, nodeName)
	}
	old.gate.Lock()
	defer old.gate.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.byName[nodeName] != old {
		return fmt.Errorf("Block node of device '%s' unexpectedly changed", nodeName)
	}
	if err := old.busyLocked(); err != nil {
		return err // QEMU's op blocker for external snapshots
	}
	if !old.readOnly {
		if err := old.node.Flush(ctx); err != nil {
			return fmt.Errorf("Write to node '%s' failed: %v", nodeName, err)
		}
	}
	ov := g.byName[overlayName]
	if ov == nil {
		return fmt.Errorf("Cannot find device='%s' nor node-name='%s'", overlayName, overlayName)
	}
	if ov.perm&PermRead != 0 {
		return errors.New("The overlay is already in use")
	}
	for _, c := range ov.children {
		if c.role&RoleCOW != 0 {
			return errors.New("The overlay already has a backing image")
		}
	}
	bs, ok := ov.node.(BackingSetter)
	if !ok {
		return errors.New("The overlay does not support backing images")
	}
	if ov == old || old.below(ov) {
		return fmt.Errorf("Making '%s' a backing file of '%s' would create a cycle", nodeName, overlayName)
	}
	// Requests reach overlay only once it is complete: none can be in
	// flight (it has no users), and new ones wait for this.
	if !ov.gate.TryLock() {
		return errors.New("The overlay is already in use")
	}
	defer ov.gate.Unlock()
	if err := g.moveEdges(old, ov); err != nil {
		return err
	}
	old.refs++ // the backing edge below
	back := &Child{name: "backing", role: RoleCOW, parent: ov, spec: ChildSpec{Role: RoleCOW}}
	back.target.Store(old)
	back.setPerm(back.effective())
	old.parents = append(old.parents, back)
	ov.children = append(ov.children, back)
	_ = g.refresh(old)
	bs.SetBacking(back)
	// QEMU reopens the old node read-only once it is a backing file
	// (external_snapshot_commit) and ignores a failure to.
	_ = g.reopenLocked(ctx, old, true)
	return nil
}

// moveEdges points every edge to from (parents and outside users) at to,
// with the permissions that follow. On error nothing has changed. g.mu is
// held and from's requests are drained.
func (g *Graph) moveEdges(from, to *BDS) error {
	return g.moveEdgeList(from, to, from.edges())
}

// moveEdgeList is moveEdges for the edges in moved only.
func (g *Graph) moveEdgeList(from, to *BDS, moved []*Child) error {
	for _, c := range moved {
		g.removeEdge(c)
		c.target.Store(to)
		g.addEdge(c)
	}
	err := error(nil)
	for _, c := range moved {
		if c.perm&(PermWrite|PermResize) != 0 && to.readOnly {
			err = errors.New("Block node is read-only")
			break
		}
	}
	if err == nil {
		err = g.refresh(to)
	}
	if err != nil {
		for _, c := range moved {
			g.removeEdge(c)
			c.target.Store(from)
			g.addEdge(c)
		}
		_ = g.refresh(to)
		return err
	}
	_ = g.refresh(from)
	for _, c := range moved {
		from.refs--
		to.refs++
		if c.parent == nil {
			from.users--
			to.users++
		}
	}
	return nil
}

// addEdge adds c to the parent or backend list of the node it points to.
// g.mu is held.
func (g *Graph) addEdge(c *Child) {
	b := c.n()
	if c.parent != nil {
		b.parents = append(b.parents, c)
	} else {
		b.backends = append(b.backends, c)
	}
}

// below reports whether b is a parent, or a parent's parent, of x: making
// x a child of b's descendants would close a cycle. g.mu is held.
func (b *BDS) below(x *BDS) bool {
	for _, c := range b.parents {
		if c.parent == x || c.parent.below(x) {
			return true
		}
	}
	return false
}
