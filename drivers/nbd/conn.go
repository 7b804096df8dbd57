package nbd

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"blockd/graph"
)

// conn is one connection in transmission phase. Requests are written by
// their callers, one at a time under wmu; one reader goroutine (readLoop)
// reads every reply and hands it to the waiting caller by cookie. The
// reader is the only one that completes requests, also when the
// connection ends, so a caller's buffer is never written after its call
// returned.
type conn struct {
	nc   net.Conn
	br   *bufio.Reader
	info exportInfo

	// free holds the indexes of unused slots; taking one bounds the
	// requests in flight.
	free  chan int
	slots [maxInFlight]slot

	// wmu serialises writing requests to nc; it guards hdr, vecArr and
	// vec.
	wmu    sync.Mutex
	hdr    [requestSize]byte
	vecArr [2][]byte
	vec    net.Buffers

	// mu guards the slots' cookie and completed fields, seq and dead.
	mu   sync.Mutex
	seq  uint32
	dead *connError // why the connection ended; set once by the reader

	// scratch is the reader's buffer for chunk payloads (block status,
	// error messages), rhdr for reply headers; only the reader uses them.
	scratch []byte
	rhdr    [structReplySize]byte
	// onDead is called by the reader once the connection has ended and
	// every request on it has been completed.
	onDead func(c *conn, err error)
	done   chan struct{} // closed when the reader has returned
}

// slot is one request in flight. The fields below cookie are the
// reader's while the request is in flight and the caller's otherwise.
type slot struct {
	cookie    uint64 // 0: free (guarded by conn.mu)
	completed bool   // guarded by conn.mu
	cmd       uint16
	off       uint64
	n         uint32
	buf       []byte         // READ: where the data goes
	ext       []graph.Extent // BLOCK_STATUS: the answer
	got       int64          // READ: bytes received
	gotStatus bool
	err       error         // the server's error or the connection's
	done      chan struct{} // signalled once when the reply is complete
}

func newConn(nc net.Conn, br *bufio.Reader, info exportInfo, onDead func(*conn, error)) *conn {
	c := &conn{nc: nc, br: br, info: info, free: make(chan int, maxInFlight), onDead: onDead, done: make(chan struct{})}
	for i := range c.slots {
		c.slots[i].done = make(chan struct{}, 1)
		c.free <- i
	}
	return c
}

// request is what a caller asks for.
type request struct {
	cmd   uint16
	flags uint16
	off   uint64
	n     uint32
	data  []byte // WRITE payload
	buf   []byte // READ destination (len n)
}

// do sends r and waits for its reply. Block status extents are appended to
// ext. A connection failure returns a *connError or a *protocolError.
// The call waits for the reply even if the caller's context ends: NBD
// cannot cancel a request, and a READ's buffer belongs to the connection
// until the reply is in (closing the node ends every request).
func (c *conn) do(r *request, ext []graph.Extent) ([]graph.Extent, error) {
	idx := <-c.free
	s := &c.slots[idx]
	c.mu.Lock()
	if c.dead != nil {
		err := c.dead
		c.mu.Unlock()
		c.free <- idx
		return ext, err
	}
	c.seq++
	cookie := uint64(c.seq)<<32 | uint64(idx+1)
	s.cookie, s.completed = cookie, false
	s.cmd, s.off, s.n, s.buf, s.ext = r.cmd, r.off, r.n, r.buf, ext
	s.got, s.gotStatus, s.err = 0, false, nil
	c.mu.Unlock()

	c.wmu.Lock()
	h := c.hdr[:]
	binary.BigEndian.PutUint32(h[0:], magicRequest)
	binary.BigEndian.PutUint16(h[4:], r.flags)
	binary.BigEndian.PutUint16(h[6:], r.cmd)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint64(h[16:], r.off)
	binary.BigEndian.PutUint32(h[24:], r.n)
	var err error
	if r.data != nil {
		c.vecArr = [2][]byte{h, r.data}
		c.vec = c.vecArr[:]
		_, err = c.vec.WriteTo(c.nc)
		c.vecArr = [2][]byte{}
	} else {
		_, err = c.nc.Write(h)
	}
	c.wmu.Unlock()
	if err != nil {
		// The reader sees the closed socket and fails every request,
		// this one included.
		c.nc.Close()
	}
	<-s.done
	err, ext = s.err, s.ext
	s.buf, s.ext = nil, nil
	c.mu.Lock()
	s.cookie = 0
	c.mu.Unlock()
	c.free <- idx
	return ext, err
}

// close ends the connection; the reader fails what is in flight.
func (c *conn) close() { c.nc.Close() }

// disconnect sends NBD_CMD_DISC (a courtesy to the server) unless a
// request is being written (a server that stopped reading must not block
// the close), and closes.
func (c *conn) disconnect() {
	if c.wmu.TryLock() {
		h := c.hdr[:]
		clear(h)
		binary.BigEndian.PutUint32(h[0:], magicRequest)
		binary.BigEndian.PutUint16(h[6:], cmdDisc)
		_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.nc.Write(h)
		c.wmu.Unlock()
	}
	c.nc.Close()
}

// readLoop reads replies until the connection fails, then completes
// every request still in flight with the failure.
func (c *conn) readLoop() {
	defer close(c.done)
	var err error
	for err == nil {
		err = c.readReply()
	}
	c.nc.Close()
	dead := &connError{cause: err}
	c.mu.Lock()
	c.dead = dead
	for i := range c.slots {
		s := &c.slots[i]
		if s.cookie != 0 && !s.completed {
			s.completed = true
			s.err = dead
			s.done <- struct{}{}
		}
	}
	c.mu.Unlock()
	if c.onDead != nil {
		c.onDead(c, err)
	}
}

// lookup returns the slot in flight with cookie.
func (c *conn) lookup(cookie uint64) *slot {
	idx := cookie&0xffffffff - 1
	if idx >= maxInFlight {
		return nil
	}
	s := &c.slots[idx]
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.cookie != cookie || s.completed {
		return nil
	}
	return s
}

// complete hands a finished slot back to its caller.
func (c *conn) complete(s *slot) {
	c.mu.Lock()
	s.completed = true
	c.mu.Unlock()
	s.done <- struct{}{}
}

func (c *conn) readFull(b []byte) error {
	_, err := io.ReadFull(c.br, b)
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// readReply reads one simple reply or structured chunk. An error ends the
// connection: I/O errors as they come, malformed replies as a
// *protocolError.
func (c *conn) readReply() error {
	h := c.rhdr[:]
	if _, err := io.ReadFull(c.br, h[:4]); err != nil {
		return err
	}
	switch binary.BigEndian.Uint32(h) {
	case magicSimpleReply:
		if err := c.readFull(h[4:simpleReplySize]); err != nil {
			return err
		}
		return c.simpleReply(binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:]))
	case magicStructReply:
		if !c.info.structured {
			return protoErrorf("unexpected structured reply")
		}
		if err := c.readFull(h[4:structReplySize]); err != nil {
			return err
		}
		return c.chunk(binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]),
			binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[16:]))
	default:
		return protoErrorf("invalid reply magic 0x%x", binary.BigEndian.Uint32(h))
	}
}

func (c *conn) simpleReply(errno uint32, cookie uint64) error {
	s := c.lookup(cookie)
	if s == nil {
		return protoErrorf("unexpected cookie value 0x%x", cookie)
	}
	if c.info.structured && (s.cmd == cmdRead || s.cmd == cmdBlockStatus) {
		return protoErrorf("simple reply when structured reply chunk was expected")
	}
	if errno != 0 {
		s.err = &Error{Errno: errnoFromWire(errno)}
	} else if s.cmd == cmdRead {
		if err := c.readFull(s.buf); err != nil {
			return err
		}
	} else if s.cmd == cmdBlockStatus {
		return protoErrorf("simple reply to block status")
	}
	c.complete(s)
	return nil
}

// payload reads a chunk's payload of n bytes into the scratch buffer.
func (c *conn) payload(n uint32) ([]byte, error) {
	if n > maxChunkPayload {
		return nil, protoErrorf("chunk payload of %d bytes is too long", n)
	}
	if cap(c.scratch) < int(n) {
		c.scratch = make([]byte, n)
	}
	b := c.scratch[:n]
	return b, c.readFull(b)
}

func (c *conn) chunk(flags, typ uint16, cookie uint64, n uint32) error {
	s := c.lookup(cookie)
	if s == nil {
		return protoErrorf("unexpected cookie value 0x%x", cookie)
	}
	switch {
	case typ == replyTypeNone:
		if flags&replyFlagDone == 0 || n != 0 {
			return protoErrorf("NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE or with a payload")
		}
	case typ == replyTypeOffsetData:
		if s.cmd != cmdRead {
			return protoErrorf("unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk")
		}
		if n <= 8 {
			return protoErrorf("invalid payload for NBD_REPLY_TYPE_OFFSET_DATA")
		}
		ob := c.rhdr[:8] // the header has been decoded
		if err := c.readFull(ob); err != nil {
			return err
		}
		off, size := binary.BigEndian.Uint64(ob), uint64(n-8)
		if off < s.off || size > uint64(s.n) || off-s.off > uint64(s.n)-size {
			return protoErrorf("server sent chunk exceeding requested region")
		}
		if err := c.readFull(s.buf[off-s.off : off-s.off+size]); err != nil {
			return err
		}
		s.got += int64(size)
	case typ == replyTypeOffsetHole:
		if s.cmd != cmdRead || n != 12 {
			return protoErrorf("invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE")
		}
		b, err := c.payload(n)
		if err != nil {
			return err
		}
		off, size := binary.BigEndian.Uint64(b), uint64(binary.BigEndian.Uint32(b[8:]))
		if size == 0 || off < s.off || size > uint64(s.n) || off-s.off > uint64(s.n)-size {
			return protoErrorf("server sent chunk exceeding requested region")
		}
		clear(s.buf[off-s.off : off-s.off+size])
		s.got += int64(size)
	case typ == replyTypeBlockStatus:
		if s.cmd != cmdBlockStatus || !c.info.baseAlloc {
			return protoErrorf("unexpected NBD_REPLY_TYPE_BLOCK_STATUS chunk")
		}
		if n < 12 || (n-4)%8 != 0 {
			return protoErrorf("invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
		}
		b, err := c.payload(n)
		if err != nil {
			return err
		}
		if id := binary.BigEndian.Uint32(b); id != c.info.ctxID {
			return protoErrorf("unexpected context id %d for NBD_REPLY_TYPE_BLOCK_STATUS, when negotiated context id is %d", id, c.info.ctxID)
		}
		if s.gotStatus {
			return protoErrorf("more than one NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context")
		}
		s.gotStatus = true
		s.ext = appendExtents(s.ext, b[4:], int64(s.n))
		if len(s.ext) == 0 {
			return protoErrorf("server sent status chunk with zero length")
		}
	case typ&replyTypeErrBit != 0:
		if n < 6 {
			return protoErrorf("invalid payload for structured error")
		}
		b, err := c.payload(n)
		if err != nil {
			return err
		}
		errno := binary.BigEndian.Uint32(b)
		if errno == 0 {
			return protoErrorf("server sent structured error chunk with error = 0")
		}
		ml := uint32(binary.BigEndian.Uint16(b[4:]))
		if ml > n-6 || (typ == replyTypeErrorOffset && n-6-ml != 8) {
			return protoErrorf("server sent structured error chunk with incorrect message size")
		}
		if s.err == nil {
			s.err = &Error{Errno: errnoFromWire(errno), Msg: printable(b[6 : 6+ml])}
		}
	default:
		return protoErrorf("unexpected reply type %d", typ)
	}
	if flags&replyFlagDone == 0 {
		return nil
	}
	if s.err == nil {
		switch {
		case s.cmd == cmdRead && s.got != int64(s.n):
			return protoErrorf("server sent %d bytes for a read of %d", s.got, s.n)
		case s.cmd == cmdBlockStatus && !s.gotStatus:
			return protoErrorf("server sent no block status")
		}
	}
	c.complete(s)
	return nil
}

// appendExtents decodes base:allocation descriptors, stopping at the
// request's length (a server may describe more; it must not, but that is
// harmless) and at the first zero-length descriptor.
func appendExtents(ext []graph.Extent, b []byte, limit int64) []graph.Extent {
	var total int64
	for ; len(b) >= 8 && total < limit; b = b[8:] {
		l := int64(binary.BigEndian.Uint32(b))
		if l == 0 {
			break
		}
		l = min(l, limit-total)
		f := binary.BigEndian.Uint32(b[4:])
		var fl graph.ExtentFlags
		switch {
		case f&stateHole != 0:
			fl = graph.ExtentHole
			if f&stateZero != 0 {
				fl |= graph.ExtentZero
			}
		case f&stateZero != 0:
			fl = graph.ExtentZero | graph.ExtentData
		}
		if n := len(ext); n > 0 && ext[n-1].Flags == fl {
			ext[n-1].Length += l
		} else {
			ext = append(ext, graph.Extent{Length: l, Flags: fl})
		}
		total += l
	}
	return ext
}

// verifyChain checks the server's certificate chain against roots without
// a host name (QEMU does not check one when it has none).
func verifyChain(cs tls.ConnectionState, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server sent no certificate")
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: x509.NewCertPool()}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(opts)
	return err
}
