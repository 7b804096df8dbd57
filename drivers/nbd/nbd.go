// Package nbd is the nbd protocol driver: a node whose data is an export
// of an NBD server (another blockd, qemu-storage-daemon, qemu-nbd,
// nbdkit), with QEMU 7.2's BlockdevOptionsNbd and its behaviour: fixed
// newstyle negotiation with NBD_OPT_GO (NBD_OPT_EXPORT_NAME for servers
// without it), block sizes, structured replies, base:allocation block
// status, STARTTLS with tls-creds-x509, and reconnection after the
// connection drops (reconnect-delay) or at open (open-timeout).
//
// One connection carries up to 16 requests: callers write their requests
// under a mutex, one reader goroutine per connection reads the replies and
// hands each to its caller by cookie (conn.go). A reply the client cannot
// make sense of ends the connection for good, failing what is in flight
// with EIO.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"blockd/graph"
	"blockd/internal/qapi"
)

// Driver returns the nbd driver.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:     "nbd",
		Protocol: true,
		Options:  func() any { return new(Options) },
		Open:     open,
	}
}

// Reconnection backoff, as QEMU's connect thread: the first attempt at
// once, then after 1 s, doubling up to 16 s.
var (
	backoffFirst = time.Second
	backoffMax   = 16 * time.Second
	// attemptTimeout bounds one connection attempt (connect and
	// handshake) while reconnecting.
	attemptTimeout = 10 * time.Second
)

type node struct {
	d        dialer
	delay    time.Duration // reconnect-delay
	filename string
	strong   qapi.Object
	info     exportInfo // from the first handshake
	size     int64      // info.size rounded up to 512 bytes, as QEMU
	limits   graph.Limits
	ro       bool

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // readers and the reconnect loop

	// mu guards the connection state below.
	mu sync.Mutex
	c  *conn // nil while disconnected
	// changed is closed (and replaced) whenever c or quit changes.
	changed      chan struct{}
	lostAt       time.Time // when the connection was lost
	reconnecting bool      // the reconnect loop runs
	quit         error     // set for good: closed, or a protocol error
}

// The optional capabilities of graph/node.go. Left out on purpose: Resizer and PreallocResizer (NBD cannot resize), Cacher (NBD_CMD_CACHE is a hint the server may ignore), PermSetter (the server takes its own locks), Amender and ExplicitBackinger (no metadata, no backing file).
var (
	_ graph.Zeroer         = (*node)(nil)
	_ graph.Discarder      = (*node)(nil)
	_ graph.BlockStatuser  = (*node)(nil)
	_ graph.Limiter        = (*node)(nil)
	_ graph.Infoer         = (*node)(nil)
	_ graph.StrongOptioner = (*node)(nil)
)

func open(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
	opts := v.(*Options)
	if opts.XDirtyBitmap != nil {
		return nil, fmt.Errorf("x-dirty-bitmap is not supported by blockd")
	}
	n := &node{d: dialer{addr: &opts.Server}, changed: make(chan struct{})}
	if opts.Export != nil {
		if len(*opts.Export) > maxString {
			return nil, fmt.Errorf("export name too long to send to server")
		}
		n.d.export = *opts.Export
	}
	if _, _, err := opts.Server.network(); err != nil {
		return nil, err
	}
	if opts.TLSCreds != nil {
		cfg, err := o.ClientTLS(*opts.TLSCreds)
		if err != nil {
			return nil, err
		}
		n.d.tls = cfg
		switch {
		case opts.TLSHostname != nil:
			n.d.tlsHost = *opts.TLSHostname
		case opts.Server.Type == "inet":
			n.d.tlsHost = opts.Server.Inet.Host
		}
	}
	if opts.ReconnectDelay != nil {
		n.delay = time.Duration(*opts.ReconnectDelay) * time.Second
	}
	n.filename = filename(&opts.Server, opts.Export)
	n.strong = qapi.Object{{Name: "server", Value: opts.Server.given}}
	if opts.Export != nil {
		n.strong = append(n.strong, qapi.Member{Name: "export", Value: *opts.Export})
	}
	if opts.TLSCreds != nil {
		n.strong = append(n.strong, qapi.Member{Name: "tls-creds", Value: *opts.TLSCreds})
	}
	if opts.TLSHostname != nil {
		n.strong = append(n.strong, qapi.Member{Name: "tls-hostname", Value: *opts.TLSHostname})
	}

	var openTimeout time.Duration
	if opts.OpenTimeout != nil {
		openTimeout = time.Duration(*opts.OpenTimeout) * time.Second
	}
	c, err := n.connectAtOpen(ctx, openTimeout)
	if err != nil {
		return nil, err
	}
	info := c.info
	if info.size > math.MaxInt64-511 {
		c.disconnect()
		return nil, fmt.Errorf("server reports an export size of %d bytes, too large", info.size)
	}
	if info.flags&tflagReadOnly != 0 && !o.ReadOnly() {
		// QEMU's bdrv_apply_auto_read_only.
		if ar := o.Common().AutoReadOnly; ar == nil || !*ar {
			c.disconnect()
			return nil, fmt.Errorf("NBD export is read-only")
		}
		o.SetReadOnly()
	}
	n.ro = o.ReadOnly() || info.flags&tflagReadOnly != 0
	n.info = info
	n.size = int64(info.size+511) &^ 511
	n.limits = limitsOf(info)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.c = c
	n.startReader(c)
	return n, nil
}

// limitsOf is QEMU's nbd_refresh_limits: the server's minimum block size
// as the alignment (without one, byte-granular when the size is not
// sector-aligned or block status is available, else 512), its maximum (at
// most 32 MiB) as the largest transfer.
func limitsOf(info exportInfo) graph.Limits {
	align := int64(info.minBlock)
	if align == 0 {
		align = 512
		if info.size%512 != 0 || info.baseAlloc {
			align = 1
		}
	}
	maxT := int64(maxBuffer)
	if info.maxBlock != 0 {
		maxT = min(maxT, int64(info.maxBlock))
	}
	return graph.Limits{Align: align, MaxTransfer: maxT}
}

// connectAtOpen makes the first connection, retrying with backoff until
// open-timeout has passed (a single attempt when it is 0).
func (n *node) connectAtOpen(ctx context.Context, timeout time.Duration) (*conn, error) {
	deadline := time.Now().Add(timeout)
	wait := backoffFirst
	for {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if timeout > 0 {
			actx, cancel = context.WithDeadline(ctx, deadline)
		}
		nc, br, info, err := n.d.dial(actx)
		cancel()
		if err == nil {
			if info.flags&tflagHasFlags == 0 {
				info.flags = 0
			}
			return newConn(nc, br, info, n.lost), nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		left := time.Until(deadline)
		if timeout == 0 || left <= 0 {
			return nil, err
		}
		t := time.NewTimer(min(wait, left))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
		wait = min(2*wait, backoffMax)
	}
}

func (n *node) startReader(c *conn) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		c.readLoop()
	}()
}

// notifyLocked wakes everybody waiting for a change of connection.
func (n *node) notifyLocked() {
	close(n.changed)
	n.changed = make(chan struct{})
}

// lost is called when connection c has ended (by its reader, or by a
// caller that found it dead). A protocol error ends the node's
// connection for good; any other failure starts reconnecting.
func (n *node) lost(c *conn, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.c != c {
		return
	}
	n.c = nil
	var pe *protocolError
	switch {
	case n.quit != nil:
	case errors.As(err, &pe):
		n.quit = err
	default:
		n.lostAt = time.Now()
		if !n.reconnecting {
			n.reconnecting = true
			n.wg.Add(1)
			go n.reconnect()
		}
	}
	n.notifyLocked()
}

// reconnect connects again with backoff until it succeeds or the node
// closes. The export must still be the same size and writable if the node
// is.
func (n *node) reconnect() {
	defer n.wg.Done()
	wait := backoffFirst
	for {
		actx, cancel := context.WithTimeout(n.ctx, attemptTimeout)
		nc, br, info, err := n.d.dial(actx)
		cancel()
		if err == nil {
			if info.flags&tflagHasFlags == 0 {
				info.flags = 0
			}
			if info.size != n.info.size || (!n.ro && info.flags&tflagReadOnly != 0) {
				nc.Close()
			} else {
				c := newConn(nc, br, info, n.lost)
				n.mu.Lock()
				if n.quit != nil {
					n.mu.Unlock()
					nc.Close()
					return
				}
				n.c = c
				n.reconnecting = false
				n.startReader(c)
				n.notifyLocked()
				n.mu.Unlock()
				return
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-n.ctx.Done():
			t.Stop()
			n.mu.Lock()
			n.reconnecting = false
			n.mu.Unlock()
			return
		}
		wait = min(2*wait, backoffMax)
	}
}

// conn returns the current connection, waiting up to reconnect-delay after
// a loss for a new one. since is when the caller's request first met a
// lost connection (zero if it has not): a request is not sent again and
// again for longer than reconnect-delay, however often a server accepts
// it and drops the connection.
func (n *node) conn(ctx context.Context, since time.Time) (*conn, error) {
	for {
		n.mu.Lock()
		if n.quit != nil {
			err := n.quit
			n.mu.Unlock()
			if errors.Is(err, graph.ErrClosed) {
				return nil, err
			}
			return nil, &connError{cause: err}
		}
		if c := n.c; c != nil {
			n.mu.Unlock()
			c.mu.Lock()
			dead := c.dead
			c.mu.Unlock()
			if dead == nil {
				return c, nil
			}
			n.lost(c, dead.cause)
			continue
		}
		from := n.lostAt
		if !since.IsZero() && since.Before(from) {
			from = since
		}
		left := n.delay - time.Since(from)
		changed := n.changed
		n.mu.Unlock()
		if left <= 0 {
			return nil, &connError{cause: errors.New("not connected")}
		}
		t := time.NewTimer(left)
		select {
		case <-changed:
			t.Stop()
		case <-t.C:
			// Loop once more: a connection may have just come back.
			n.mu.Lock()
			ok := n.c != nil
			n.mu.Unlock()
			if !ok {
				return nil, &connError{cause: fmt.Errorf("no reconnection within reconnect-delay (%v)", n.delay)}
			}
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// do runs one request, sending it again on a new connection when the
// connection it went out on was lost (it was not acknowledged, so sending
// it again is correct) and the node reconnects within reconnect-delay.
func (n *node) do(ctx context.Context, r *request, ext []graph.Extent) ([]graph.Extent, error) {
	var since time.Time
	for {
		if err := ctx.Err(); err != nil {
			return ext, err
		}
		c, err := n.conn(ctx, since)
		if err != nil {
			return ext, err
		}
		out, err := c.do(r, ext[:0])
		if ce, ok := err.(*connError); ok {
			n.lost(c, ce.cause)
			if since.IsZero() {
				since = time.Now()
			}
			continue
		}
		return out, err
	}
}

func (n *node) Size() int64                { return n.size }
func (n *node) Limits() graph.Limits       { return n.limits }
func (n *node) StrongOptions() qapi.Object { return n.strong }

// Info names the node by its URI (nbd://host:port/export or
// nbd+unix:///export?socket=path); its allocated size is unknown.
func (n *node) Info() graph.ImageInfo {
	return graph.ImageInfo{Filename: n.filename, ActualSize: -1}
}

// split calls fn for pieces of [off, off+l) of at most max bytes.
func split(off, l, max int64, fn func(off, l int64) error) error {
	for l > 0 {
		k := min(l, max)
		if err := fn(off, k); err != nil {
			return err
		}
		off += k
		l -= k
	}
	return nil
}

func (n *node) ReadAt(ctx context.Context, p []byte, off int64) error {
	// The node is rounded up to 512 bytes; the tail past the export
	// reads as zeroes (QEMU's nbd_client_co_preadv).
	if end := int64(n.info.size); off+int64(len(p)) > end {
		tail := max(end-off, 0)
		clear(p[tail:])
		p = p[:tail]
	}
	return split(off, int64(len(p)), n.limits.MaxTransfer, func(o, l int64) error {
		b := p[o-off : o-off+l]
		_, err := n.do(ctx, &request{cmd: cmdRead, off: uint64(o), n: uint32(l), buf: b}, nil)
		return err
	})
}

func (n *node) writable() error {
	if n.ro {
		return graph.ErrReadOnly
	}
	return nil
}

// fua returns the command flag for FUA, or false in emulate when the
// server has no FUA and a flush must follow.
func (n *node) fua(f graph.ReqFlags) (flag uint16, emulate bool) {
	if f&graph.FUA == 0 {
		return 0, false
	}
	if n.info.flags&tflagSendFUA != 0 {
		return cmdFlagFUA, false
	}
	return 0, true
}

func (n *node) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	if err := n.writable(); err != nil {
		return err
	}
	flag, emulate := n.fua(f)
	err := split(off, int64(len(p)), n.limits.MaxTransfer, func(o, l int64) error {
		b := p[o-off : o-off+l]
		_, err := n.do(ctx, &request{cmd: cmdWrite, flags: flag, off: uint64(o), n: uint32(l), data: b}, nil)
		return err
	})
	if err == nil && emulate {
		err = n.Flush(ctx)
	}
	return err
}

func (n *node) Flush(ctx context.Context) error {
	if n.info.flags&tflagSendFlush == 0 {
		return nil
	}
	_, err := n.do(ctx, &request{cmd: cmdFlush}, nil)
	return err
}

// maxLen is the longest request without a payload: QEMU's
// QEMU_ALIGN_DOWN(INT_MAX, alignment).
func (n *node) maxLen() int64 { return math.MaxInt32 &^ (n.limits.Align - 1) }

// Discard trims; a server without NBD_FLAG_SEND_TRIM ignores it, as the
// result of a discard is unspecified anyway.
func (n *node) Discard(ctx context.Context, off, l int64) error {
	if err := n.writable(); err != nil {
		return err
	}
	if n.info.flags&tflagSendTrim == 0 {
		return nil
	}
	return split(off, l, n.maxLen(), func(o, l int64) error {
		_, err := n.do(ctx, &request{cmd: cmdTrim, off: uint64(o), n: uint32(l)}, nil)
		return err
	})
}

// WriteZeroes sends NBD_CMD_WRITE_ZEROES, with NO_HOLE unless MayUnmap
// and FAST_ZERO for NoFallback.
func (n *node) WriteZeroes(ctx context.Context, off, l int64, f graph.ReqFlags) error {
	if err := n.writable(); err != nil {
		return err
	}
	if n.info.flags&tflagSendWriteZeroes == 0 {
		return graph.ErrNotSupported
	}
	var flags uint16
	if f&graph.MayUnmap == 0 {
		flags |= cmdFlagNoHole
	}
	if f&graph.NoFallback != 0 {
		if n.info.flags&tflagSendFastZero == 0 {
			return graph.ErrNotSupported
		}
		flags |= cmdFlagFastZero
	}
	fua, emulate := n.fua(f)
	flags |= fua
	err := split(off, l, n.limits.MaxTransfer, func(o, l int64) error {
		_, err := n.do(ctx, &request{cmd: cmdWriteZeroes, flags: flags, off: uint64(o), n: uint32(l)}, nil)
		return err
	})
	if err == nil && emulate {
		err = n.Flush(ctx)
	}
	return err
}

// BlockStatus asks the server for base:allocation; without it everything
// is data.
func (n *node) BlockStatus(ctx context.Context, off, l int64) ([]graph.Extent, error) {
	end := int64(n.info.size)
	if off >= end {
		// The rounded-up tail past the export (QEMU: a zero hole).
		return []graph.Extent{{Length: l, Flags: graph.ExtentHole | graph.ExtentZero}}, nil
	}
	l = min(l, end-off)
	if !n.info.baseAlloc {
		return []graph.Extent{{Length: l}}, nil
	}
	l = min(l, n.maxLen())
	ext, err := n.do(ctx, &request{cmd: cmdBlockStatus, off: uint64(off), n: uint32(l)}, nil)
	if err != nil {
		return nil, err
	}
	return alignExtents(ext, n.limits.Align, l), nil
}

// alignExtents keeps an answer aligned as QEMU's
// nbd_parse_blockstatus_payload does for servers that report unaligned
// extents (a hole at the end of an unaligned file): the answer is cut back
// to a whole number of blocks, or, when less than one block is described,
// becomes one block of data (always a safe answer). l is what was asked.
func alignExtents(ext []graph.Extent, align, l int64) []graph.Extent {
	if align <= 1 {
		return ext
	}
	var total int64
	for _, e := range ext {
		total += e.Length
	}
	if total%align == 0 || total == l {
		return ext
	}
	keep := total &^ (align - 1)
	if keep == 0 {
		return []graph.Extent{{Length: min(align, l)}}
	}
	var out []graph.Extent
	for _, e := range ext {
		if keep == 0 {
			break
		}
		e.Length = min(e.Length, keep)
		keep -= e.Length
		out = append(out, e)
	}
	return out
}

// Close disconnects (NBD_CMD_DISC when the connection is idle enough to
// take it) and waits for the reader and any reconnection to end.
func (n *node) Close() error {
	n.cancel()
	n.mu.Lock()
	c := n.c
	n.c = nil
	if n.quit == nil || !errors.Is(n.quit, graph.ErrClosed) {
		n.quit = graph.ErrClosed
		n.notifyLocked()
	}
	n.mu.Unlock()
	if c != nil {
		c.disconnect()
	}
	n.wg.Wait()
	return nil
}
