package daemon

import (
	"context"
	"errors"
	"fmt"

	"blockd/daemon/job"
	"blockd/graph"
	"blockd/qmp"
)

// block-commit (QEMU's qmp_block_commit and block/commit.c): the data of
// the images from the top of the commit down to the image above the base
// is copied into the base, then the image above the top takes the base as
// its backing file and its header names it; the images in between leave
// the chain.

// commitChunk is COMMIT_BUFFER_SIZE: the most one step of the job
// examines and copies.
const commitChunk = 512 << 10

// commitArgs is block-commit's arguments.
type commitArgs struct {
	JobID          *string      `json:"job-id,omitempty"`
	Device         string       `json:"device"`
	BaseNode       *string      `json:"base-node,omitempty"`
	Base           *string      `json:"base,omitempty"`
	TopNode        *string      `json:"top-node,omitempty"`
	Top            *string      `json:"top,omitempty"`
	BackingFile    *string      `json:"backing-file,omitempty"`
	Speed          *int64       `json:"speed,omitempty"`
	OnError        *job.OnError `json:"on-error,omitempty"`
	FilterNodeName *string      `json:"filter-node-name,omitempty"`
	AutoFinalize   *bool        `json:"auto-finalize,omitempty"`
	AutoDismiss    *bool        `json:"auto-dismiss,omitempty"`
}

// commit is one commit job of an intermediate image.
type commit struct {
	g           *graph.Graph
	bs          *graph.BDS // the device: the root of the chain
	overlay     *graph.BDS // the node whose backing node is top
	top, base   *graph.BDS
	backingFile *string
	onErr       job.OnError

	// Set up before the job starts, released by clean.
	main      *graph.Child   // the job's edge to bs ("main node")
	inter     []*graph.Child // top and the nodes down to base ("intermediate node")
	baseJob   *graph.Child   // the job's hold on base ("base")
	baseW     *graph.Child   // the job's writer on base (QEMU's s->base)
	topR      *graph.Child   // the job's reader of top (QEMU's s->top)
	commitTop bool           // SetCommitTop is on for overlay
	baseRO    bool           // base was read-only: reopened read-write for the job
}

func (d *Daemon) registerCommit() {
	qmp.Handle(d.QMP, "block-commit", func(ctx context.Context, _ *qmp.Monitor, a *commitArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.blockCommit(a)
	})
}

// commitNodes resolves device, top and base as qmp_block_commit does, in
// its order and with its texts.
func commitNodes(g *graph.Graph, a *commitArgs) (bs, top, base *graph.BDS, err error) {
	// libvirt probes for block-commit with DeviceNotFound: the device is
	// looked up before anything else can fail.
	if bs = g.Lookup(a.Device); bs == nil {
		return nil, nil, nil, qmp.NewError(qmp.DeviceNotFound, "Device '%s' not found", a.Device)
	}
	if !bs.IsRoot() {
		return nil, nil, nil, errors.New("Need a root block node")
	}
	if err := bs.Busy(); err != nil {
		return nil, nil, nil, err
	}
	top = bs
	switch {
	case a.TopNode != nil && a.Top != nil:
		return nil, nil, nil, errors.New("'top-node' and 'top' are mutually exclusive")
	case a.TopNode != nil:
		if top, err = lookupNode(g, *a.TopNode); err != nil {
			return nil, nil, nil, err
		}
		if !inChain(bs, top) {
			return nil, nil, nil, fmt.Errorf("'%s' is not in this backing file chain", *a.TopNode)
		}
	case a.Top != nil:
		if bs.Filename() != *a.Top {
			top = findBackingImage(bs, *a.Top)
		}
	}
	if top == nil {
		return nil, nil, nil, fmt.Errorf("Top image file %s not found", *a.Top)
	}
	switch {
	case a.BaseNode != nil && a.Base != nil:
		return nil, nil, nil, errors.New("'base-node' and 'base' are mutually exclusive")
	case a.BaseNode != nil:
		if base, err = lookupNode(g, *a.BaseNode); err != nil {
			return nil, nil, nil, err
		}
		if !inChain(top, base) {
			return nil, nil, nil, fmt.Errorf("'%s' is not in this backing file chain", *a.BaseNode)
		}
	case a.Base != nil:
		if base = findBackingImage(top, *a.Base); base == nil {
			return nil, nil, nil, fmt.Errorf("Can't find '%s' in the backing chain", *a.Base)
		}
	default:
		base = top // bdrv_find_base: the bottom of the chain
		for b := top.Backing(); b != nil; b = b.Backing() {
			base = b
		}
	}
	// Op blockers from top down to base, base included.
	for b := top; b != nil; b = b.Backing() {
		if err := b.Busy(); err != nil {
			return nil, nil, nil, err
		}
		if b == base {
			break
		}
	}
	if top == base {
		return nil, nil, nil, errors.New("cannot commit an image into itself")
	}
	return bs, top, base, nil
}

// findOverlay is bdrv_find_overlay: the node of bs's chain whose backing
// node is top.
func findOverlay(bs, top *graph.BDS) *graph.BDS {
	for b := bs; b != nil; b = b.Backing() {
		if b.Backing() == top {
			return b
		}
	}
	return nil
}

// blockCommit checks the arguments in qmp_block_commit's order and starts
// the job.
func (d *Daemon) blockCommit(a *commitArgs) error {
	bs, top, base, err := commitNodes(d.Graph, a)
	if err != nil {
		return err
	}
	// Active commit is needed when someone writes the top, or when the
	// top is the device itself.
	if perm, _ := top.Perm(); perm&graph.PermWrite != 0 || top == bs {
		if a.BackingFile != nil {
			if top == bs {
				return errors.New("'backing-file' specified, but 'top' is the active layer")
			}
			return errors.New("'backing-file' specified, but 'top' has a writer on it")
		}
		if top == bs {
			return d.blockCommitActive(a, top, base)
		}
		return errors.New("block-commit: committing a top that has a writer but is not the active layer is not supported")
	}
	overlay := findOverlay(bs, top)
	if err := overlay.Busy(); err != nil {
		return err
	}
	if a.FilterNodeName != nil {
		return errors.New("block-commit: 'filter-node-name' is not supported: blockd commits without a commit_top filter node")
	}
	c := &commit{g: d.Graph, bs: bs, overlay: overlay, top: top, base: base,
		backingFile: a.BackingFile, onErr: job.OnErrorReport}
	if a.OnError != nil {
		c.onErr = *a.OnError
	}
	o := blockJobOptions(a.JobID, a.Speed, a.AutoFinalize, a.AutoDismiss)
	if job.ValidID(o.ID) {
		if err := c.attach(o.ID); err != nil {
			return err
		}
	}
	_, err = d.Jobs.StartBlock(&job.BlockDriver{
		Type:    "commit",
		Run:     c.run,
		Prepare: c.prepare,
		Abort:   func(*job.BlockJob) { c.endCommitTop() },
		Clean:   func(*job.BlockJob) { c.release() },
	}, o)
	if err != nil {
		c.release()
	}
	return err
}

// Permissions of the job's edges, as commit_start takes them: the
// intermediate nodes (top down to the node above base) are held and
// shared for writes but not for consistent reads, since their data moves
// into the base; the base is held and written by the job, which shares
// consistent reads and unchanged writes with others there.
const (
	commitInterShared = graph.PermWriteUnchanged | graph.PermWrite
	commitBaseShared  = graph.PermRead | graph.PermWriteUnchanged
)

// attach takes the job's edges and puts the overlay's backing edge out of
// the way of the job's permissions (QEMU's commit_top filter). On error
// nothing is held.
func (c *commit) attach(id string) (err error) {
	defer func() {
		if err != nil {
			c.release()
		}
	}()
	g := c.g
	if c.main, err = g.NewJobBackend(c.bs, "main node", "commit", id, 0, graph.PermAll); err != nil {
		return err
	}
	if err = g.SetCommitTop(c.overlay, true); err != nil {
		return err
	}
	c.commitTop = true
	for b := c.top; b != nil && b != c.base; b = b.Backing() {
		e, err := g.NewJobBackend(b, "intermediate node", "commit", id, 0, commitInterShared)
		if err != nil {
			return err
		}
		c.inter = append(c.inter, e)
	}
	if c.baseJob, err = g.NewJobBackend(c.base, "base", "commit", id, 0, graph.PermAll); err != nil {
		return err
	}
	if c.base.ReadOnly() {
		// As QEMU's commit_start: the base is writable for the job's
		// duration and read-only again in release (commit_clean).
		if err = g.Reopen(context.Background(), c.base, false); err != nil {
			return err
		}
		c.baseRO = true
	}
	perm := graph.PermRead | graph.PermWrite
	if c.base.Node().Size() < c.top.Node().Size() {
		perm |= graph.PermResize
	}
	if c.baseW, err = g.NewBackend(c.base.Name(), "", perm, commitBaseShared); err != nil {
		return err
	}
	c.topR, err = g.NewBackend(c.top.Name(), "", 0, graph.PermAll)
	return err
}

// endCommitTop gives the overlay's backing edge its permissions back
// (commit_abort removes the commit_top filter; prepare does it after the
// edge moved to the base).
func (c *commit) endCommitTop() {
	if c.commitTop && c.g.SetCommitTop(c.overlay, false) == nil {
		c.commitTop = false
	}
}

// release drops what the job holds (commit_clean); intermediate nodes
// nothing else holds close.
func (c *commit) release() {
	c.endCommitTop()
	for _, e := range []**graph.Child{&c.topR, &c.baseW, &c.baseJob} {
		if *e != nil {
			c.g.ReleaseBackend(*e)
			*e = nil
		}
	}
	if c.baseRO {
		// A failure leaves the base writable, as in QEMU.
		_ = c.g.Reopen(context.Background(), c.base, true)
		c.baseRO = false
	}
	for _, e := range c.inter {
		c.g.ReleaseBackend(e)
	}
	c.inter = nil
	if c.main != nil {
		c.g.ReleaseBackend(c.main)
		c.main = nil
	}
}

// run is commit_run: the base grows to the top's size if it is smaller,
// then in chunks of at most commitChunk every range allocated from the
// top down to the node above the base is copied into the base (zero
// clusters as zero writes that may unmap), with the rate limit, pause and
// cancel points and the error policy between chunks.
func (c *commit) run(ctx context.Context, b *job.BlockJob) error {
	size := c.topR.Size()
	b.ProgressSetRemaining(size)
	if c.baseW.Size() < size {
		if err := c.baseW.Truncate(ctx, size, graph.PreallocOff); err != nil {
			return err
		}
	}
	buf := make([]byte, commitChunk)
	var copied int64
	for off, n := int64(0), int64(0); off < size; off += n {
		if err := b.RateLimit(copied); err != nil {
			return nil // force-cancelled
		}
		copied = 0
		var err error
		var alloc bool
		n, alloc, err = c.iteration(ctx, off, min(commitChunk, size-off), buf)
		if err == nil {
			b.ProgressUpdate(n)
			if alloc {
				copied = n // only what was written counts for the rate limit
			}
			continue
		}
		var inSource bool
		if errors.As(err, new(sourceError)) {
			inSource = true
		}
		if b.ErrorAction(c.onErr, inSource, err) == job.ActionReport {
			return err
		}
		n = 0 // QEMU's commit retries the chunk, after the pause with stop
	}
	return nil
}

// sourceError marks an error met reading the chain (as opposed to
// writing the base), for BLOCK_JOB_ERROR's operation.
type sourceError struct{ error }

func (e sourceError) Unwrap() error { return e.error }

// iteration is commit_iteration for [off, off+n): it returns how many
// bytes from off it dealt with, and whether it wrote them to the base
// (copied or zeroed) rather than leaving them to it.
func (c *commit) iteration(ctx context.Context, off, n int64, buf []byte) (int64, bool, error) {
	alloc, zero, n, err := allocatedAbove(ctx, c.inter, off, n)
	if err != nil {
		return 0, false, sourceError{err}
	}
	switch {
	case !alloc:
	case zero:
		if err := c.baseW.WriteZeroes(ctx, off, n, graph.MayUnmap); err != nil {
			return 0, false, err
		}
	default:
		if err := c.topR.ReadAt(ctx, buf[:n], off); err != nil {
			return 0, false, sourceError{err}
		}
		if err := c.baseW.WriteAt(ctx, buf[:n], off, 0); err != nil {
			return 0, false, err
		}
	}
	return n, alloc, nil
}

// prepare is commit_prepare and bdrv_drop_intermediate: the job's writer
// on the base goes, the overlay takes the base as its backing node (the
// nodes between leave the chain: those opened from image headers close,
// named ones stay as the user added them), and the overlay's header names
// the base (backing-file, or the base's file name) with its format.
func (c *commit) prepare(*job.BlockJob) error {
	ctx := context.Background()
	if err := c.baseW.Flush(ctx); err != nil {
		return err
	}
	c.g.ReleaseBackend(c.baseW)
	c.baseW = nil
	if err := c.g.ReplaceBacking(ctx, c.overlay, c.base); err != nil {
		return err
	}
	c.endCommitTop()
	name := c.base.Filename()
	if c.backingFile != nil {
		name = *c.backingFile
	}
	bc, ok := c.overlay.Node().(graph.BackingFileChanger)
	if !ok {
		return errors.New("Operation not supported")
	}
	if err := bc.ChangeBackingFile(ctx, name, c.base.Driver().Name); err != nil {
		return fmt.Errorf("Could not change the backing file of '%s': %v", c.overlay.Name(), err)
	}
	return nil
}
