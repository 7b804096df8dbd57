package nbd

import (
	"errors"
	"time"
)

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
