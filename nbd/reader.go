package nbd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"blockd/internal/bufpool"
)

// readLoop reads requests until NBD_CMD_DISC (graceful), or an error.
func (c *conn) readLoop() (graceful bool, err error) {
	t := &c.tx
	ext := c.mode >= modeExtended
	hl, magic := requestSize, uint32(magicRequest)
	if ext {
		hl, magic = extRequestSize, magicExtRequest
	}
	for {
		r := <-t.free
		h := t.rhdr[:hl]
		if _, err := io.ReadFull(t.br, h); err != nil {
			t.free <- r
			if err == io.EOF {
				return false, nil // hung up between requests
			}
			return false, err
		}
		r.flags, r.typ = be.Uint16(h[4:]), be.Uint16(h[6:])
		r.cookie, r.off = be.Uint64(h[8:]), be.Uint64(h[16:])
		if ext {
			r.length = be.Uint64(h[24:])
		} else {
			r.length = uint64(be.Uint32(h[24:]))
		}
		if m := be.Uint32(h); m != magic {
			// As QEMU: EINVAL to the cookie where a request has it, then
			// disconnect, as the stream cannot be trusted to be in sync.
			r.fail(errInval, fmt.Sprintf("invalid magic (got 0x%x)", m))
			t.replies <- r
			return true, fmt.Errorf("invalid magic (got 0x%08x, expected 0x%08x)", m, magic)
		}
		if r.typ == cmdDisc {
			t.free <- r
			return true, nil
		}

		var payload uint64
		if r.typ == cmdWrite || (ext && r.flags&cmdFlagPayloadLen != 0) {
			payload = r.length
		}
		if payload > maxPayload {
			// The payload cannot be buffered: answer, then disconnect
			// rather than lose sync.
			r.fail(errInval, "payload too large")
			t.replies <- r
			return true, fmt.Errorf("%s payload of %d bytes is larger than max len (%d)", cmdName(r.typ), payload, maxPayload)
		}
		if payload > 0 {
			if r.typ == cmdWrite {
				if err := c.reserve(r, int(payload)); err != nil {
					t.free <- r
					return false, err
				}
				r.bufp = bufpool.Get(int(payload))
				r.buf = *r.bufp
				if _, err := io.ReadFull(t.br, r.buf); err != nil {
					c.recycle(r)
					return false, err
				}
			} else {
				// Only WRITE carries a payload here; consume it to stay in
				// sync and fail the request on its flag below.
				if _, err := io.CopyN(io.Discard, t.br, int64(payload)); err != nil {
					t.free <- r
					return false, err
				}
				r.length = 0
			}
		}
		if errno, msg := c.validate(r); errno != 0 {
			r.fail(errno, msg)
			t.replies <- r
			continue
		}
		if r.typ == cmdRead && r.length > 0 {
			if err := c.reserve(r, int(r.length)); err != nil {
				t.free <- r
				return false, err
			}
		}
		if c.inlinable(r) {
			if time.Duration(t.svc.Load()) < inlineBelow {
				if !c.serveInline(r) {
					return false, errHandedOff
				}
				continue
			}
			r.timed = true
		}
		t.busy.Add(1)
		t.work <- r
	}
}

// reserve takes the memory for r's buffer of n bytes from the connection's
// budget and the server's, waiting for it if need be: the reader then
// reads nothing more, which holds the client back. Replies the reader
// encoded itself are sent before it waits, as the client may be waiting
// for them.
func (c *conn) reserve(r *request, n int) error {
	t := &c.tx
	k := int64(bufpool.Cap(n))
	for _, b := range [...]*budget{t.mem, c.srv.mem} {
		if b.tryAcquire(k) {
			continue
		}
		if t.unsent {
			c.flushUnsent()
		}
		if err := b.acquire(c.ctx, k); err != nil {
			if b != t.mem {
				t.mem.release(k)
			}
			return fmt.Errorf("waiting for request memory: %w", err)
		}
	}
	r.charge = k
	return nil
}

// reqReader is what the reader's bufio.Reader reads from. Replies the
// reader served itself are flushed only when no further request bytes are
// waiting on the socket: a burst of requests is answered with one write,
// and a client waiting for its replies before sending more is never kept
// waiting. Looking costs a read system call that finds nothing when the
// client sends one request at a time, so after two such misses in a row
// the reader only looks again every 16th time.
type reqReader struct {
	c      *conn
	rc     syscall.RawConn // nil when the connection is TLS
	misses int

	// State of one rc.Read call (fn is rr.rawRead, bound once so that a
	// read does not allocate).
	fn   func(fd uintptr) bool
	p    []byte
	n    int
	serr error
	wait bool
}

func newReqReader(c *conn) *reqReader {
	rr := &reqReader{c: c}
	if sc, ok := c.nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			rr.rc = rc
			rr.fn = rr.rawRead
		}
	}
	return rr
}

func (rr *reqReader) Read(p []byte) (int, error) {
	c := rr.c
	if !c.tx.unsent {
		return rr.read(p, true)
	}
	if rr.rc != nil {
		if rr.misses < 2 || rr.misses%16 == 0 {
			n, err := rr.read(p, false)
			if n > 0 || err != errWouldBlock {
				rr.misses = 0
				return n, err
			}
		}
		// Counted also when not looking, or the reader would never look
		// again after two misses.
		rr.misses++
	}
	c.flushUnsent()
	return rr.read(p, true)
}

var errWouldBlock = errors.New("would block")

// read reads from the socket, waiting for data when wait is set, or
// returning errWouldBlock at once when there is none.
func (rr *reqReader) read(p []byte, wait bool) (int, error) {
	if rr.rc == nil {
		return rr.c.nc.Read(p)
	}
	rr.p, rr.wait = p, wait
	err := rr.rc.Read(rr.fn)
	n, serr := rr.n, rr.serr
	rr.p, rr.serr = nil, nil
	switch {
	case err != nil:
		return 0, err
	case serr == syscall.EAGAIN:
		return 0, errWouldBlock
	case serr != nil:
		return 0, os.NewSyscallError("read", serr)
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}

func (rr *reqReader) rawRead(fd uintptr) bool {
	for {
		rr.n, rr.serr = syscall.Read(int(fd), rr.p)
		if rr.serr != syscall.EINTR {
			break
		}
	}
	return !rr.wait || rr.serr != syscall.EAGAIN
}

// validate checks a request against the export and the negotiation. The
// error messages are only built on failure.
func (c *conn) validate(r *request) (uint32, string) {
	x := c.exp
	valid := uint16(cmdFlagFUA)
	checkLen, checkRO := false, false
	switch r.typ {
	case cmdRead:
		if c.mode >= modeStructured {
			valid |= cmdFlagDF
		}
		checkLen = true
	case cmdWrite:
		if c.mode >= modeExtended {
			valid |= cmdFlagPayloadLen
		}
		checkRO = true
	case cmdFlush:
	case cmdTrim:
		checkRO = true
	case cmdCache:
		checkLen = true
	case cmdWriteZeroes:
		valid |= cmdFlagNoHole | cmdFlagFastZero
		checkRO = true
	case cmdBlockStatus:
		valid |= cmdFlagReqOne
	default:
		return errInval, fmt.Sprintf("invalid request type (%d) received", r.typ)
	}
	if checkLen && r.length > maxPayload {
		return errInval, fmt.Sprintf("len (%d) is larger than max len (%d)", r.length, maxPayload)
	}
	if checkRO && x.ro {
		return errPerm, "export is read-only"
	}
	if r.off > c.size || r.length > c.size-r.off {
		errno := uint32(errInval)
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			errno = errNoSpc
		}
		return errno, fmt.Sprintf("operation past EOF; From: %d, Len: %d, Size: %d", r.off, r.length, c.size)
	}
	if a := c.checkAlign; a > 1 && r.typ != cmdFlush &&
		(r.off%a != 0 || (r.length%a != 0 && r.off+r.length != c.size)) {
		return errInval, fmt.Sprintf("request not aligned to %d bytes; From: %d, Len: %d", a, r.off, r.length)
	}
	if r.flags&^valid != 0 {
		return errInval, fmt.Sprintf("unsupported flags for command %s (got 0x%x)", cmdName(r.typ), r.flags)
	}
	if r.typ == cmdBlockStatus {
		if !c.metaBase {
			return errInval, "CMD_BLOCK_STATUS not negotiated"
		}
		if r.length == 0 {
			return errInval, "need non-zero length"
		}
	}
	return 0, ""
}
