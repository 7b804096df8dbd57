package graph

import (
	"context"
	"errors"
	"fmt"
)

// Reopener is implemented by nodes with work to do when they change
// between read-only and writable (QEMU's bdrv_reopen_prepare, _commit and
// _abort): the file driver reopens its descriptor, qcow2 writes its caches
// back and marks the image clean before it becomes read-only, and does
// what a writable open does (header update, repair of a dirty image)
// before it becomes writable. Nodes without it (raw, luks' data path)
// change with their permissions alone.
type Reopener interface {
	// PrepareReopen readies the node to be read-only (readOnly) or
	// writable, with no request in flight through the node. Becoming
	// read-only it is called parent first, while the node and its
	// children may still be written (qcow2 writes back through its file);
	// becoming writable it is called children first, once the node's
	// edges to its children hold write permission (the file is
	// read-write before qcow2 writes through it). On success exactly one
	// of commit and abort is called later (either may be nil): commit
	// makes the change final and cannot fail, abort undoes what prepare
	// did. On error the node is as it was.
	PrepareReopen(ctx context.Context, readOnly bool) (commit, abort func(), err error)
}

// Reopen makes b read-only or writable, as QEMU's
// bdrv_reopen_set_read_only: the requests in flight on b finish first
// (its gate is taken exclusively), the children b opened inline follow
// unless their own options set read-only (a backing file never does: it
// stays read-only), each node's driver prepares (Reopener), and the
// permissions of the edges below are recomputed: a node becoming
// read-only must have no user that writes it ("Block node is read-only"),
// and the file driver's image locks follow. On any failure every node is
// as it was.
func (g *Graph) Reopen(ctx context.Context, b *BDS, readOnly bool) error {
	b.gate.Lock()
	defer b.gate.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	return g.reopenLocked(ctx, b, readOnly)
}

// reopenLocked is Reopen with b's requests drained and g.mu held.
func (g *Graph) reopenLocked(ctx context.Context, b *BDS, readOnly bool) error {
	commit, _, err := g.reopenPrepare(ctx, b, readOnly)
	if err != nil {
		return err
	}
	commit()
	return nil
}

// reopenPrepare does the part of reopenLocked that can fail: the nodes'
// flags and permissions change and their drivers prepare. On success the
// caller calls exactly one of commit (the drivers' commits) and abort
// (every prepared driver aborted in reverse order, the flags and
// permissions as they were); on error every node is as it was. g.mu is
// held and b's requests are drained until then.
func (g *Graph) reopenPrepare(ctx context.Context, b *BDS, readOnly bool) (commit, abort func(), err error) {
	set := b.reopenSet(readOnly, nil)
	if len(set) == 0 {
		return func() {}, func() {}, nil
	}
	type prepared struct{ commit, abort func() }
	var done []prepared
	undo := func() {
		for i := len(done) - 1; i >= 0; i-- {
			if done[i].abort != nil {
				done[i].abort()
			}
		}
	}
	prepare := func(x *BDS) error {
		r, ok := x.node.(Reopener)
		if !ok {
			return nil
		}
		commit, abort, err := r.PrepareReopen(ctx, readOnly)
		if err != nil {
			return err
		}
		done = append(done, prepared{commit, abort})
		return nil
	}
	if readOnly {
		for _, x := range set {
			if err := prepare(x); err != nil {
				undo()
				return nil, nil, err
			}
		}
		if err := g.setReadOnlyFlags(set, true); err != nil {
			_ = g.setReadOnlyFlags(set, false)
			undo()
			return nil, nil, err
		}
		abort = func() {
			_ = g.setReadOnlyFlags(set, false)
			undo()
		}
	} else {
		if err := g.setReadOnlyFlags(set, false); err != nil {
			_ = g.setReadOnlyFlags(set, true)
			return nil, nil, err
		}
		for i := len(set) - 1; i >= 0; i-- {
			if err := prepare(set[i]); err != nil {
				undo()
				_ = g.setReadOnlyFlags(set, true)
				return nil, nil, err
			}
		}
		abort = func() {
			undo()
			_ = g.setReadOnlyFlags(set, true)
		}
	}
	commit = func() {
		for _, p := range done {
			if p.commit != nil {
				p.commit()
			}
		}
	}
	return commit, abort, nil
}

// reopenSet lists b and the nodes that follow it to readOnly, parents
// before their children: the children b opened inline, other than its
// backing file, whose options leave read-only unset, and theirs in turn.
// Nodes already as wanted are left out with what is below them. g.mu is
// held.
func (b *BDS) reopenSet(readOnly bool, set []*BDS) []*BDS {
	if b.readOnly == readOnly {
		return set
	}
	set = append(set, b)
	for _, c := range b.children {
		cb := c.n()
		if c.role&RoleCOW != 0 || cb.inheritsFrom != b || cb.opts == nil || cb.opts.ReadOnly != nil {
			continue
		}
		set = cb.reopenSet(readOnly, set)
	}
	return set
}

// setReadOnlyFlags marks every node of set read-only or writable and
// recomputes the permissions of the edges below them and the image locks
// that follow. It fails when a node becoming read-only still has a user
// that writes or resizes it; the caller then calls it again with the old
// value, which restores the permissions as they were. g.mu is held.
func (g *Graph) setReadOnlyFlags(set []*BDS, readOnly bool) error {
	for _, x := range set {
		x.readOnly = readOnly
	}
	var first error
	for _, x := range set {
		for _, c := range x.children {
			c.setPerm(c.effective())
			if c.perm&(PermWrite|PermResize) != 0 && c.n().readOnly {
				first = firstErr(first, errors.New("Block node is read-only"))
				continue
			}
			first = firstErr(first, g.refresh(c.n()))
		}
	}
	if first != nil || !readOnly {
		return first
	}
	for _, x := range set {
		for _, e := range x.edges() {
			if e.perm&(PermWrite|PermResize) != 0 {
				return fmt.Errorf("Block node is read-only")
			}
		}
	}
	return nil
}

// firstErr returns the first non-nil error of a and b.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}
