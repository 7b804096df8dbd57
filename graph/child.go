package graph

import (
	"errors"
	"fmt"
	"sync/atomic"
)

// NewBackend attaches a user from outside the graph (an export, a job, a
// tool) to the named node with the given permissions. user names it in
// permission conflicts; "" is QEMU's "an unnamed block device", which is
// what exports and QMP commands are there. Release it with ReleaseBackend.
func (g *Graph) NewBackend(nodeName, user string, perm, shared Perm) (*Child, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.byName[nodeName]
	if b == nil {
		return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", nodeName, nodeName)
	}
	c := &Child{name: "root", user: user, fixedPerm: perm, fixedShared: shared}
	c.target.Store(b)
	if err := g.attach(c); err != nil {
		return nil, err
	}
	b.users++
	return c, nil
}

// ReleaseBackend detaches a backend from its node.
func (g *Graph) ReleaseBackend(c *Child) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c.detached {
		return
	}
	if c.job == "" {
		c.n().users--
	}
	g.detach(c)
}

// SetChildSpec changes how c's parent uses the edge (a luks node updating
// its keyslots takes write on its file for the duration) and applies the
// permissions that follow. On error nothing changes.
func (g *Graph) SetChildSpec(c *Child, spec ChildSpec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c.detached || c.parent == nil {
		return ErrClosed
	}
	oldSpec, oldPerm, oldShared := c.spec, c.perm, c.shared
	c.spec = spec
	c.setPerm(c.effective())
	err := error(nil)
	if c.perm&(PermWrite|PermResize) != 0 && c.n().readOnly {
		err = errors.New("Block node is read-only")
	} else {
		err = g.refresh(c.n())
	}
	if err != nil {
		c.spec = oldSpec
		c.setPerm(oldPerm, oldShared)
		return err
	}
	return nil
}

// attach adds edge c to c.n()'s users, checking and applying permissions.
// g.mu is held.
func (g *Graph) attach(c *Child) error {
	b := c.n()
	c.setPerm(c.effective())
	if c.perm&(PermWrite|PermResize) != 0 && b.readOnly {
		return fmt.Errorf("Block node is read-only")
	}
	if c.parent != nil {
		b.parents = append(b.parents, c)
	} else {
		b.backends = append(b.backends, c)
	}
	if err := g.refresh(b); err != nil {
		g.removeEdge(c)
		_ = g.refresh(b)
		return err
	}
	b.refs++
	return nil
}

// detach removes edge c and drops the reference it held. g.mu is held.
func (g *Graph) detach(c *Child) {
	if c.detached {
		return
	}
	c.detached = true
	g.removeEdge(c)
	_ = g.refresh(c.n())
	g.unref(c.n())
}

func (g *Graph) removeEdge(c *Child) {
	b := c.n()
	list := &b.parents
	if c.parent == nil {
		list = &b.backends
	}
	for i, x := range *list {
		if x == c {
			*list = append((*list)[:i], (*list)[i+1:]...)
			break
		}
	}
}

func (b *BDS) edges() []*Child {
	return append(append([]*Child(nil), b.parents...), b.backends...)
}

// refresh recomputes the cumulative permissions of b from its edges, checks
// them for conflicts, applies them (image locks) and propagates them through
// passthrough children. On error nothing is changed. g.mu is held.
func (g *Graph) refresh(b *BDS) error {
	edges := b.edges()
	for _, a := range edges {
		for _, x := range edges {
			if a == x {
				continue
			}
			if bad := a.perm &^ x.shared; bad != 0 {
				return fmt.Errorf("Permission conflict on node '%s': permissions '%s' are both required by %s and unshared by %s.", b.name, bad, a.desc(), x.desc())
			}
		}
	}
	perm, shared := Perm(0), PermAll
	for _, e := range edges {
		perm |= e.perm
		shared &= e.shared
	}
	if b.opts != nil && b.opts.ForceShare != nil && *b.opts.ForceShare {
		shared = PermAll
	}
	if perm == b.perm && shared == b.shared {
		return nil
	}
	if ps, ok := b.node.(PermSetter); ok && b.node != nil {
		if err := ps.SetPerm(perm, shared); err != nil {
			return err
		}
	}
	oldPerm, oldShared := b.perm, b.shared
	b.perm, b.shared = perm, shared
	for _, c := range b.children {
		op, os := c.perm, c.shared
		c.setPerm(c.effective())
		if c.perm&(PermWrite|PermResize) != 0 && c.n().readOnly {
			c.setPerm(op, os)
			b.perm, b.shared = oldPerm, oldShared
			if ps, ok := b.node.(PermSetter); ok {
				_ = ps.SetPerm(oldPerm, oldShared)
			}
			return fmt.Errorf("Block node is read-only")
		}
		if err := g.refresh(c.n()); err != nil {
			c.setPerm(op, os)
			b.perm, b.shared = oldPerm, oldShared
			if ps, ok := b.node.(PermSetter); ok {
				_ = ps.SetPerm(oldPerm, oldShared)
			}
			return err
		}
	}
	return nil
}

// Child is an edge from a parent node (or an outside user) to a node. All
// I/O through a Child passes the graph's validation layer: range checks,
// permission checks and alignment.
type Child struct {
	name   string
	user   string // backend user description
	job    string // the job type of a block job's edge (NewJobBackend)
	role   Role
	parent *BDS
	// target is the node the edge points to. It changes only under g.mu
	// (ReplaceNode); the I/O path loads it once per request.
	target atomic.Pointer[BDS]

	spec ChildSpec

	// protected by g.mu
	fixedPerm, fixedShared Perm // backends only
	perm, shared           Perm // set with setPerm
	detached               bool
	passive                bool // takes nothing, shares everything (SetCommitTop)

	// ioPerm is perm for the I/O path, which checks it without g.mu
	// while permissions may change (a luks node taking write on its file
	// for a keyslot update while its users write).
	ioPerm atomic.Uint32
}

// n returns the node the edge points to.
func (c *Child) n() *BDS { return c.target.Load() }

// setPerm sets the edge's permissions. g.mu is held.
func (c *Child) setPerm(perm, shared Perm) {
	c.perm, c.shared = perm, shared
	c.ioPerm.Store(uint32(perm))
}

func (c *Child) effective() (Perm, Perm) {
	if c.passive {
		return 0, PermAll // SetCommitTop
	}
	if c.parent != nil {
		return childPerm(c.spec, !c.parent.readOnly, c.parent.perm, c.parent.shared)
	}
	return c.fixedPerm, c.fixedShared
}

// desc names the edge's user in QEMU's words (bdrv_child_user_desc plus
// the edge): "node 'q' (uses node 'f' as 'file' child)", "an unnamed block
// device (uses node 'f' as 'root' child)".
func (c *Child) desc() string {
	who := "an unnamed block device"
	if c.parent != nil {
		who = fmt.Sprintf("node '%s'", c.parent.name)
	} else if c.user != "" {
		who = c.user
	}
	return fmt.Sprintf("%s (uses node '%s' as '%s' child)", who, c.n().name, c.name)
}

// Name returns the child's role name ("file", "header"...).
func (c *Child) Name() string { return c.name }

// BDS returns the node the edge points to.
func (c *Child) BDS() *BDS { return c.n() }
