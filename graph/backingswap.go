package graph

import (
	"context"
	"errors"
	"fmt"
)

// BackingReplacer is implemented by format nodes whose backing child can
// change while the node is in use: the end of a stream job, QEMU's
// bdrv_set_backing_hd on a live node.
type BackingReplacer interface {
	// ReplaceBacking makes c the node's backing child; nil leaves it
	// without one. No request is in flight on the node, and those that
	// come later see c.
	ReplaceBacking(c *Child)
}

// Populator is implemented by format nodes with a backing file that can
// copy data up from it (QEMU's copy-on-read as the stream job uses it).
type Populator interface {
	// Populate reads every part of [off, off+n) that is still unallocated
	// in the node from its backing chain and writes it to the node, under
	// the locks the node's writes take, so that a write to the range,
	// before or during the copy, is never overwritten. Parts the node
	// already allocates are left alone.
	Populate(ctx context.Context, off, n int64) error
}

// Populate copies [off, off+n) up from the node's backing chain where the
// node leaves it unallocated (Populator). The edge needs write or
// write-unchanged permission; the range is widened to the node's
// alignment (copying up more of what the chain holds changes no data). It
// returns ErrNotSupported for nodes that cannot copy up.
func (c *Child) Populate(ctx context.Context, off, n int64) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if err := c.check(b, "populate", off, n); err != nil {
		return err
	}
	if Perm(c.ioPerm.Load())&(PermWrite|PermWriteUnchanged) == 0 {
		return &OpError{Op: "populate", Node: b.name, Off: off, Len: n, Err: ErrReadOnly}
	}
	p, ok := b.node.(Populator)
	if !ok {
		return &OpError{Op: "populate", Node: b.name, Off: off, Len: n, Err: ErrNotSupported}
	}
	a := b.limits.Align
	start := off &^ (a - 1)
	end := min((off+n+a-1)&^(a-1), b.node.Size())
	if a > 1 {
		b.rmw.RLock() // as an aligned write
		defer b.rmw.RUnlock()
	}
	return c.wrap(b, "populate", off, n, c.chunks(b, start, end-start, func(o, l int64) error {
		return p.Populate(ctx, o, l)
	}))
}

// ReplaceBacking makes base the backing node of top, or leaves top
// without one if base is nil, as QEMU's bdrv_set_backing_hd at the end of
// a stream job: the requests in flight on top finish first (its gate is
// taken exclusively, as Snapshot does), the backing edge moves from the
// old backing node to base (or goes), and the old backing node loses that
// reference: nodes opened for the chain from image headers close once
// nothing else holds them, named nodes stay as the user added them. The
// image header is not changed (BackingFileChanger does that). On error
// nothing has changed.
func (g *Graph) ReplaceBacking(ctx context.Context, top, base *BDS) error {
	br, ok := top.node.(BackingReplacer)
	if !ok {
		return fmt.Errorf("Node '%s' does not support changing its backing file at runtime", top.name)
	}
	top.gate.Lock()
	defer top.gate.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if top.closed {
		return ErrClosed
	}
	var c *Child
	at := -1
	for i, x := range top.children {
		if x.role&RoleCOW != 0 {
			c, at = x, i
			break
		}
	}
	if c == nil {
		if base == nil {
			return nil
		}
		return fmt.Errorf("Node '%s' has no backing file", top.name)
	}
	old := c.n()
	if old == base {
		return nil
	}
	if base == nil {
		br.ReplaceBacking(nil)
		top.children = append(top.children[:at:at], top.children[at+1:]...)
		g.detach(c)
		return nil
	}
	if base.closed {
		return ErrClosed
	}
	if base == top || top.below(base) {
		return fmt.Errorf("Making '%s' a backing file of '%s' would create a cycle", base.name, top.name)
	}
	g.removeEdge(c)
	c.target.Store(base)
	g.addEdge(c)
	err := g.refresh(base)
	if err == nil && c.perm&(PermWrite|PermResize) != 0 && base.readOnly {
		err = errors.New("Block node is read-only")
	}
	if err != nil {
		g.removeEdge(c)
		c.target.Store(old)
		g.addEdge(c)
		_ = g.refresh(base)
		return err
	}
	base.refs++
	br.ReplaceBacking(c)
	_ = g.refresh(old)
	g.unref(old)
	return nil
}
