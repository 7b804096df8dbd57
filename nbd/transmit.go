package nbd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"blockd/graph"
	"blockd/internal/bufpool"
)

// The transmission phase runs on three kinds of goroutines per connection
// (and the reader serves small, fast requests itself: see inlineBelow):
//
//   - the reader (the connection's own goroutine, or the one that took
//     over reading from it: see serveInline) reads and validates
//     requests, reads WRITE payloads into pooled buffers and hands each
//     request to a worker, or straight to the writer when it fails
//     validation;
//   - MaxInFlight workers perform the I/O on the node and compose the
//     reply (chunk descriptors, never bytes on the wire);
//   - one writer encodes replies into a buffered writer, flushing whenever
//     no reply is waiting, then recycles the request.
//
// A fixed set of MaxInFlight request structs circulates reader → worker →
// writer → reader through channels with that capacity, so no send ever
// blocks, the reader stops reading when that many requests are in flight,
// and waiting for all of them to come back means all work is done. A reply
// is only queued once its I/O is complete, so no header is ever sent
// before its data is known to be good.

// Small requests that recently took less than inlineBelow to serve are
// served by the reader itself, and their replies are sent when the reader
// finds no more requests waiting: handing such a request to a worker and
// its reply to the writer costs more than the work (two goroutine wake-ups
// and often one more system call), and one write then carries the replies
// of a whole burst. Larger requests, and all of them on a slow node (a
// disk, a network backend), go to the workers, so that one request waiting
// for I/O never holds up the connection.
const (
	inlineMaxLen  = 64 << 10
	inlineBelow   = 20 * time.Microsecond
	takeoverAfter = 2 * time.Millisecond
)

// sparseReadMin is the smallest READ for which block status is consulted
// to send hole chunks; for smaller reads one data chunk is cheaper.
const sparseReadMin = 64 << 10

type txState struct {
	br      *bufio.Reader
	bw      *bufio.Writer
	free    chan *request // idle request structs
	work    chan *request // validated requests for the workers
	replies chan *request // finished requests for the writer
	rhdr    [extRequestSize]byte
	wmu     sync.Mutex   // guards bw, whdr and werr
	whdr    [64]byte     // reply encoding scratch
	werr    error        // first write error
	busy    atomic.Int32 // requests handed to workers and not yet replied
	unsent  bool         // reader only: it encoded replies not yet flushed
	svc     atomic.Int64 // moving average of inlinable requests' service time, ns
	mem     *budget      // this connection's request buffers (MaxConnRequestMemory)

	// Inline service (serveInline).
	active    sync.WaitGroup // workers, and goroutines left serving a request by a takeover
	readDone  chan readResult
	watch     *time.Timer
	armed     atomic.Bool
	epoch     time.Time
	serving   atomic.Int64 // start of the request the reader serves (ns since epoch), or 0
	lastServe int64        // reader only
}

// request is one request and, once handled, its reply.
type request struct {
	typ, flags uint16
	cookie     uint64
	off        uint64
	length     uint64 // effect length (or payload length for WRITE)

	timed  bool  // inlinable but sent to a worker: measure its service time
	charge int64 // bytes taken from the budgets for buf (see reserve)

	bufp *[]byte // pooled buffer (WRITE payload or READ data)
	buf  []byte

	// Reply.
	errno  uint32
	msg    string  // error message (static strings on the I/O path)
	chunks []chunk // structured content chunks, in order
	exts   []graph.Extent
	status []byte // encoded block status payload
}

// chunk is one content or status chunk of a structured reply.
type chunk struct {
	typ  uint16
	off  uint64 // OFFSET_DATA/OFFSET_HOLE: absolute offset
	hole uint32 // OFFSET_HOLE: length
	data []byte // OFFSET_DATA: data; BLOCK_STATUS: payload
}

func (r *request) fail(errno uint32, msg string) {
	r.errno, r.msg = errno, msg
}

// transmit serves requests until the client disconnects or is killed, and
// detaches the connection from its export before closing the socket.
func (c *conn) transmit() {
	n := c.srv.opts.MaxInFlight
	t := &c.tx
	t.br = bufio.NewReaderSize(newReqReader(c), 64<<10)
	t.bw = bufio.NewWriterSize(c.nc, 64<<10)
	t.free = make(chan *request, n)
	t.work = make(chan *request, n)
	t.replies = make(chan *request, n)
	for range n {
		t.free <- &request{}
	}
	t.readDone = make(chan readResult, 1)
	t.mem = newBudget(c.srv.opts.MaxConnRequestMemory, DefaultMaxConnRequestMemory)
	t.epoch = time.Now()
	t.watch = time.AfterFunc(time.Hour, c.watchInline)
	t.watch.Stop()
	defer t.watch.Stop()
	var writer sync.WaitGroup
	t.active.Add(n)
	for range n {
		go func() {
			defer t.active.Done()
			for r := range t.work {
				if r.timed {
					start := time.Now()
					c.handle(r)
					t.observe(time.Since(start))
				} else {
					c.handle(r)
				}
				t.busy.Add(-1)
				t.replies <- r
			}
		}()
	}
	writer.Add(1)
	go func() {
		defer writer.Done()
		c.writer()
	}()

	c.reader()
	res := <-t.readDone // from this goroutine's reader, or the last one after takeovers
	graceful, err := res.graceful, res.err
	// The reader is done, so nothing more is queued for the workers. Once
	// they have finished, the node is no longer used and the client leaves
	// the export, before its socket is closed: a client that has seen the
	// connection end can at once remove the export in safe mode
	// (block-export-del), which refuses while clients are attached. The
	// workers never block on the writer (replies has room for every
	// request), so this does not wait for a client that stopped reading.
	close(t.work)
	t.active.Wait()
	c.srv.detach(c, c.exp)
	if !graceful {
		c.raw.Close() // also unblocks a writer stuck on a dead client
	}
	for range n { // wait until the writer has recycled every request
		<-t.free
	}
	close(t.replies)
	writer.Wait()
	if graceful {
		c.nc.Close() // TLS close_notify, if any
	}
	switch {
	case c.killed.Load():
		c.log.Debug("nbd: client disconnected by the server")
	case err != nil:
		c.log.Warnf("nbd: disconnect client, due to: %v", err)
	default:
		c.log.Debug("nbd: client disconnected")
	}
}

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

// inlinable reports whether r is of a kind the reader may serve itself:
// a small READ or WRITE without FUA, or BLOCK_STATUS.
func (c *conn) inlinable(r *request) bool {
	switch r.typ {
	case cmdRead, cmdWrite:
		return r.length <= inlineMaxLen && r.flags&cmdFlagFUA == 0
	case cmdBlockStatus:
		return true
	}
	return false
}

// observe folds the service time of an inlinable request into the
// connection's moving average (1/4 weight for the new sample). Workers
// and the reader update it without a lock; a lost update only delays the
// switch between inline and worker service by a request.
func (t *txState) observe(d time.Duration) {
	old := t.svc.Load()
	t.svc.Store(old + (int64(d)-old)/4)
}

// errHandedOff ends a readLoop whose goroutine was left serving a request
// while another goroutine took over reading.
var errHandedOff = errors.New("reading handed over")

// serveInline serves r on the reader. A request that takes longer than
// takeoverAfter (a node that has become slow, or a request waiting for
// something) must not hold up the requests behind it: the watch timer
// then starts another goroutine that goes on reading, and serveInline
// returns false once r is done and answered.
func (c *conn) serveInline(r *request) bool {
	t := &c.tx
	start := time.Now()
	s := int64(start.Sub(t.epoch))
	if s <= t.lastServe {
		s = t.lastServe + 1
	}
	t.lastServe = s
	t.serving.Store(s)
	if !t.armed.Load() {
		t.armed.Store(true)
		t.watch.Reset(takeoverAfter)
	}
	c.handle(r)
	t.observe(time.Since(start))
	if !t.serving.CompareAndSwap(s, 0) {
		// Another goroutine reads now; this one only answers.
		c.send(r, true)
		t.active.Done()
		return false
	}
	c.send(r, false)
	t.unsent = true // flushed before the reader next waits for the client
	return true
}

// watchInline runs on the watch timer: if the reader has been serving one
// request for takeoverAfter, another goroutine takes over reading.
func (c *conn) watchInline() {
	t := &c.tx
	t.armed.Store(false)
	s := t.serving.Load()
	if s == 0 {
		return
	}
	if d := takeoverAfter - (time.Since(t.epoch) - time.Duration(s)); d > 0 {
		t.armed.Store(true)
		t.watch.Reset(d)
		return
	}
	if !t.serving.CompareAndSwap(s, 0) {
		return // finished meanwhile
	}
	t.svc.Store(int64(takeoverAfter)) // serve the next requests on workers
	t.active.Add(1)                   // the goroutine left with its request
	go c.reader()
}

// reader runs the read loop and, unless it handed reading over, reports how
// the connection ended.
func (c *conn) reader() {
	graceful, err := c.readLoop()
	if err == errHandedOff {
		return
	}
	if !graceful {
		// A hard disconnect: cancel in-flight work; replies cannot be
		// delivered anyway.
		c.cancel()
	}
	c.tx.readDone <- readResult{graceful, err}
}

type readResult struct {
	graceful bool
	err      error
}

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

// zeroBuf is a read-only buffer of zeroes used to write zeroes on nodes
// without a graph.Zeroer. Nodes must not modify the buffer passed to WriteAt.
var zeroBuf = make([]byte, 1<<20)

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
		err, msg = c.writeAt(r.buf, off, f), "writing to file failed"
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

func (c *conn) readAt(p []byte, off int64) error {
	mt := c.exp.maxTransfer
	for len(p) > 0 {
		k := int(min(int64(len(p)), mt))
		if err := c.exp.node.ReadAt(c.ctx, p[:k], off); err != nil {
			return err
		}
		p, off = p[k:], off+int64(k)
	}
	return nil
}

func (c *conn) writeAt(p []byte, off int64, f graph.ReqFlags) error {
	mt := c.exp.maxTransfer
	for len(p) > 0 {
		k := int(min(int64(len(p)), mt))
		if err := c.exp.node.WriteAt(c.ctx, p[:k], off, f); err != nil {
			return err
		}
		p, off = p[k:], off+int64(k)
	}
	return nil
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
	if err := c.readAt(r.buf, int64(r.off)); err != nil {
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
		if err := c.readAt(ch.data, int64(ch.off)); err != nil {
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
	step := min(int64(len(zeroBuf)), x.maxTransfer)
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

// recycle returns a request to the free list.
func (c *conn) recycle(r *request) {
	r.timed = false
	bufpool.Put(r.bufp)
	r.bufp, r.buf = nil, nil
	if r.charge > 0 { // after Put: the budget bounds the pool's buffers in use
		c.tx.mem.release(r.charge)
		c.srv.mem.release(r.charge)
		r.charge = 0
	}
	r.errno, r.msg = 0, ""
	clear(r.chunks) // drop references to pooled buffers
	r.chunks = r.chunks[:0]
	// Keep small scratch space only: a large block status answer should
	// not stay pinned to an idle request slot.
	if cap(r.exts) > 4096 {
		r.exts = nil
	}
	if cap(r.status) > 64<<10 {
		r.status = nil
	}
	c.tx.free <- r
}

// writer sends replies, flushing when none is waiting.
func (c *conn) writer() {
	t := &c.tx
	for {
		var r *request
		var ok bool
		select {
		case r, ok = <-t.replies:
		default:
			if t.busy.Load() > 0 {
				// Workers are about to queue more replies: give them a
				// chance so that one write carries several.
				runtime.Gosched()
				select {
				case r, ok = <-t.replies:
					goto got
				default:
				}
			}
			c.flush()
			r, ok = <-t.replies
		}
	got:
		if !ok {
			c.flush()
			return
		}
		c.send(r, false)
	}
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
