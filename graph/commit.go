package graph

import (
	"errors"
)

// What the commit job needs from the graph besides block-job edges and
// ReplaceBacking: QEMU's root-node check, a node's cumulative permissions
// (active commit is needed when someone writes the top), and the effect
// of the commit_top filter QEMU inserts above the top of the commit.

// IsRoot reports whether no other node and no block job holds b (QEMU's
// bdrv_is_root_node: only BlockBackends, here exports and other users
// from outside the graph, may point to a root node).
func (b *BDS) IsRoot() bool {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	if len(b.parents) > 0 {
		return false
	}
	for _, c := range b.backends {
		if c.job != "" {
			return false
		}
	}
	return true
}

// Perm returns the permissions b's users hold and those they all share.
func (b *BDS) Perm() (perm, shared Perm) {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.perm, b.shared
}

// SetCommitTop makes the backing edge of overlay take no permission and
// share all of them (on), or take what its role asks again (off). A
// commit job sets it on the node above the top of the commit, as QEMU
// inserts its commit_top filter there: the nodes of the chain below are
// no longer read consistently by anyone (the job unshares consistent read
// on the intermediate nodes, whose data it moves into the base) and share
// writes, so the job can write the base. Reads through the edge go on as
// before; permissions are not checked for them. The flag stays with the
// edge when ReplaceBacking moves it. On error nothing has changed.
func (g *Graph) SetCommitTop(overlay *BDS, on bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if overlay.closed {
		return ErrClosed
	}
	var c *Child
	for _, x := range overlay.children {
		if x.role&RoleCOW != 0 {
			c = x
			break
		}
	}
	if c == nil {
		return errors.New("Node '" + overlay.name + "' has no backing file")
	}
	if c.passive == on {
		return nil
	}
	oldPerm, oldShared := c.perm, c.shared
	c.passive = on
	c.setPerm(c.effective())
	err := error(nil)
	if c.perm&(PermWrite|PermResize) != 0 && c.n().readOnly {
		err = errors.New("Block node is read-only")
	} else {
		err = g.refresh(c.n())
	}
	if err != nil {
		c.passive = !on
		c.setPerm(oldPerm, oldShared)
		_ = g.refresh(c.n())
		return err
	}
	return nil
}
