package nbd

import (
	"runtime"
)

// send encodes r's reply, flushing it at once when flush is set, and
// recycles r. The reader, the writer and a goroutine left serving a
// request after a takeover all send through it.
func (c *conn) send(r *request, flush bool) {
	t := &c.tx
	t.wmu.Lock()
	if t.werr == nil {
		err := c.writeReply(r)
		if err == nil && flush {
			err = t.bw.Flush()
		}
		if err != nil {
			c.writeFailed(err)
		}
	}
	t.wmu.Unlock()
	c.recycle(r)
}

// flush sends the encoded replies.
func (c *conn) flush() {
	t := &c.tx
	t.wmu.Lock()
	if t.werr == nil && t.bw.Buffered() > 0 {
		if err := t.bw.Flush(); err != nil {
			c.writeFailed(err)
		}
	}
	t.wmu.Unlock()
}

// flushUnsent sends the replies the reader encoded itself.
func (c *conn) flushUnsent() {
	c.tx.unsent = false
	c.flush()
}

// writer sends replies, flushing when none is waiting.
func (c *conn) writer() {
	for {
		r, ok := c.nextReply()
		if !ok {
			c.flush()
			return
		}
		c.send(r, false)
	}
}

// nextReply returns the next finished request, flushing the encoded
// replies first when none is waiting; ok is false once replies is closed.
func (c *conn) nextReply() (r *request, ok bool) {
	t := &c.tx
	select {
	case r, ok = <-t.replies:
		return r, ok
	default:
	}
	if t.busy.Load() > 0 {
		// Workers are about to queue more replies: give them a chance so
		// that one write carries several.
		runtime.Gosched()
		select {
		case r, ok = <-t.replies:
			return r, ok
		default:
		}
	}
	c.flush()
	r, ok = <-t.replies
	return r, ok
}

// writeFailed records a write error and disconnects: the reader fails next.
// The caller holds wmu.
func (c *conn) writeFailed(err error) {
	c.tx.werr = err
	c.cancel()
	c.raw.Close()
}

// writeReply encodes one reply.
func (c *conn) writeReply(r *request) error {
	t := &c.tx
	switch {
	case c.mode < modeStructured:
		h := t.whdr[:simpleReplySize]
		be.PutUint32(h[0:], magicSimpleReply)
		be.PutUint32(h[4:], r.errno)
		be.PutUint64(h[8:], r.cookie)
		t.bw.Write(h)
		if r.errno == 0 && r.typ == cmdRead {
			_, err := t.bw.Write(r.buf)
			return err
		}
		return nil
	case r.errno != 0:
		msg := r.msg
		if len(msg) > maxString {
			msg = msg[:maxString]
		}
		hl := c.chunkHeader(r, replyFlagDone, replyTypeError, uint64(6+len(msg)))
		h := t.whdr[:hl+6]
		be.PutUint32(h[hl:], r.errno)
		be.PutUint16(h[hl+4:], uint16(len(msg)))
		t.bw.Write(h)
		_, err := t.bw.WriteString(msg)
		return err
	case len(r.chunks) > 0:
		for i := range r.chunks {
			ch := &r.chunks[i]
			var flags uint16
			if i == len(r.chunks)-1 {
				flags = replyFlagDone
			}
			switch ch.typ {
			case replyTypeOffsetData:
				hl := c.chunkHeader(r, flags, ch.typ, uint64(8+len(ch.data)))
				h := t.whdr[:hl+8]
				be.PutUint64(h[hl:], ch.off)
				t.bw.Write(h)
				t.bw.Write(ch.data)
			case replyTypeOffsetHole:
				hl := c.chunkHeader(r, flags, ch.typ, 12)
				h := t.whdr[:hl+12]
				be.PutUint64(h[hl:], ch.off)
				be.PutUint32(h[hl+8:], ch.hole)
				t.bw.Write(h)
			default: // block status
				hl := c.chunkHeader(r, flags, ch.typ, uint64(len(ch.data)))
				t.bw.Write(t.whdr[:hl])
				t.bw.Write(ch.data)
			}
		}
		return nil
	case c.mode >= modeExtended || r.typ == cmdRead:
		hl := c.chunkHeader(r, replyFlagDone, replyTypeNone, 0)
		_, err := t.bw.Write(t.whdr[:hl])
		return err
	default:
		h := t.whdr[:simpleReplySize]
		be.PutUint32(h[0:], magicSimpleReply)
		be.PutUint32(h[4:], 0)
		be.PutUint64(h[8:], r.cookie)
		_, err := t.bw.Write(h)
		return err
	}
}

// chunkHeader encodes a structured or extended chunk header into the
// writer scratch and returns its length.
func (c *conn) chunkHeader(r *request, flags, typ uint16, length uint64) int {
	h := c.tx.whdr[:]
	if c.mode >= modeExtended {
		be.PutUint32(h[0:], magicExtReply)
		be.PutUint16(h[4:], flags)
		be.PutUint16(h[6:], typ)
		be.PutUint64(h[8:], r.cookie)
		be.PutUint64(h[16:], r.off)
		be.PutUint64(h[24:], length)
		return extReplySize
	}
	be.PutUint32(h[0:], magicStructReply)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], r.cookie)
	be.PutUint32(h[16:], uint32(length))
	return structReplySize
}
