package daemon

import (
	"context"
	"errors"

	"blockd/daemon/job"
	"blockd/graph"
)

// block-commit of the active layer (QEMU's commit_active_start): the
// mirror job with type "commit" and the base as its target. Its dirty
// bitmap starts with what the chain holds above the base (sync=top down
// to the base), it follows the guest's writes on the top, goes ready, and
// block-job-complete moves the top's exports and parents to the base
// (graph.Pivot); the top keeps its backing chain down to the base, as
// QEMU's bdrv_replace_node leaves it. A soft cancel of a ready job leaves
// the top in place. A read-only base is reopened read-write for the job
// and stays so unless the job fails or is force-cancelled.

// blockCommitActive starts the active commit of top, the device, into
// base; qmp_block_commit's checks have passed.
func (d *Daemon) blockCommitActive(a *commitArgs, top, base *graph.BDS) error {
	if a.FilterNodeName != nil {
		return errors.New("block-commit: 'filter-node-name' is not supported: blockd commits without a mirror_top filter node")
	}
	m := &mirror{g: d.Graph, src: top, target: base, base: base, jobType: "commit",
		onSrc: job.OnErrorReport, onTgt: job.OnErrorReport, gran: defaultGranularity(base)}
	if a.OnError != nil {
		m.onSrc, m.onTgt = *a.OnError, *a.OnError
	}
	m.setChunk(0)
	// Until prepare runs the job counts as failed: a base reopened for
	// it goes back to read-only when nothing was committed.
	m.aborted.Store(true)
	// Without job-id QEMU names the job after the device's BlockBackend,
	// which a node added with blockdev-add does not have: the ID is ''.
	o := blockJobOptions(a.JobID, a.Speed, a.AutoFinalize, a.AutoDismiss)
	return d.startMirror(m, o)
}

// attachCommit reopens a read-only base read-write (commit_active_start)
// and holds the nodes between the top and the base as mirror_start_job
// does for a target in the source's chain: nothing taken, consistent
// read unshared (their data moves into the base), writes shared so the
// job can write the base below them.
func (m *mirror) attachCommit(id string) error {
	if m.base.ReadOnly() {
		if err := m.g.Reopen(context.Background(), m.base, false); err != nil {
			return err
		}
		m.baseRO = true
	}
	// QEMU's mirror_top filter above a commit's top takes no consistent
	// read and shares writes down the chain: the top's backing edge
	// takes nothing here, as for the overlay of an intermediate commit.
	if err := m.g.SetCommitTop(m.src, true); err != nil {
		return err
	}
	m.commitTop = true
	for b := m.src.Backing(); b != nil && b != m.base; b = b.Backing() {
		e, err := m.g.NewJobBackend(b, "intermediate node", m.jobType, id, 0, commitInterShared)
		if err != nil {
			return err
		}
		m.inter = append(m.inter, e)
	}
	return nil
}

// releaseCommit drops the holds on the intermediate nodes and, when the
// job did not succeed, makes a base that was read-only read-only again
// (mirror_exit_common on abort).
func (m *mirror) releaseCommit() {
	for _, e := range m.inter {
		m.g.ReleaseBackend(e)
	}
	m.inter = nil
	if m.commitTop && m.g.SetCommitTop(m.src, false) == nil {
		m.commitTop = false
	}
	if m.baseRO && m.aborted.Load() {
		// A failure leaves the base writable, as in QEMU.
		_ = m.g.Reopen(context.Background(), m.base, true)
	}
	m.baseRO = false
}

// commitDirtyInit is mirror_dirty_init with a base: what the top and the
// nodes down to the one above the base allocate is dirty
// (bdrv_is_allocated_above down to base_overlay).
func (m *mirror) commitDirtyInit(ctx context.Context, b *job.BlockJob, size int64) error {
	layers := append([]*graph.Child{m.main}, m.inter...)
	for off := int64(0); off < size; {
		if b.IsCancelled() {
			return nil
		}
		b.PausePoint()
		alloc, _, n, err := allocatedAbove(ctx, layers, off, min(size-off, 1<<30))
		if err != nil {
			return err
		}
		if n <= 0 {
			return errors.New("block status returned no extent")
		}
		if alloc {
			m.dirty.Mark(off, n)
		}
		off += n
	}
	return nil
}
