package graph

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
)

// Dirty tracking for the mirror job (QEMU's BdrvDirtyBitmap as
// bdrv_set_dirty feeds it): while a bitmap is attached to a node, every
// write, write-zeroes and discard that reaches the node through any edge
// marks its range dirty, after the request and before it leaves the
// node's gate, so a drain (the gate held exclusively) sees every mark of
// the requests it waited for. A copier clears a range before it reads it:
// a write that lands during the copy marks it again. With no bitmap
// attached the write path pays one atomic load.

// DirtyBitmap is a bitmap of granules of a node's range. It is safe for
// concurrent use.
type DirtyBitmap struct {
	gran  int64
	shift uint
	size  int64

	mu    sync.Mutex // protects words and count
	words []uint64
	count int64 // dirty granules
}

// NewDirtyBitmap returns a clean bitmap over size bytes in granules of
// gran bytes, a power of two.
func NewDirtyBitmap(size, gran int64) *DirtyBitmap {
	if gran <= 0 || gran&(gran-1) != 0 {
		panic("graph: dirty bitmap granularity is not a power of two")
	}
	n := (size + gran - 1) / gran
	return &DirtyBitmap{gran: gran, shift: uint(bits.TrailingZeros64(uint64(gran))), size: size,
		words: make([]uint64, (n+63)/64)}
}

// Granularity returns the bitmap's granule size.
func (d *DirtyBitmap) Granularity() int64 { return d.gran }

// Size returns the number of bytes the bitmap covers.
func (d *DirtyBitmap) Size() int64 { return d.size }

// granules returns the granule range covering [off, off+n), clipped to
// the bitmap.
func (d *DirtyBitmap) granules(off, n int64) (first, end int64) {
	if off < 0 {
		n += off
		off = 0
	}
	if off+n > d.size {
		n = d.size - off
	}
	if n <= 0 {
		return 0, 0
	}
	return off >> d.shift, (off + n + d.gran - 1) >> d.shift
}

// Mark sets the granules covering [off, off+n) dirty.
func (d *DirtyBitmap) Mark(off, n int64) {
	first, end := d.granules(off, n)
	if first >= end {
		return
	}
	d.mu.Lock()
	for i := first; i < end; i++ {
		w, m := &d.words[i>>6], uint64(1)<<(i&63)
		if *w&m == 0 {
			*w |= m
			d.count++
		}
	}
	d.mu.Unlock()
}

// Clear sets the granules covering [off, off+n) clean.
func (d *DirtyBitmap) Clear(off, n int64) {
	first, end := d.granules(off, n)
	d.mu.Lock()
	for i := first; i < end; i++ {
		w, m := &d.words[i>>6], uint64(1)<<(i&63)
		if *w&m != 0 {
			*w &^= m
			d.count--
		}
	}
	d.mu.Unlock()
}

// Count returns the number of dirty bytes (whole granules; the last one
// clipped to the size).
func (d *DirtyBitmap) Count() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.count << d.shift
	if last := (d.size - 1) >> d.shift; d.size > 0 && d.words[last>>6]&(1<<(last&63)) != 0 {
		c -= (last+1)<<d.shift - d.size
	}
	return c
}

// TakeNext finds the first dirty run at or after from (wrapping to the
// start once), at most max bytes long (rounded down to whole granules, at
// least one), clears it and returns it. n is 0 when the bitmap is clean.
func (d *DirtyBitmap) TakeNext(from, max int64) (off, n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.count == 0 {
		return 0, 0
	}
	total := (d.size + d.gran - 1) >> d.shift
	start := max64(from, 0) >> d.shift
	i := d.nextSet(start, total)
	if i < 0 {
		i = d.nextSet(0, total)
	}
	if i < 0 {
		return 0, 0
	}
	limit := max >> d.shift
	if limit < 1 {
		limit = 1
	}
	j := i
	for j < total && j-i < limit && d.words[j>>6]&(1<<(j&63)) != 0 {
		d.words[j>>6] &^= 1 << (j & 63)
		d.count--
		j++
	}
	off = i << d.shift
	return off, min(j<<d.shift, d.size) - off
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// nextSet returns the first set granule in [i, total), or -1. d.mu is
// held.
func (d *DirtyBitmap) nextSet(i, total int64) int64 {
	for i < total {
		w := d.words[i>>6] >> (i & 63)
		if w != 0 {
			i += int64(bits.TrailingZeros64(w))
			if i < total {
				return i
			}
			return -1
		}
		i = (i | 63) + 1
	}
	return -1
}

// markDirty marks [off, off+n) in the bitmap attached to b, if any. It
// runs on every write path with b's gate held.
func (b *BDS) markDirty(off, n int64) {
	if d := b.dirty.Load(); d != nil {
		d.Mark(off, n)
	}
}

// TrackDirty attaches d to b: from now on every write, write-zeroes and
// discard through an edge to b marks d. A node has at most one bitmap
// (one mirror job: the node is busy for others).
func (g *Graph) TrackDirty(b *BDS, d *DirtyBitmap) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	if !b.dirty.CompareAndSwap(nil, d) {
		return fmt.Errorf("Node '%s' already has a dirty bitmap", b.name)
	}
	return nil
}

// UntrackDirty detaches d from b (if it is attached).
func (g *Graph) UntrackDirty(b *BDS, d *DirtyBitmap) {
	b.dirty.CompareAndSwap(d, nil)
}

// Pivot replaces from by to the way the end of a mirror job does (QEMU's
// bdrv_replace_node in mirror_exit_common): the requests in flight on
// from finish and new ones wait (a drain: from's gate held exclusively),
// final runs (the job copies the last dirty ranges, reading from with
// read, which bypasses the gate, and lets go of its writer on to), then
// every parent and outside user of from except block jobs' edges moves
// to to. The requests that waited go to to. On error from final nothing
// has moved.
func (g *Graph) Pivot(ctx context.Context, from, to *BDS, final func(read func(ctx context.Context, p []byte, off int64) error) error) error {
	if from == to {
		return errors.New("Can't mirror node into itself")
	}
	from.gate.Lock()
	defer from.gate.Unlock()
	read := func(ctx context.Context, p []byte, off int64) error {
		c := &Child{name: "pivot"}
		c.target.Store(from)
		return c.readEntered(ctx, from, p, off)
	}
	if err := final(read); err != nil {
		return err
	}
	to.gate.Lock()
	defer to.gate.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if from.closed || to.closed {
		return ErrClosed
	}
	var moved []*Child
	for _, c := range from.edges() {
		if c.job == "" {
			moved = append(moved, c)
		}
	}
	return g.moveEdgeList(from, to, moved)
}
