package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"blockd/daemon/job"
	"blockd/graph"
	"blockd/qmp"
)

// blockdev-mirror (QEMU's qmp_blockdev_mirror and block/mirror.c): the
// job copies the source to a target node added before (all of it, what
// the top image holds, or nothing but new writes), follows the source's
// writes with a dirty bitmap (graph.TrackDirty) until target and source
// agree, goes ready, and keeps copying new writes. block-job-complete
// drains the source, copies the last dirty ranges and moves every parent
// and export of the source to the target (graph.Pivot); a cancel of a
// ready job ends it without the switch.

// Mirror defaults (block/mirror.c).
const (
	mirrorMaxIO      = 1 << 20          // MAX_IO_BYTES
	mirrorMaxInFlt   = 16               // MAX_IN_FLIGHT: requests copying at once
	mirrorBufSize    = 16 * mirrorMaxIO // DEFAULT_MIRROR_BUF_SIZE
	mirrorMaxGran    = 64 << 20         // the largest granularity blockdev_mirror_common takes
	mirrorDefaultGra = 64 << 10         // bdrv_get_default_bitmap_granularity without a cluster size
	mirrorSlice      = job.SliceTime    // BLOCK_JOB_SLICE_TIME: the ready loop's sleep
	mirrorMinGran    = 512              // the smallest granularity
)

// mirrorSync is QEMU's MirrorSyncMode.
type mirrorSync string

// EnumValues implements qapi.Enum.
func (mirrorSync) EnumValues() []string {
	return []string{"top", "full", "none", "incremental", "bitmap"}
}

// mirrorCopyMode is QEMU's MirrorCopyMode.
type mirrorCopyMode string

// EnumValues implements qapi.Enum.
func (mirrorCopyMode) EnumValues() []string { return []string{"background", "write-blocking"} }

// mirrorArgs is blockdev-mirror's arguments.
type mirrorArgs struct {
	JobID          *string         `json:"job-id,omitempty"`
	Device         string          `json:"device"`
	Target         string          `json:"target"`
	Replaces       *string         `json:"replaces,omitempty"`
	Sync           mirrorSync      `json:"sync"`
	Speed          *int64          `json:"speed,omitempty"`
	Granularity    *uint32         `json:"granularity,omitempty"`
	BufSize        *int64          `json:"buf-size,omitempty"`
	OnSourceError  *job.OnError    `json:"on-source-error,omitempty"`
	OnTargetError  *job.OnError    `json:"on-target-error,omitempty"`
	FilterNodeName *string         `json:"filter-node-name,omitempty"`
	CopyMode       *mirrorCopyMode `json:"copy-mode,omitempty"`
	AutoFinalize   *bool           `json:"auto-finalize,omitempty"`
	AutoDismiss    *bool           `json:"auto-dismiss,omitempty"`
}

// mirror is one mirror job.
type mirror struct {
	g             *graph.Graph
	src, target   *graph.BDS
	sync          mirrorSync
	gran, chunk   int64
	slots         int // requests in flight at most: chunk*slots fits in buf-size
	onSrc, onTgt  job.OnError
	dirty         *graph.DirtyBitmap
	ready         atomic.Bool // BLOCK_JOB_READY was sent (s->synced)
	shouldPivot   atomic.Bool // block-job-complete was accepted (s->should_complete)
	trackingDirty bool

	// The active commit (commit_active_start) runs this job with type
	// "commit" and the base of the chain as its target: base is the
	// target then, nil for blockdev-mirror.
	jobType   string
	base      *graph.BDS
	baseRO    bool        // base was read-only: reopened read-write for the job
	commitTop bool        // SetCommitTop is on for the source
	aborted   atomic.Bool // the job failed or was force-cancelled

	// Set up before the job starts, released by release.
	main   *graph.Child   // the job's edge to the source ("main node"); it reads through it
	inter  []*graph.Child // commit: the nodes below the source down to the base ("intermediate node")
	tgtJob *graph.Child   // the job's hold on the target ("target")
	tgtW   *graph.Child   // the job's writer on the target (QEMU's s->target)
}

func (d *Daemon) registerMirror() {
	qmp.Handle(d.QMP, "blockdev-mirror", func(ctx context.Context, _ *qmp.Monitor, a *mirrorArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.blockdevMirror(a)
	})
}

// mirrorNodes resolves and checks the source, the target and replaces in
// qmp_blockdev_mirror's, blockdev_mirror_common's and mirror_start's
// order, with their texts.
func mirrorNodes(g *graph.Graph, a *mirrorArgs) (src, target *graph.BDS, err error) {
	if src = g.Lookup(a.Device); src == nil {
		return nil, nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", a.Device, a.Device)
	}
	if !src.IsRoot() {
		return nil, nil, errors.New("Need a root block node")
	}
	if target = g.Lookup(a.Target); target == nil {
		return nil, nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", a.Target, a.Target)
	}
	if a.Granularity != nil && *a.Granularity != 0 {
		gr := *a.Granularity
		if gr < mirrorMinGran || gr > mirrorMaxGran {
			return nil, nil, errors.New("Parameter 'granularity' expects a value in range [512B, 64MB]")
		}
		if gr&(gr-1) != 0 {
			return nil, nil, errors.New("Parameter 'granularity' expects a power of 2")
		}
	}
	if err := src.Busy(); err != nil {
		return nil, nil, err
	}
	if err := target.Busy(); err != nil {
		return nil, nil, err
	}
	if a.Replaces != nil {
		// check_to_replace_node: blockd has no filter nodes, so the
		// source is the only node a mirror of it can replace.
		r := g.Lookup(*a.Replaces)
		if r == nil {
			return nil, nil, fmt.Errorf("Failed to find node with node-name='%s'", *a.Replaces)
		}
		if err := r.Busy(); err != nil {
			return nil, nil, err
		}
		if r != src {
			return nil, nil, fmt.Errorf("Cannot replace '%s' by a node mirrored from '%s', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data", *a.Replaces, a.Device)
		}
	}
	if a.Sync == "incremental" || a.Sync == "bitmap" {
		return nil, nil, fmt.Errorf("Sync mode '%s' not supported", a.Sync)
	}
	if a.BufSize != nil && *a.BufSize < 0 {
		return nil, nil, errors.New("Invalid parameter 'buf-size'")
	}
	if src == target {
		return nil, nil, errors.New("Can't mirror node into itself")
	}
	return src, target, nil
}

// defaultGranularity is bdrv_get_default_bitmap_granularity: the target's
// cluster size within [4 KiB, 64 KiB], 64 KiB without one.
func defaultGranularity(target *graph.BDS) int64 {
	if in, ok := target.Node().(graph.Infoer); ok {
		if cs := in.Info().ClusterSize; cs > 0 {
			return min(max(cs, 4096), mirrorDefaultGra)
		}
	}
	return mirrorDefaultGra
}

// blockdevMirror checks the arguments and starts the job.
func (d *Daemon) blockdevMirror(a *mirrorArgs) error {
	src, target, err := mirrorNodes(d.Graph, a)
	if err != nil {
		return err
	}
	if a.FilterNodeName != nil {
		return errors.New("blockdev-mirror: 'filter-node-name' is not supported: blockd mirrors without a mirror_top filter node")
	}
	if a.CopyMode != nil && *a.CopyMode == "write-blocking" {
		return errors.New("blockdev-mirror: copy-mode 'write-blocking' is not supported; only 'background' is")
	}
	if inChain(src, target) {
		return errors.New("Cannot mirror to a filter on top of a node in the source's backing chain")
	}
	m := &mirror{g: d.Graph, src: src, target: target, sync: a.Sync, jobType: "mirror",
		onSrc: job.OnErrorReport, onTgt: job.OnErrorReport, gran: defaultGranularity(target)}
	if a.Granularity != nil && *a.Granularity != 0 {
		m.gran = int64(*a.Granularity)
	}
	bufSize := int64(mirrorBufSize)
	if a.BufSize != nil && *a.BufSize > 0 {
		bufSize = *a.BufSize
	}
	m.setChunk(bufSize)
	if a.OnSourceError != nil {
		m.onSrc = *a.OnSourceError
	}
	if a.OnTargetError != nil {
		m.onTgt = *a.OnTargetError
	}
	o := blockJobOptions(a.JobID, a.Speed, a.AutoFinalize, a.AutoDismiss)
	return d.startMirror(m, o)
}

// startMirror takes the job's edges and starts the job (mirror_start_job
// after its checks); blockdev-mirror and the active block-commit share it.
func (d *Daemon) startMirror(m *mirror, o job.BlockOptions) error {
	if job.ValidID(o.ID) {
		if err := m.attach(o.ID); err != nil {
			return err
		}
	}
	_, err := d.Jobs.StartBlock(&job.BlockDriver{
		Type:     m.jobType,
		Run:      m.run,
		Complete: m.complete,
		Cancel: func(_ *job.BlockJob, force bool) bool {
			// Before the job is ready every cancel is forced
			// (mirror_cancel).
			return force || !m.ready.Load()
		},
		Prepare: m.prepare,
		Abort:   func(*job.BlockJob) { m.aborted.Store(true) },
		Clean:   func(*job.BlockJob) { m.release() },
	}, o)
	if err != nil {
		m.aborted.Store(true)
		m.release()
	}
	return err
}

// setChunk sizes the job's requests for a buffer of bufSize bytes (0:
// the default) rounded up to the granularity: one request copies at most
// max(buf-size/16, 1 MiB) (mirror_iteration's max_io_bytes), within the
// buffer, in whole granules; up to 16 requests (MAX_IN_FLIGHT) copy at
// once as long as their buffers fit in buf-size.
func (m *mirror) setChunk(bufSize int64) {
	if bufSize <= 0 {
		bufSize = mirrorBufSize
	}
	bufSize = (bufSize + m.gran - 1) / m.gran * m.gran
	m.chunk = min(bufSize, max(bufSize/16, mirrorMaxIO))
	m.chunk = max(m.chunk/m.gran*m.gran, m.gran)
	m.slots = int(min(max(bufSize/m.chunk, 1), mirrorMaxInFlt))
}

// Permissions as mirror_start_job takes them: the job reads the source
// consistently and lets others do anything but resize it; it writes the
// target and lets others only write it without changing it.
const (
	mirrorSrcShared    = graph.PermRead | graph.PermWriteUnchanged | graph.PermWrite
	mirrorTargetShared = graph.PermWriteUnchanged
)

// attach takes the job's edges and starts tracking the source's writes
// (the dirty bitmap exists from the job's creation, as QEMU's). On error
// nothing is held.
func (m *mirror) attach(id string) (err error) {
	defer func() {
		if err != nil {
			m.release()
		}
	}()
	g := m.g
	if m.main, err = g.NewJobBackend(m.src, "main node", m.jobType, id, graph.PermRead, mirrorSrcShared); err != nil {
		return err
	}
	if m.tgtJob, err = g.NewJobBackend(m.target, "target", m.jobType, id, 0, graph.PermAll); err != nil {
		return err
	}
	perm, shared := graph.PermWrite, graph.Perm(mirrorTargetShared)
	if m.base != nil {
		if err = m.attachCommit(id); err != nil {
			return err
		}
		// The base stays a backing node of the chain: it is shared
		// for its readers (mirror_start_job with target_is_backing)
		// and grows to the source's size if it is smaller.
		shared |= graph.PermRead | graph.PermWrite
		if m.target.Node().Size() < m.src.Node().Size() {
			perm |= graph.PermResize
		}
	}
	if m.tgtW, err = g.NewBackend(m.target.Name(), "", perm, shared); err != nil {
		return err
	}
	m.dirty = graph.NewDirtyBitmap(m.main.Size(), m.gran)
	if err = g.TrackDirty(m.src, m.dirty); err != nil {
		return err
	}
	m.trackingDirty = true
	return nil
}

// release drops what the job holds (mirror_exit_common's cleanup).
func (m *mirror) release() {
	if m.trackingDirty {
		m.g.UntrackDirty(m.src, m.dirty)
		m.trackingDirty = false
	}
	for _, e := range []**graph.Child{&m.tgtW, &m.tgtJob, &m.main} {
		if *e != nil {
			m.g.ReleaseBackend(*e)
			*e = nil
		}
	}
	m.releaseCommit()
}

// complete is mirror_complete: the job switches to the target once it
// has copied the last dirty ranges.
func (m *mirror) complete(b *job.BlockJob) error {
	if !m.ready.Load() {
		return fmt.Errorf("The active block job '%s' cannot be completed", b.ID())
	}
	m.shouldPivot.Store(true)
	b.Enter()
	return nil
}
