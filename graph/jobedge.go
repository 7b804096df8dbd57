package graph

import (
	"fmt"
)

// Block jobs hold the nodes they work on with edges of their own (QEMU's
// block_job_add_bdrv): the edge takes and shares what the job needs, and
// the node is busy for other jobs and for blockdev-del while the edge
// exists. Such edges do not count as users of the node ("Node x is in
// use"); they make it busy instead.

// NewJobBackend attaches the block job jobID of type jobType to b with an
// edge named name ("active node", "intermediate node"), taking perm and
// sharing shared. Permission conflicts name the job as QEMU does ("stream
// job 'j' (uses node 'x' as 'intermediate node' child)"). Release the
// edge with ReleaseBackend.
func (g *Graph) NewJobBackend(b *BDS, name, jobType, jobID string, perm, shared Perm) (*Child, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	c := &Child{name: name, user: fmt.Sprintf("%s job '%s'", jobType, jobID), job: jobType,
		fixedPerm: perm, fixedShared: shared}
	c.target.Store(b)
	if err := g.attach(c); err != nil {
		return nil, err
	}
	return c, nil
}

// Busy returns QEMU's op-blocker error for a node a block job holds
// ("Node 'x' is busy: block device is in use by block job: stream"), or
// nil.
func (b *BDS) Busy() error {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.busyLocked()
}

// busyLocked is Busy with g.mu held.
func (b *BDS) busyLocked() error {
	for _, c := range b.backends {
		if c.job != "" {
			return fmt.Errorf("Node '%s' is busy: block device is in use by block job: %s", b.name, c.job)
		}
	}
	return nil
}

// Backing returns the node's backing node (its COW child), or nil.
func (b *BDS) Backing() *BDS {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.backing()
}
