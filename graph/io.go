package graph

import (
	"context"

	"blockd/internal/bufpool"
)

// This file is the graph's one validation layer. Every request to a node
// goes through a Child: it is range-checked against the node's size,
// checked against the edge's permissions, split to the node's maximum
// transfer size and widened to its alignment with read-modify-write, so
// drivers only ever see valid, aligned requests.

func (c *Child) check(b *BDS, op string, off, n int64) error {
	if c.detached {
		return &OpError{Op: op, Node: b.name, Off: off, Len: n, Err: ErrClosed}
	}
	if off < 0 || n < 0 || off+n < off || off+n > b.node.Size() {
		return &OpError{Op: op, Node: b.name, Off: off, Len: n, Err: ErrRange}
	}
	return nil
}

func (c *Child) checkWrite(b *BDS, op string, off, n int64) error {
	if err := c.check(b, op, off, n); err != nil {
		return err
	}
	if Perm(c.ioPerm.Load())&(PermWrite|PermWriteUnchanged) == 0 {
		return &OpError{Op: op, Node: b.name, Off: off, Len: n, Err: ErrReadOnly}
	}
	b.checkThreshold(off, n)
	return nil
}

// enter returns the node the edge points to, held against replacement
// (Graph.Snapshot) until the caller releases it with b.gate.RUnlock(). A
// request that raced with a replacement goes to the new node.
func (c *Child) enter() *BDS {
	for {
		b := c.n()
		b.gate.RLock()
		if c.n() == b {
			return b
		}
		b.gate.RUnlock()
	}
}

// Size returns the node's current size.
func (c *Child) Size() int64 { return c.n().node.Size() }

// Limits returns the node's limits.
func (c *Child) Limits() Limits { return c.n().limits }

// Close does nothing: edges are released through the graph.
func (c *Child) Close() error { return nil }

func (c *Child) wrap(b *BDS, op string, off, n int64, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(*OpError); ok {
		return err
	}
	return &OpError{Op: op, Node: b.name, Off: off, Len: n, Err: err}
}

// chunks calls fn for pieces of [off, off+n) no larger than the node's
// maximum transfer size (rounded down to its alignment).
func (c *Child) chunks(b *BDS, off, n int64, fn func(off, n int64) error) error {
	max := b.limits.MaxTransfer
	if max <= 0 || n <= max {
		return fn(off, n)
	}
	a := b.limits.Align
	max -= max % a
	if max <= 0 {
		max = a
	}
	for n > 0 {
		l := min(n, max)
		if err := fn(off, l); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (c *Child) ReadAt(ctx context.Context, p []byte, off int64) error {
	b := c.enter()
	defer b.gate.RUnlock()
	return c.readEntered(ctx, b, p, off)
}

// readEntered is ReadAt once b is held (its gate, shared or exclusive).
func (c *Child) readEntered(ctx context.Context, b *BDS, p []byte, off int64) error {
	n := int64(len(p))
	if err := c.check(b, "read", off, n); err != nil {
		return err
	}
	a := b.limits.Align
	if (off|n)&(a-1) == 0 {
		return c.wrap(b, "read", off, n, c.chunks(b, off, n, func(o, l int64) error {
			return b.node.ReadAt(ctx, p[o-off:o-off+l], o)
		}))
	}
	start := off &^ (a - 1)
	end := (off + n + a - 1) &^ (a - 1)
	bp := bufpool.Get(int(end - start))
	defer bufpool.Put(bp)
	buf := *bp
	if err := c.chunks(b, start, end-start, func(o, l int64) error {
		return b.node.ReadAt(ctx, buf[o-start:o-start+l], o)
	}); err != nil {
		return c.wrap(b, "read", off, n, err)
	}
	copy(p, buf[off-start:])
	return nil
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
			return false
		}
		p = p[8:]
	}
	for _, x := range p {
		if x != 0 {
			return false
		}
	}
	return true
}

// WriteAt writes p at off.
func (c *Child) WriteAt(ctx context.Context, p []byte, off int64, f ReqFlags) error {
	b := c.enter()
	defer b.gate.RUnlock()
	n := int64(len(p))
	if err := c.checkWrite(b, "write", off, n); err != nil {
		return err
	}
	defer b.markDirty(off, n)
	if dz := b.opts.DetectZeroes; dz != "" && dz != "off" && n > 0 && allZero(p) {
		zf := f &^ MayUnmap
		if dz == "unmap" {
			zf |= MayUnmap
		}
		return c.writeZeroes(ctx, b, off, n, zf)
	}
	a := b.limits.Align
	if a == 1 {
		return c.wrap(b, "write", off, n, c.chunks(b, off, n, func(o, l int64) error {
			return b.node.WriteAt(ctx, p[o-off:o-off+l], o, f)
		}))
	}
	if (off|n)&(a-1) == 0 {
		b.rmw.RLock()
		defer b.rmw.RUnlock()
		return c.wrap(b, "write", off, n, c.chunks(b, off, n, func(o, l int64) error {
			return b.node.WriteAt(ctx, p[o-off:o-off+l], o, f)
		}))
	}
	b.rmw.Lock()
	defer b.rmw.Unlock()
	return c.wrap(b, "write", off, n, c.rmwWrite(ctx, b, p, off, f))
}

// rmwWrite writes an unaligned range by reading the partial head and tail
// blocks. b.rmw is held exclusively.
func (c *Child) rmwWrite(ctx context.Context, b *BDS, p []byte, off int64, f ReqFlags) error {
	a := b.limits.Align
	n := int64(len(p))
	start := off &^ (a - 1)
	end := (off + n + a - 1) &^ (a - 1)
	// The head and tail blocks read below and p cover the whole buffer, so
	// a pooled one's old contents never reach the node.
	bp := bufpool.Get(int(end - start))
	defer bufpool.Put(bp)
	buf := *bp
	headRead := false
	if start < off {
		if err := b.node.ReadAt(ctx, buf[:a], start); err != nil {
			return err
		}
		headRead = true
	}
	if end > off+n && !(headRead && end-a == start) {
		if err := b.node.ReadAt(ctx, buf[end-a-start:], end-a); err != nil {
			return err
		}
	}
	copy(buf[off-start:], p)
	return c.chunks(b, start, end-start, func(o, l int64) error {
		return b.node.WriteAt(ctx, buf[o-start:o-start+l], o, f)
	})
}

// WriteZeroes writes zeroes to [off, off+n), without a data buffer where
// the node can.
func (c *Child) WriteZeroes(ctx context.Context, off, n int64, f ReqFlags) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if err := c.checkWrite(b, "zero", off, n); err != nil {
		return err
	}
	defer b.markDirty(off, n)
	return c.writeZeroes(ctx, b, off, n, f)
}

func (c *Child) writeZeroes(ctx context.Context, b *BDS, off, n int64, f ReqFlags) error {
	if b.opts.Discard != "unmap" {
		f &^= MayUnmap
	}
	a := b.limits.Align
	head := (a - off&(a-1)) & (a - 1)
	if head > n {
		head = n
	}
	if a > 1 && head > 0 {
		if f&NoFallback != 0 {
			return c.wrap(b, "zero", off, n, ErrNotSupported)
		}
		if err := c.zeroBuffer(ctx, b, off, head, f); err != nil {
			return err
		}
		off, n = off+head, n-head
	}
	tail := n & (a - 1)
	mid := n - tail
	if mid > 0 {
		if a > 1 {
			b.rmw.RLock()
		}
		err := c.zeroAligned(ctx, b, off, mid, f)
		if a > 1 {
			b.rmw.RUnlock()
		}
		if err != nil {
			return c.wrap(b, "zero", off, mid, err)
		}
	}
	if tail > 0 {
		if f&NoFallback != 0 {
			return c.wrap(b, "zero", off, n, ErrNotSupported)
		}
		return c.zeroBuffer(ctx, b, off+mid, tail, f)
	}
	return nil
}

const zeroChunk = 1 << 20

var zeroBuf = make([]byte, zeroChunk)

func (c *Child) zeroAligned(ctx context.Context, b *BDS, off, n int64, f ReqFlags) error {
	if z, ok := b.node.(Zeroer); ok {
		err := c.chunks(b, off, n, func(o, l int64) error { return z.WriteZeroes(ctx, o, l, f) })
		if err == nil || f&NoFallback != 0 || !isNotSupported(err) {
			return err
		}
	}
	if f&NoFallback != 0 {
		return ErrNotSupported
	}
	for n > 0 {
		l := min(n, zeroChunk)
		if err := c.chunks(b, off, l, func(o, l2 int64) error {
			return b.node.WriteAt(ctx, zeroBuf[:l2], o, f&FUA)
		}); err != nil {
			return err
		}
		off, n = off+l, n-l
	}
	return nil
}

// zeroBuffer zeroes a sub-alignment range with read-modify-write.
func (c *Child) zeroBuffer(ctx context.Context, b *BDS, off, n int64, f ReqFlags) error {
	b.rmw.Lock()
	defer b.rmw.Unlock()
	return c.wrap(b, "zero", off, n, c.rmwWrite(ctx, b, make([]byte, n), off, f&FUA))
}

func isNotSupported(err error) bool {
	return err != nil && (err == ErrNotSupported || errorsIs(err, ErrNotSupported))
}

// Discard deallocates [off, off+n) where the node allows it (discard=unmap);
// otherwise it does nothing, as QEMU does. Unaligned edges are skipped.
func (c *Child) Discard(ctx context.Context, off, n int64) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if err := c.checkWrite(b, "discard", off, n); err != nil {
		return err
	}
	defer b.markDirty(off, n)
	if b.opts.Discard != "unmap" {
		return nil
	}
	d, ok := b.node.(Discarder)
	if !ok {
		return nil
	}
	a := b.limits.Align
	start := (off + a - 1) &^ (a - 1)
	end := (off + n) &^ (a - 1)
	if end <= start {
		return nil
	}
	err := c.chunks(b, start, end-start, func(o, l int64) error { return d.Discard(ctx, o, l) })
	if isNotSupported(err) {
		return nil
	}
	return c.wrap(b, "discard", off, n, err)
}

// BlockStatus reports allocation from off. Nodes without the capability
// report everything as data.
func (c *Child) BlockStatus(ctx context.Context, off, n int64) ([]Extent, error) {
	b := c.enter()
	defer b.gate.RUnlock()
	if err := c.check(b, "status", off, n); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, nil
	}
	if bs, ok := b.node.(BlockStatuser); ok {
		ext, err := bs.BlockStatus(ctx, off, n)
		if err != nil {
			return nil, c.wrap(b, "status", off, n, err)
		}
		return ext, nil
	}
	return []Extent{{Length: n}}, nil
}

// HasBlockStatus reports whether the node can tell holes from data.
func (c *Child) HasBlockStatus() bool {
	b := c.n()
	_, ok := b.node.(BlockStatuser)
	return ok
}

// CanZero reports whether WriteZeroes can be fast (no data buffer).
func (c *Child) CanZero() bool {
	b := c.n()
	_, ok := b.node.(Zeroer)
	return ok
}

// Flush makes previous writes stable unless the node has cache.no-flush.
func (c *Child) Flush(ctx context.Context) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if c.detached {
		return ErrClosed
	}
	if b.opts.NoFlush() {
		return nil
	}
	return c.wrap(b, "flush", 0, 0, b.node.Flush(ctx))
}

// Cache prefetches a range where the node supports it.
func (c *Child) Cache(ctx context.Context, off, n int64) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if err := c.check(b, "cache", off, n); err != nil {
		return err
	}
	if ch, ok := b.node.(Cacher); ok {
		return c.wrap(b, "cache", off, n, ch.Cache(ctx, off, n))
	}
	return nil
}

// Truncate resizes the node; the edge needs the resize permission.
func (c *Child) Truncate(ctx context.Context, size int64, mode Prealloc) error {
	b := c.enter()
	defer b.gate.RUnlock()
	if c.detached {
		return ErrClosed
	}
	if Perm(c.ioPerm.Load())&PermResize == 0 {
		return &OpError{Op: "truncate", Node: b.name, Off: size, Err: ErrReadOnly}
	}
	if size < 0 {
		return &OpError{Op: "truncate", Node: b.name, Off: size, Err: ErrRange}
	}
	if mode == "" {
		mode = PreallocOff
	}
	if pr, ok := b.node.(PreallocResizer); ok {
		return c.wrap(b, "truncate", size, 0, pr.TruncatePrealloc(ctx, size, mode))
	}
	if mode != PreallocOff {
		return &OpError{Op: "truncate", Node: b.name, Off: size, Err: ErrNotSupported}
	}
	if r, ok := b.node.(Resizer); ok {
		return c.wrap(b, "truncate", size, 0, r.Truncate(ctx, size))
	}
	return &OpError{Op: "truncate", Node: b.name, Off: size, Err: ErrNotSupported}
}

// BlockStatusAbove reports allocation through the whole backing chain the
// way QEMU's NBD server does (bdrv_block_status_above): a range the node
// leaves to its backing file takes the status of the layers below, and
// anything that reads as zeroes without stored data (holes, zero clusters)
// is a hole that reads as zeroes.
func (c *Child) BlockStatusAbove(ctx context.Context, off, n int64) ([]Extent, error) {
	b := c.n()
	ext, err := c.BlockStatus(ctx, off, n)
	if err != nil {
		return nil, err
	}
	back := b.backingChild()
	out := make([]Extent, 0, len(ext))
	pos := off
	for _, e := range ext {
		if e.Flags&ExtentZero != 0 {
			e.Flags = ExtentHole | ExtentZero
		}
		if back == nil || e.Flags&ExtentHole == 0 || e.Flags&ExtentZero != 0 {
			out = appendExtent(out, e)
			pos += e.Length
			continue
		}
		end := pos + e.Length
		for pos < end {
			bsize := back.Size()
			if pos >= bsize {
				out = appendExtent(out, Extent{Length: end - pos, Flags: ExtentHole | ExtentZero})
				pos = end
				break
			}
			sub, err := back.BlockStatusAbove(ctx, pos, min(end, bsize)-pos)
			if err != nil {
				return nil, err
			}
			if len(sub) == 0 {
				return nil, &OpError{Op: "status", Node: back.n().name, Off: pos, Len: end - pos, Err: ErrCorrupt}
			}
			for _, s := range sub {
				out = appendExtent(out, s)
				pos += s.Length
			}
		}
	}
	return out, nil
}

func appendExtent(out []Extent, e Extent) []Extent {
	if e.Length <= 0 {
		return out
	}
	if k := len(out); k > 0 && out[k-1].Flags == e.Flags {
		out[k-1].Length += e.Length
		return out
	}
	return append(out, e)
}
