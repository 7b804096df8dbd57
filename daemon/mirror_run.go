package daemon

import (
	"context"
	"errors"
	"sync"

	"blockd/daemon/job"
	"blockd/graph"
)

// run is mirror_run: the sizes must agree, the bitmap starts with what
// sync asks for, then the job copies dirty ranges until none is left,
// goes ready, and keeps copying new writes until it is completed (the
// pivot happens in prepare) or cancelled.
func (m *mirror) run(ctx context.Context, b *job.BlockJob) error {
	size := m.main.Size()
	switch tsize := m.tgtW.Size(); {
	case m.base != nil:
		// Active commit: the base grows to the top's size.
		if tsize < size {
			if err := m.tgtW.Truncate(ctx, size, graph.PreallocOff); err != nil {
				return err
			}
		}
	case size != tsize:
		return errors.New("Source and target image have different sizes")
	}
	if m.sync != "none" {
		if err := m.dirtyInit(ctx, b, size); err != nil {
			return err
		}
	}
	bufs := make([][]byte, m.slots)
	for i := range bufs {
		bufs[i] = make([]byte, m.chunk)
	}
	var pos int64
	for {
		if b.IsCancelled() {
			return nil
		}
		cnt := m.dirty.Count()
		b.ProgressSetRemaining(cnt)
		if cnt > 0 {
			var copied int64
			var err error
			pos, copied, err = m.round(ctx, b, pos, bufs)
			if err != nil {
				return err
			}
			if err := b.RateLimit(copied); err != nil {
				return nil // force-cancelled
			}
			continue
		}
		if !m.ready.Load() {
			m.ready.Store(true)
			b.TransitionToReady()
		}
		if m.shouldPivot.Load() || b.CancelRequested() {
			return nil
		}
		b.Sleep(mirrorSlice)
	}
}

// dirtyInit is mirror_dirty_init as blockdev-mirror runs it in QEMU 7.2:
// sync=full marks everything (the copy writes zeroes where the source
// reads zeroes, QEMU's zero_target pass), sync=top what the source image
// itself allocates (all of it without a backing file, as full).
func (m *mirror) dirtyInit(ctx context.Context, b *job.BlockJob, size int64) error {
	if m.base != nil {
		return m.commitDirtyInit(ctx, b, size)
	}
	if m.sync == "full" || m.src.Backing() == nil {
		m.dirty.Mark(0, size)
		return nil
	}
	for off := int64(0); off < size; {
		if b.IsCancelled() {
			return nil
		}
		b.PausePoint()
		ext, err := m.main.BlockStatus(ctx, off, min(size-off, 1<<30))
		if err != nil {
			return err
		}
		if len(ext) == 0 {
			return errors.New("block status returned no extent")
		}
		if e := ext[0]; e.Flags&graph.ExtentHole == 0 {
			m.dirty.Mark(off, e.Length)
		}
		off += ext[0].Length
	}
	return nil
}

// round copies the next dirty runs from pos with up to len(bufs)
// requests in flight (mirror_iteration with MAX_IN_FLIGHT), one buffer
// each, and waits for all of them: the job's pause, cancel and rate-limit
// points and its READY checks come between rounds, with nothing in
// flight. Each run is cleared when it is taken, before it is read. A run
// that overlaps one of the round's (written again since it was taken)
// goes back to the bitmap and ends the round, so two requests never
// write the same range of the target at once (QEMU's in_flight_bitmap).
// It returns the position to go on from, the bytes copied and the first
// error whose policy says report.
func (m *mirror) round(ctx context.Context, b *job.BlockJob, pos int64, bufs [][]byte) (int64, int64, error) {
	type request struct {
		off, n, copied int64
		err            error
	}
	reqs := make([]request, 0, len(bufs))
	var wg sync.WaitGroup
take:
	for i := range bufs {
		off, n := m.dirty.TakeNext(pos, m.chunk)
		if n == 0 {
			pos = 0
			break
		}
		for j := range reqs {
			if r := &reqs[j]; off < r.off+r.n && r.off < off+n {
				m.dirty.Mark(off, n)
				break take
			}
		}
		pos = off + n
		reqs = append(reqs, request{off: off, n: n})
		wg.Add(1)
		go func(r *request, buf []byte) {
			defer wg.Done()
			r.copied, r.err = m.iteration(ctx, b, r.off, r.n, buf)
		}(&reqs[len(reqs)-1], bufs[i])
	}
	wg.Wait()
	var copied int64
	for j := range reqs {
		if r := &reqs[j]; r.err != nil {
			return 0, 0, r.err
		}
		copied += reqs[j].copied
	}
	return pos, copied, nil
}

// iteration copies the dirty run [off, off+n) taken from the bitmap
// (mirror_co_read's part of mirror_iteration); a write during the copy
// marks it again; a range the source reads as zeroes is zeroed on the
// target (which may unmap it). It returns how many bytes it copied
// (zeroed ranges do not count for the rate limit). An error is returned
// only when the policy says report.
func (m *mirror) iteration(ctx context.Context, b *job.BlockJob, off, n int64, buf []byte) (int64, error) {
	ext, err := m.main.BlockStatusAbove(ctx, off, n)
	zero := false
	if err == nil && len(ext) > 0 && ext[0].Flags&graph.ExtentZero != 0 {
		// Zero only whole granules of the zero extent; the rest of the
		// run goes back to the bitmap for the next round.
		if l := ext[0].Length / m.gran * m.gran; l > 0 && l < n {
			m.dirty.Mark(off+l, n-l)
			n, zero = l, true
		} else if ext[0].Length >= n {
			zero = true
		}
	}
	read := true
	if err == nil {
		if zero {
			read = false
			err = m.tgtW.WriteZeroes(ctx, off, n, graph.MayUnmap)
		} else if err = m.main.ReadAt(ctx, buf[:n], off); err == nil {
			read = false
			err = m.tgtW.WriteAt(ctx, buf[:n], off, 0)
		}
	}
	if err != nil {
		m.dirty.Mark(off, n)
		policy := m.onTgt
		if read {
			policy = m.onSrc
		}
		if b.ErrorAction(policy, read, err) == job.ActionReport {
			return 0, err
		}
		return 0, nil
	}
	b.ProgressUpdate(n)
	if zero {
		return 0, nil
	}
	return n, nil
}

// prepare is mirror_exit_common on success: after block-job-complete the
// source is drained, the last dirty ranges are copied, the target is
// flushed and every parent and export of the source moves to it. After a
// cancel of a ready job nothing moves.
func (m *mirror) prepare(*job.BlockJob) error {
	m.aborted.Store(false)
	if !m.shouldPivot.Load() {
		return nil
	}
	ctx := context.Background()
	return m.g.Pivot(ctx, m.src, m.target, func(read func(context.Context, []byte, int64) error) error {
		buf := make([]byte, m.chunk)
		for {
			off, n := m.dirty.TakeNext(0, m.chunk)
			if n == 0 {
				break
			}
			if err := read(ctx, buf[:n], off); err != nil {
				m.dirty.Mark(off, n)
				return err
			}
			if err := m.tgtW.WriteAt(ctx, buf[:n], off, 0); err != nil {
				m.dirty.Mark(off, n)
				return err
			}
		}
		if err := m.tgtW.Flush(ctx); err != nil {
			return err
		}
		m.g.UntrackDirty(m.src, m.dirty)
		m.trackingDirty = false
		m.g.ReleaseBackend(m.tgtW)
		m.tgtW = nil
		return nil
	})
}
