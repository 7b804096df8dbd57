package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"blockd/daemon/job"
	"blockd/graph"
	"blockd/qmp"
)

// block-stream (QEMU's qmp_block_stream and block/stream.c): the top node
// copies up, chunk by chunk, what it reads from the intermediate images of
// its backing chain, then takes the base (or nothing) as its backing file
// and its image header names it.

// streamChunk is STREAM_CHUNK: the most one step of the job examines and
// copies.
const streamChunk = 512 << 10

// streamArgs is block-stream's arguments.
type streamArgs struct {
	JobID          *string      `json:"job-id,omitempty"`
	Device         string       `json:"device"`
	Base           *string      `json:"base,omitempty"`
	BaseNode       *string      `json:"base-node,omitempty"`
	BackingFile    *string      `json:"backing-file,omitempty"`
	Bottom         *string      `json:"bottom,omitempty"`
	Speed          *int64       `json:"speed,omitempty"`
	OnError        *job.OnError `json:"on-error,omitempty"`
	FilterNodeName *string      `json:"filter-node-name,omitempty"`
	AutoFinalize   *bool        `json:"auto-finalize,omitempty"`
	AutoDismiss    *bool        `json:"auto-dismiss,omitempty"`
}

// stream is one stream job.
type stream struct {
	g           *graph.Graph
	top         *graph.BDS
	base        *graph.BDS // the new backing node; nil: none
	backingFile *string
	onErr       job.OnError

	// Set up before the job starts, released by clean.
	active *graph.Child   // the job's edge to top ("active node")
	inter  []*graph.Child // edges to the nodes between top and base ("intermediate node")
}

func (d *Daemon) registerStream() {
	qmp.Handle(d.QMP, "block-stream", func(ctx context.Context, _ *qmp.Monitor, a *streamArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.blockStream(a)
	})
}

func lookupNode(g *graph.Graph, name string) (*graph.BDS, error) {
	b := g.Lookup(name)
	if b == nil {
		return nil, fmt.Errorf("Cannot find device='' nor node-name='%s'", name)
	}
	return b, nil
}

// inChain reports whether x is top or below it in its backing chain
// (bdrv_chain_contains).
func inChain(top, x *graph.BDS) bool {
	for b := top; b != nil; b = b.Backing() {
		if b == x {
			return true
		}
	}
	return false
}

// findBackingImage is bdrv_find_backing_image: the node below top whose
// file name is name, taken relative to the directory of the image that
// names it when it is not absolute.
func findBackingImage(top *graph.BDS, name string) *graph.BDS {
	for b := top; b != nil; {
		bk := b.Backing()
		if bk == nil {
			return nil
		}
		want := name
		if !filepath.IsAbs(name) {
			want = filepath.Join(filepath.Dir(b.Filename()), name)
		}
		if f := bk.Filename(); f == name || filepath.Clean(f) == filepath.Clean(want) {
			return bk
		}
		b = bk
	}
	return nil
}

// blockStream checks the arguments in qmp_block_stream's order and starts
// the job.
func (d *Daemon) blockStream(a *streamArgs) error {
	switch {
	case a.Base != nil && a.BaseNode != nil:
		return errors.New("'base' and 'base-node' cannot be specified at the same time")
	case a.Base != nil && a.Bottom != nil:
		return errors.New("'base' and 'bottom' cannot be specified at the same time")
	case a.Bottom != nil && a.BaseNode != nil:
		return errors.New("'bottom' and 'base-node' cannot be specified at the same time")
	}
	g := d.Graph
	top := g.Lookup(a.Device)
	if top == nil {
		return fmt.Errorf("Cannot find device='%s' nor node-name='%s'", a.Device, a.Device)
	}
	var base, bottom *graph.BDS
	var err error
	if a.Base != nil {
		if base = findBackingImage(top, *a.Base); base == nil {
			return fmt.Errorf("Can't find '%s' in the backing chain", *a.Base)
		}
	}
	if a.BaseNode != nil {
		if base, err = lookupNode(g, *a.BaseNode); err != nil {
			return err
		}
		if top == base || !inChain(top, base) {
			return fmt.Errorf("Node '%s' is not a backing image of '%s'", *a.BaseNode, a.Device)
		}
	}
	if a.Bottom != nil {
		if bottom, err = lookupNode(g, *a.Bottom); err != nil {
			return err
		}
		if !inChain(top, bottom) {
			return fmt.Errorf("Node '%s' is not in a chain starting from '%s'", *a.Bottom, a.Device)
		}
		base = bottom.Backing()
	}
	// Op blockers on the chain from top down to base.
	for b := top; b != nil && b != base; b = b.Backing() {
		if err := b.Busy(); err != nil {
			return err
		}
	}
	if a.Base == nil && a.BaseNode == nil && a.Bottom == nil && a.BackingFile != nil {
		return errors.New("backing file specified, but streaming the entire chain")
	}
	if a.FilterNodeName != nil {
		return errors.New("block-stream: 'filter-node-name' is not supported: blockd streams without a copy-on-read filter node")
	}
	s := &stream{g: g, top: top, base: base, backingFile: a.BackingFile, onErr: job.OnErrorReport}
	if a.OnError != nil {
		s.onErr = *a.OnError
	}
	o := blockJobOptions(a.JobID, a.Speed, a.AutoFinalize, a.AutoDismiss)
	if job.ValidID(o.ID) {
		// block_job_add_bdrv: the job's edges; a permission conflict
		// fails the command.
		if err := s.attach(o.ID); err != nil {
			return err
		}
	}
	_, err = d.Jobs.StartBlock(&job.BlockDriver{
		Type:    "stream",
		Run:     s.run,
		Prepare: s.prepare,
		Clean:   func(*job.BlockJob) { s.release() },
	}, o)
	if err != nil {
		s.release()
	}
	return err
}

// Permissions of the job's edges, as stream_start takes them: the top is
// read and copied up to (write-unchanged) and shares writes with its
// other users but not resize; the intermediate nodes are only held, and
// must not be written or resized by anyone while the job reads them.
const (
	streamShared      = graph.PermRead | graph.PermWriteUnchanged
	streamTopPerm     = graph.PermRead | graph.PermWriteUnchanged
	streamTopShared   = streamShared | graph.PermWrite
	streamInterShared = streamShared
)

// attach takes the job's edges to top and to every node above base.
func (s *stream) attach(id string) error {
	c, err := s.g.NewJobBackend(s.top, "active node", "stream", id, streamTopPerm, streamTopShared)
	if err != nil {
		return err
	}
	s.active = c
	for b := s.top.Backing(); b != nil && b != s.base; b = b.Backing() {
		c, err := s.g.NewJobBackend(b, "intermediate node", "stream", id, 0, streamInterShared)
		if err != nil {
			s.release()
			return err
		}
		s.inter = append(s.inter, c)
	}
	return nil
}

// release drops the job's edges; intermediate nodes nothing else holds
// close.
func (s *stream) release() {
	for _, c := range s.inter {
		s.g.ReleaseBackend(c)
	}
	s.inter = nil
	if s.active != nil {
		s.g.ReleaseBackend(s.active)
		s.active = nil
	}
}

// run is stream_run: in chunks of at most streamChunk, each range that
// the top leaves unallocated and an intermediate node holds is copied up,
// with the rate limit, pause and cancel points and the error policy
// between chunks.
func (s *stream) run(ctx context.Context, b *job.BlockJob) error {
	if len(s.inter) == 0 {
		return nil // nothing to stream: base is the top's backing node
	}
	top := s.active
	size := top.Size()
	b.ProgressSetRemaining(size)
	var firstErr error
	var copied int64
	for off, n := int64(0), int64(0); off < size; off += n {
		if err := b.RateLimit(copied); err != nil {
			break // force-cancelled
		}
		copied = 0
		n = min(streamChunk, size-off)
		doCopy := false
		ext, err := top.BlockStatus(ctx, off, n)
		if err == nil && len(ext) > 0 {
			n = ext[0].Length
			if ext[0].Flags&graph.ExtentHole != 0 {
				doCopy, _, n, err = allocatedAbove(ctx, s.inter, off, n)
			}
		}
		if err == nil && doCopy {
			err = top.Populate(ctx, off, n)
		}
		if err != nil {
			switch b.ErrorAction(s.onErr, true, err) {
			case job.ActionStop:
				n = 0 // retry the chunk once resumed
				continue
			case job.ActionReport:
				if firstErr == nil {
					firstErr = err
				}
				return firstErr
			}
			if firstErr == nil {
				firstErr = err // ignored, but the backing file stays
			}
		}
		b.ProgressUpdate(n)
		if doCopy {
			copied = n
		}
	}
	return firstErr
}

// prepare is stream_prepare: the top takes base (or nothing) as its
// backing node, the intermediate nodes leave the chain, and the image
// header names the base (the backing-file argument, or the base's file
// name) with its format. The header changes only now, after every byte
// was copied up.
func (s *stream) prepare(*job.BlockJob) error {
	if s.top.Backing() == nil {
		return nil
	}
	ctx := context.Background()
	if err := s.g.ReplaceBacking(ctx, s.top, s.base); err != nil {
		return err
	}
	name, format := "", ""
	if s.base != nil {
		name = s.base.Filename()
		if s.backingFile != nil {
			name = *s.backingFile
		}
		format = s.base.Driver().Name
	}
	bc, ok := s.top.Node().(graph.BackingFileChanger)
	if !ok {
		return errors.New("Operation not supported")
	}
	if err := bc.ChangeBackingFile(ctx, name, format); err != nil {
		return fmt.Errorf("Could not change the backing file of '%s': %v", s.top.Name(), err)
	}
	return nil
}
