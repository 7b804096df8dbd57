package nbd

import (
	"bufio"
	"sync"
	"sync/atomic"
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
//
// Files: transmit.go (the connection's state and its life), reader.go
// (reading and validating requests, the memory budget), inline.go (serving
// on the reader and handing reading over), handle.go (a request's I/O on
// the node), reply.go (encoding and sending replies, the writer).

// txState is a connection's transmission state.
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
