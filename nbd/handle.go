package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"math"

	"blockd/graph"
	"blockd/internal/bufpool"
)

// sparseReadMin is the smallest READ for which block status is consulted
// to send hole chunks; for smaller reads one data chunk is cheaper.
const sparseReadMin = 64 << 10

// zeroBuf is a read-only buffer of zeroes used to write zeroes on nodes
// without a graph.Zeroer. Nodes must not modify the buffer passed to WriteAt.
var zeroBuf = make([]byte, 1<<20)

// handle performs a validated request on the node (on a worker).
func (c *conn) handle(r *request) {
	x, ctx := c.exp, c.ctx
	off := int64(r.off)
	var err error
	var msg string
	switch r.typ {
	case cmdRead:
		err, msg = c.read(r), "reading from file failed"
	case cmdWrite:
		var f graph.ReqFlags
		if r.flags&cmdFlagFUA != 0 {
			f = graph.FUA
		}
		err, msg = c.exp.node.WriteAt(c.ctx, r.buf, off, f), "writing to file failed"
	case cmdFlush:
		err, msg = x.node.Flush(ctx), "flush failed"
	case cmdTrim:
		err, msg = c.trim(r), "discard failed"
	case cmdWriteZeroes:
		err, msg = c.zero(r), "writing to file failed"
	case cmdCache:
		if x.cacher != nil {
			err, msg = x.cacher.Cache(ctx, off, int64(r.length)), "caching data failed"
		}
	case cmdBlockStatus:
		err, msg = c.blockStatus(r), "can't get block status"
	}
	if err != nil {
		r.chunks = r.chunks[:0]
		r.fail(nbdErrno(err), msg)
		if c.ctx.Err() == nil {
			c.log.Debugf("nbd: %s at %d+%d failed: %v", cmdName(r.typ), r.off, r.length, err)
		}
	}
}

// read fills r.buf and describes the reply: one data chunk, or data and
// hole chunks following block status for large structured reads.
func (c *conn) read(r *request) error {
	x := c.exp
	if r.flags&cmdFlagFUA != 0 {
		if err := x.node.Flush(c.ctx); err != nil {
			return err
		}
	}
	n := int(r.length)
	if n == 0 {
		return nil
	}
	r.bufp = bufpool.Get(n)
	r.buf = *r.bufp
	if c.mode >= modeStructured && r.flags&cmdFlagDF == 0 && x.bs != nil && n >= sparseReadMin {
		return c.sparseRead(r)
	}
	if err := c.exp.node.ReadAt(c.ctx, r.buf, int64(r.off)); err != nil {
		return err
	}
	if c.mode >= modeStructured {
		if r.flags&cmdFlagDF == 0 && n <= len(zeroBuf) && bytes.Equal(r.buf, zeroBuf[:n]) {
			// Zeroes go as a hole chunk, without payload (smaller reads
			// do not ask block status first, but the answer is the same).
			r.chunks = append(r.chunks[:0], chunk{typ: replyTypeOffsetHole, off: r.off, hole: uint32(n)})
			return nil
		}
		r.chunks = append(r.chunks[:0], chunk{typ: replyTypeOffsetData, off: r.off, data: r.buf})
	}
	return nil
}

// addRun appends a data or hole run to r.chunks, merging with the last one.
func (r *request) addRun(hole bool, off uint64, n uint64) {
	typ := uint16(replyTypeOffsetData)
	if hole {
		typ = replyTypeOffsetHole
	}
	if k := len(r.chunks); k > 0 {
		last := &r.chunks[k-1]
		if last.typ == typ {
			last.hole += uint32(n)
			return
		}
	}
	r.chunks = append(r.chunks, chunk{typ: typ, off: off, hole: uint32(n)})
}

func (c *conn) sparseRead(r *request) error {
	x := c.exp
	r.chunks = r.chunks[:0]
	pos, end := int64(r.off), int64(r.off+r.length)
	for pos < end {
		exts, err := x.bs.BlockStatus(c.ctx, pos, end-pos)
		if err != nil || len(exts) == 0 {
			break // read the rest as data
		}
		progress := false
		for _, e := range exts {
			l := min(e.Length, end-pos)
			if l <= 0 {
				break
			}
			r.addRun(e.Flags&graph.ExtentZero != 0, uint64(pos), uint64(l))
			pos += l
			progress = true
			if pos >= end {
				break
			}
		}
		if !progress {
			break
		}
	}
	if pos < end {
		r.addRun(false, uint64(pos), uint64(end-pos))
	}
	// Read the data runs; the hole runs are never read.
	for i := range r.chunks {
		ch := &r.chunks[i]
		if ch.typ != replyTypeOffsetData {
			continue
		}
		rel := ch.off - r.off
		ch.data = r.buf[rel : rel+uint64(ch.hole)]
		ch.hole = 0
		if err := c.exp.node.ReadAt(c.ctx, ch.data, int64(ch.off)); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) trim(r *request) error {
	x := c.exp
	if x.discarder != nil {
		err := x.discarder.Discard(c.ctx, int64(r.off), int64(r.length))
		if err != nil && !errors.Is(err, graph.ErrNotSupported) {
			return err
		}
	}
	if r.flags&cmdFlagFUA != 0 {
		return x.node.Flush(c.ctx)
	}
	return nil
}

func (c *conn) zero(r *request) error {
	x := c.exp
	var f graph.ReqFlags
	if r.flags&cmdFlagFUA != 0 {
		f |= graph.FUA
	}
	if r.flags&cmdFlagNoHole == 0 {
		f |= graph.MayUnmap
	}
	if r.flags&cmdFlagFastZero != 0 {
		f |= graph.NoFallback
	}
	off, n := int64(r.off), int64(r.length)
	if x.zeroer != nil {
		err := x.zeroer.WriteZeroes(c.ctx, off, n, f)
		if err == nil || f&graph.NoFallback != 0 || !errors.Is(err, graph.ErrNotSupported) {
			return err
		}
	} else if f&graph.NoFallback != 0 {
		return graph.ErrNotSupported
	}
	// No fast path: write zero buffers.
	step := int64(len(zeroBuf))
	for n > 0 {
		k := min(n, step)
		if err := x.node.WriteAt(c.ctx, zeroBuf[:k], off, f&graph.FUA); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func nbdState(f graph.ExtentFlags) uint32 {
	var s uint32
	if f&graph.ExtentHole != 0 {
		s |= stateHole
	}
	if f&graph.ExtentZero != 0 {
		s |= stateZero
	}
	return s
}

// blockStatus answers base:allocation for the request range. Nodes
// without graph.BlockStatuser report everything as allocated data.
func (c *conn) blockStatus(r *request) error {
	x := c.exp
	ext := c.mode >= modeExtended
	reqOne := r.flags&cmdFlagReqOne != 0
	pos, end := int64(r.off), int64(r.off+r.length)
	es := r.exts[:0]
	if x.bs == nil {
		es = append(es, graph.Extent{Length: end - pos})
	}
	for x.bs != nil && pos < end && len(es) < maxExtents {
		got, err := x.bs.BlockStatus(c.ctx, pos, end-pos)
		if err != nil {
			if len(es) > 0 {
				break
			}
			return err
		}
		progress := false
		for _, e := range got {
			l := min(e.Length, end-pos)
			if l <= 0 {
				break
			}
			k := len(es)
			if k > 0 && nbdState(es[k-1].Flags) == nbdState(e.Flags) &&
				(ext || es[k-1].Length+l <= math.MaxUint32) {
				es[k-1].Length += l
			} else if reqOne && k > 0 || k >= maxExtents {
				pos = end // done
				break
			} else {
				es = append(es, graph.Extent{Length: l, Flags: e.Flags})
			}
			pos += l
			progress = true
		}
		if !progress {
			if len(es) > 0 {
				break
			}
			return fmt.Errorf("block status made no progress at %d: %w", pos, graph.ErrCorrupt)
		}
		if reqOne {
			break
		}
	}
	r.exts = es

	b := r.status[:0]
	typ := uint16(replyTypeBlockStatus)
	if ext {
		typ = replyTypeBlockStatusEx
		b = be.AppendUint32(b, metaIDBaseAllocation)
		b = be.AppendUint32(b, uint32(len(es)))
		for _, e := range es {
			b = be.AppendUint64(b, uint64(e.Length))
			b = be.AppendUint64(b, uint64(nbdState(e.Flags)))
		}
	} else {
		b = be.AppendUint32(b, metaIDBaseAllocation)
		for _, e := range es {
			b = be.AppendUint32(b, uint32(e.Length))
			b = be.AppendUint32(b, nbdState(e.Flags))
		}
	}
	r.status = b
	r.chunks = append(r.chunks[:0], chunk{typ: typ, data: b})
	return nil
}
