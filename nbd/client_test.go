package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/graph"
)

// This file holds an in-process NBD client for the tests, written from the
// protocol document independently of the server code, and test nodes.

// startServer starts a server with opts on a loopback TCP listener.
func startServer(t testing.TB, opts Options, exports ...*Export) (*Server, string) {
	t.Helper()
	if opts.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		if testing.Verbose() {
			l.SetOutput(testWriter{t})
			l.SetLevel(logrus.DebugLevel)
		}
		opts.Log = logrus.NewEntry(l)
	}
	s := NewServer(opts)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s, l.Addr().String()
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// tclient is a minimal NBD client.
type tclient struct {
	t      testing.TB
	nc     net.Conn
	r      *bufio.Reader
	wmu    sync.Mutex // serialises request writes
	mode   mode
	size   uint64
	flags  uint16
	cookie uint64

	mu      sync.Mutex // protects pending
	pending map[uint64]pendingReq
}

type pendingReq struct {
	typ         uint16
	off, length uint64
}

func rawDial(t testing.TB, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc
}

func newClient(t testing.TB, nc net.Conn) *tclient {
	return &tclient{t: t, nc: nc, r: bufio.NewReader(nc), pending: map[uint64]pendingReq{}}
}

func (c *tclient) readFull(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *tclient) write(b []byte) {
	c.t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// expectEOF asserts that the server closes the connection (within 5s).
func (c *tclient) expectEOF() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c.r)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isConnReset(err) {
		c.t.Fatalf("expected EOF, got %v (after %d bytes)", err, len(b))
	}
}

func isConnReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && !ne.Timeout()
}

// greet reads the server greeting and sends client flags.
func (c *tclient) greet(cflags uint32) uint16 {
	c.t.Helper()
	g := c.readFull(greetingSize)
	if string(g[:8]) != "NBDMAGIC" || string(g[8:16]) != "IHAVEOPT" {
		c.t.Fatalf("bad greeting %q", g)
	}
	var f [4]byte
	binary.BigEndian.PutUint32(f[:], cflags)
	c.write(f[:])
	if cflags&flagCFixedNewstyle != 0 {
		c.mode = modeSimple
	}
	return binary.BigEndian.Uint16(g[16:])
}

func (c *tclient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b, magicOpts)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	c.write(b)
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *tclient) readOptReply() optReply {
	c.t.Helper()
	h := c.readFull(20)
	if m := binary.BigEndian.Uint64(h); m != magicRep {
		c.t.Fatalf("bad option reply magic 0x%x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.readFull(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// optReplies reads replies up to the final one (ACK or error).
func (c *tclient) optReplies(opt uint32) []optReply {
	c.t.Helper()
	var rs []optReply
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		rs = append(rs, r)
		if r.typ == repAck || r.typ&repErrBit != 0 {
			return rs
		}
	}
}

// option sends an option and returns its replies.
func (c *tclient) option(opt uint32, data []byte) []optReply {
	c.t.Helper()
	c.sendOpt(opt, data)
	return c.optReplies(opt)
}

func (c *tclient) expectFinal(rs []optReply, typ uint32) {
	c.t.Helper()
	if got := rs[len(rs)-1].typ; got != typ {
		c.t.Fatalf("final reply type 0x%x (%q), want 0x%x", got, rs[len(rs)-1].data, typ)
	}
}

func infoPayload(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

func metaPayload(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// infos decodes NBD_REP_INFO replies by type.
func infos(rs []optReply) map[uint16][]byte {
	m := map[uint16][]byte{}
	for _, r := range rs {
		if r.typ == repInfo {
			m[binary.BigEndian.Uint16(r.data)] = r.data[2:]
		}
	}
	return m
}

// goExport sends NBD_OPT_GO and enters transmission on success.
func (c *tclient) goExport(name string, reqs ...uint16) []optReply {
	c.t.Helper()
	rs := c.option(optGo, infoPayload(name, reqs...))
	if rs[len(rs)-1].typ == repAck {
		ex := infos(rs)[infoExport]
		if len(ex) != 10 {
			c.t.Fatalf("NBD_INFO_EXPORT missing or bad: %x", ex)
		}
		c.size = binary.BigEndian.Uint64(ex)
		c.flags = binary.BigEndian.Uint16(ex[8:])
	}
	return rs
}

type features struct {
	structured, extended, meta bool
	blockSize                  bool
	tls                        *tls.Config
}

// connect performs a full handshake to export name.
func connect(t testing.TB, addr, name string, f features) *tclient {
	t.Helper()
	c := newClient(t, rawDial(t, addr))
	c.handshake(name, f)
	return c
}

func (c *tclient) handshake(name string, f features) {
	c.t.Helper()
	c.greet(flagCFixedNewstyle | flagCNoZeroes)
	if f.tls != nil {
		c.expectFinal(c.option(optStartTLS, nil), repAck)
		tc := tls.Client(c.nc, f.tls)
		if err := tc.Handshake(); err != nil {
			c.t.Fatalf("TLS handshake: %v", err)
		}
		c.nc = tc
		c.r = bufio.NewReader(tc)
	}
	if f.extended {
		c.expectFinal(c.option(optExtendedHeaders, nil), repAck)
		c.mode = modeExtended
	} else if f.structured {
		c.expectFinal(c.option(optStructuredReply, nil), repAck)
		c.mode = modeStructured
	}
	if f.meta {
		rs := c.option(optSetMetaContext, metaPayload(name, "base:allocation"))
		c.expectFinal(rs, repAck)
		if len(rs) != 2 || rs[0].typ != repMetaContext || string(rs[0].data[4:]) != "base:allocation" {
			c.t.Fatalf("SET_META_CONTEXT replies %+v", rs)
		}
	}
	var reqs []uint16
	if f.blockSize {
		reqs = append(reqs, infoBlockSize)
	}
	c.expectFinal(c.goExport(name, reqs...), repAck)
}

// Transmission.

type rchunk struct {
	flags, typ uint16
	off        uint64 // extended header offset
	payload    []byte
}

type reply struct {
	cookie uint64
	simple bool
	errno  uint32
	msg    string
	data   []byte // READ: assembled data (holes zero-filled)
	chunks []rchunk
}

// send queues a request and returns its cookie.
func (c *tclient) send(typ, flags uint16, off, length uint64, payload []byte) uint64 {
	c.mu.Lock()
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = pendingReq{typ: typ, off: off, length: length}
	c.mu.Unlock()
	var b []byte
	if c.mode >= modeExtended {
		b = make([]byte, 32, 32+len(payload))
		binary.BigEndian.PutUint32(b, magicExtRequest)
		binary.BigEndian.PutUint64(b[24:], length)
	} else {
		b = make([]byte, 28, 28+len(payload))
		binary.BigEndian.PutUint32(b, magicRequest)
		binary.BigEndian.PutUint32(b[24:], uint32(length))
	}
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	c.write(append(b, payload...))
	return cookie
}

// recvMsg reads one simple reply or one chunk.
func (c *tclient) recvMsg() (cookie uint64, simple bool, errno uint32, ch rchunk, data []byte, err error) {
	var h [32]byte
	if _, err = io.ReadFull(c.r, h[:4]); err != nil {
		return
	}
	switch m := binary.BigEndian.Uint32(h[:]); m {
	case magicSimpleReply:
		if _, err = io.ReadFull(c.r, h[4:16]); err != nil {
			return
		}
		errno = binary.BigEndian.Uint32(h[4:])
		cookie = binary.BigEndian.Uint64(h[8:])
		simple = true
		c.mu.Lock()
		p, ok := c.pending[cookie]
		c.mu.Unlock()
		if !ok {
			err = fmt.Errorf("simple reply for unknown cookie %d", cookie)
			return
		}
		if p.typ == cmdRead && errno == 0 {
			data = make([]byte, p.length)
			_, err = io.ReadFull(c.r, data)
		}
		return
	case magicStructReply, magicExtReply:
		var length uint64
		if m == magicStructReply {
			if _, err = io.ReadFull(c.r, h[4:20]); err != nil {
				return
			}
			length = uint64(binary.BigEndian.Uint32(h[16:]))
		} else {
			if _, err = io.ReadFull(c.r, h[4:32]); err != nil {
				return
			}
			ch.off = binary.BigEndian.Uint64(h[16:])
			length = binary.BigEndian.Uint64(h[24:])
		}
		ch.flags = binary.BigEndian.Uint16(h[4:])
		ch.typ = binary.BigEndian.Uint16(h[6:])
		cookie = binary.BigEndian.Uint64(h[8:])
		if length > 64<<20 {
			err = fmt.Errorf("chunk length %d too large", length)
			return
		}
		ch.payload = make([]byte, length)
		_, err = io.ReadFull(c.r, ch.payload)
		return
	default:
		err = fmt.Errorf("bad reply magic 0x%08x", m)
		return
	}
}

// collector assembles replies from interleaved messages.
type collector struct {
	c       *tclient
	partial map[uint64]*reply
}

// next returns the next complete reply.
func (col *collector) next() (*reply, error) {
	c := col.c
	for {
		cookie, simple, errno, ch, data, err := c.recvMsg()
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		p, ok := c.pending[cookie]
		c.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("reply for unknown cookie %d", cookie)
		}
		if simple {
			if col.partial[cookie] != nil {
				return nil, fmt.Errorf("simple reply after chunks for cookie %d", cookie)
			}
			c.mu.Lock()
			delete(c.pending, cookie)
			c.mu.Unlock()
			return &reply{cookie: cookie, simple: true, errno: errno, data: data}, nil
		}
		r := col.partial[cookie]
		if r == nil {
			r = &reply{cookie: cookie}
			if p.typ == cmdRead {
				r.data = make([]byte, p.length)
			}
			col.partial[cookie] = r
		}
		r.chunks = append(r.chunks, ch)
		if err := r.apply(ch, p); err != nil {
			return nil, err
		}
		if ch.flags&replyFlagDone != 0 {
			delete(col.partial, cookie)
			c.mu.Lock()
			delete(c.pending, cookie)
			c.mu.Unlock()
			return r, nil
		}
	}
}

func (r *reply) apply(ch rchunk, p pendingReq) error {
	pl := ch.payload
	switch ch.typ {
	case replyTypeNone:
		if len(pl) != 0 || ch.flags&replyFlagDone == 0 {
			return errors.New("bad NONE chunk")
		}
	case replyTypeOffsetData, replyTypeOffsetHole:
		if p.typ != cmdRead || len(pl) < 8 {
			return fmt.Errorf("content chunk for a %s", cmdName(p.typ))
		}
		off := binary.BigEndian.Uint64(pl)
		start := off - p.off
		if ch.typ == replyTypeOffsetData {
			if start+uint64(len(pl)-8) > uint64(len(r.data)) || len(pl) == 8 {
				return fmt.Errorf("data chunk out of range: %d+%d", off, len(pl)-8)
			}
			copy(r.data[start:], pl[8:])
		} else {
			if len(pl) != 12 {
				return errors.New("bad hole chunk")
			}
			n := uint64(binary.BigEndian.Uint32(pl[8:]))
			if n == 0 || start+n > uint64(len(r.data)) {
				return fmt.Errorf("hole chunk out of range: %d+%d", off, n)
			}
			clear(r.data[start : start+n])
		}
	case replyTypeError, replyTypeErrorOffset:
		if len(pl) < 6 {
			return errors.New("short error chunk")
		}
		r.errno = binary.BigEndian.Uint32(pl)
		ml := int(binary.BigEndian.Uint16(pl[4:]))
		if 6+ml > len(pl) {
			return errors.New("bad error message length")
		}
		r.msg = string(pl[6 : 6+ml])
	case replyTypeBlockStatus, replyTypeBlockStatusEx:
		if p.typ != cmdBlockStatus {
			return errors.New("block status chunk for another command")
		}
	default:
		return fmt.Errorf("unknown chunk type %d", ch.typ)
	}
	return nil
}

// do sends one request and waits for its reply (no other request may be
// in flight on c).
func (c *tclient) do(typ, flags uint16, off, length uint64, payload []byte) *reply {
	c.t.Helper()
	r, err := c.try(typ, flags, off, length, payload)
	if err != nil {
		c.t.Fatalf("%s %d+%d: %v", cmdName(typ), off, length, err)
	}
	return r
}

func (c *tclient) try(typ, flags uint16, off, length uint64, payload []byte) (*reply, error) {
	c.send(typ, flags, off, length, payload)
	col := &collector{c: c, partial: map[uint64]*reply{}}
	return col.next()
}

// disc sends NBD_CMD_DISC and waits for the server to close.
func (c *tclient) disc() {
	c.t.Helper()
	c.send(cmdDisc, 0, 0, 0, nil)
	c.expectEOF()
}

// extents decodes a block status reply.
func (r *reply) extents(t testing.TB) (id uint32, es []graph.Extent) {
	t.Helper()
	for _, ch := range r.chunks {
		pl := ch.payload
		switch ch.typ {
		case replyTypeBlockStatus:
			id = binary.BigEndian.Uint32(pl)
			for pl = pl[4:]; len(pl) >= 8; pl = pl[8:] {
				es = append(es, graph.Extent{Length: int64(binary.BigEndian.Uint32(pl)), Flags: graph.ExtentFlags(binary.BigEndian.Uint32(pl[4:]))})
			}
			return
		case replyTypeBlockStatusEx:
			id = binary.BigEndian.Uint32(pl)
			n := int(binary.BigEndian.Uint32(pl[4:]))
			pl = pl[8:]
			if len(pl) != 16*n {
				t.Fatalf("BLOCK_STATUS_EXT count %d, payload %d", n, len(pl))
			}
			for ; len(pl) >= 16; pl = pl[16:] {
				es = append(es, graph.Extent{Length: int64(binary.BigEndian.Uint64(pl)), Flags: graph.ExtentFlags(binary.BigEndian.Uint64(pl[8:]))})
			}
			return
		}
	}
	t.Fatalf("no block status chunk in %+v", r.chunks)
	return
}

// Test nodes.

// sparseNode is a MemNode that reports 64 KiB blocks of zeroes as
// holes reading as zero.
type sparseNode struct {
	*graph.MemNode
	mu    sync.Mutex // protects calls
	calls int        // BlockStatus calls
}

const sparseGrain = 64 << 10

func (s *sparseNode) BlockStatus(ctx context.Context, off, n int64) ([]graph.Extent, error) {
	s.mu.Lock()
	s.calls++
	s.mu.Unlock()
	var es []graph.Extent
	end := off + n
	buf := make([]byte, sparseGrain)
	for pos := off; pos < end; {
		next := min((pos/sparseGrain+1)*sparseGrain, end)
		if err := s.ReadAt(ctx, buf[:next-pos], pos); err != nil {
			return nil, err
		}
		var f graph.ExtentFlags
		if allZero(buf[:next-pos]) {
			f = graph.ExtentHole | graph.ExtentZero
		}
		if k := len(es); k > 0 && es[k-1].Flags == f {
			es[k-1].Length += next - pos
		} else {
			es = append(es, graph.Extent{Length: next - pos, Flags: f})
		}
		pos = next
	}
	return es, nil
}

func allZero(b []byte) bool {
	for _, v := range b {
		if v != 0 {
			return false
		}
	}
	return true
}

// plainNode hides every optional capability of the MemNode.
type plainNode struct{ m *graph.MemNode }

func (p plainNode) ReadAt(ctx context.Context, b []byte, off int64) error {
	return p.m.ReadAt(ctx, b, off)
}
func (p plainNode) WriteAt(ctx context.Context, b []byte, off int64, f graph.ReqFlags) error {
	return p.m.WriteAt(ctx, b, off, f)
}
func (p plainNode) Size() int64                     { return p.m.Size() }
func (p plainNode) Flush(ctx context.Context) error { return p.m.Flush(ctx) }
func (p plainNode) Close() error                    { return nil }

// limitNode adds graph.Limits to a MemNode.
type limitNode struct {
	*graph.MemNode
	lim graph.Limits
}

func (l limitNode) Limits() graph.Limits { return l.lim }

// faultNode fails or blocks requests touching configured ranges.
type faultNode struct {
	*graph.MemNode
	failAt  int64 // requests covering this offset fail with failErr
	failErr error
	block   chan struct{} // when non-nil, ReadAt blocks until ctx is done or block closes
	entered chan struct{} // receives one value per blocked ReadAt
	mu      sync.Mutex
	ctxErrs []error // ctx.Err() seen by blocked calls when they returned
	flushes int
	maxSeen int
}

func (f *faultNode) hits(off, n int64) bool {
	return f.failErr != nil && off <= f.failAt && f.failAt < off+n
}

func (f *faultNode) ReadAt(ctx context.Context, p []byte, off int64) error {
	f.mu.Lock()
	f.maxSeen = max(f.maxSeen, len(p))
	f.mu.Unlock()
	if f.block != nil {
		f.entered <- struct{}{}
		select {
		case <-ctx.Done():
		case <-f.block:
		}
		f.mu.Lock()
		f.ctxErrs = append(f.ctxErrs, ctx.Err())
		f.mu.Unlock()
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	if f.hits(off, int64(len(p))) {
		return f.failErr
	}
	return f.MemNode.ReadAt(ctx, p, off)
}

func (f *faultNode) WriteAt(ctx context.Context, p []byte, off int64, fl graph.ReqFlags) error {
	f.mu.Lock()
	f.maxSeen = max(f.maxSeen, len(p))
	f.mu.Unlock()
	if f.hits(off, int64(len(p))) {
		return f.failErr
	}
	return f.MemNode.WriteAt(ctx, p, off, fl)
}

func (f *faultNode) Flush(ctx context.Context) error {
	f.mu.Lock()
	f.flushes++
	f.mu.Unlock()
	return nil
}

func (f *faultNode) Limits() graph.Limits { return graph.Limits{MaxTransfer: 64 << 10} }

func bufioReader(r io.Reader) *bufio.Reader { return bufio.NewReader(r) }
