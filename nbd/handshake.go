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
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

var be = binary.BigEndian

// errAbort ends a handshake that the client ended cleanly (NBD_OPT_ABORT or
// a port probe that never sent anything).
var errAbort = errors.New("client closed the handshake")

// conn is one client connection.
type conn struct {
	srv    *Server
	raw    net.Conn // the accepted connection
	nc     net.Conn // raw, or the TLS connection after NBD_OPT_STARTTLS
	log    *logrus.Entry
	ctx    context.Context // cancelled on disconnect
	cancel context.CancelFunc
	killed atomic.Bool // set by kill
	seq    uint64      // accept order; set before the connection runs

	// attached is set when the connection enters transmission; guarded by
	// Server.mu.
	attached bool

	// Handshake state, used by the connection's goroutine only.
	hw       *bufio.Writer
	mode     mode
	noZeroes bool
	tls      bool
	meta     metaSel // the last NBD_OPT_SET_META_CONTEXT

	// Set when entering transmission; read-only afterwards.
	exp        *export
	size       uint64
	txFlags    uint16
	checkAlign uint64 // >1: the client promised this alignment
	metaBase   bool   // base:allocation negotiated for exp

	// Transmission state: see transmit.go.
	tx txState
}

// metaSel is the selection made by NBD_OPT_SET_META_CONTEXT.
type metaSel struct {
	exp  *export
	base bool
}

func newConn(s *Server, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{
		srv: s, raw: nc, nc: nc, ctx: ctx, cancel: cancel,
		log: s.log.WithField("client", remoteName(nc)),
	}
}

// kill disconnects the client: its context is cancelled and the socket
// closed, which ends the reader and the writer. In-flight requests finish
// (or fail on the cancelled context) before the connection is released.
func (c *conn) kill() {
	c.killed.Store(true)
	c.cancel()
	c.raw.Close()
}

// serve runs the connection to its end.
func (c *conn) serve() {
	defer c.srv.connDone(c)
	defer c.raw.Close()
	defer c.cancel()

	if t := c.srv.opts.HandshakeTimeout; t > 0 {
		c.raw.SetDeadline(time.Now().Add(t))
	}
	err := c.handshake()
	if err != nil {
		switch {
		case errors.Is(err, errAbort) || c.killed.Load():
			c.log.Debugf("nbd: handshake ended: %v", err)
		case isTimeout(err):
			c.log.Warnf("nbd: handshake timed out after %v", c.srv.opts.HandshakeTimeout)
		default:
			c.log.Warnf("nbd: option negotiation failed: %v", err)
		}
		if c.exp != nil {
			c.srv.detach(c, c.exp)
		}
		return
	}
	c.raw.SetDeadline(time.Time{})
	c.log.WithField("export", c.exp.name).Debug("nbd: client entered transmission phase")
	c.transmit()
	c.srv.detach(c, c.exp)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// handshake runs the fixed newstyle negotiation. It returns nil when the
// client entered the transmission phase (c.exp is set and attached).
func (c *conn) handshake() error {
	c.hw = bufio.NewWriterSize(c.raw, 4096)
	var g [greetingSize]byte
	be.PutUint64(g[0:], magicNBD)
	be.PutUint64(g[8:], magicOpts)
	be.PutUint16(g[16:], flagFixedNewstyle|flagNoZeroes)
	c.hw.Write(g[:])
	if err := c.hw.Flush(); err != nil {
		return fmt.Errorf("%w: %v", errAbort, err) // a port probe
	}
	var f [4]byte
	if _, err := io.ReadFull(c.nc, f[:]); err != nil {
		return fmt.Errorf("%w: %v", errAbort, err) // a port probe
	}
	flags := be.Uint32(f[:])
	if flags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return fmt.Errorf("unknown client flags 0x%x received", flags&^(flagCFixedNewstyle|flagCNoZeroes))
	}
	c.mode = modeExportName
	if flags&flagCFixedNewstyle != 0 {
		c.mode = modeSimple
	}
	c.noZeroes = flags&flagCNoZeroes != 0

	var h [optHeaderSize]byte
	for {
		if err := c.hw.Flush(); err != nil {
			return err
		}
		if _, err := io.ReadFull(c.nc, h[:]); err != nil {
			return err
		}
		if m := be.Uint64(h[0:]); m != magicOpts {
			return fmt.Errorf("bad option magic 0x%x received", m)
		}
		opt, length := be.Uint32(h[8:]), be.Uint32(h[12:])
		if length > maxPayload {
			return fmt.Errorf("option length %d is larger than max len (%d)", length, maxPayload)
		}
		done, err := c.option(opt, length)
		if err != nil {
			c.hw.Flush()
			return err
		}
		if done {
			return c.hw.Flush()
		}
	}
}

// option handles one option; done reports the start of transmission.
func (c *conn) option(opt, length uint32) (done bool, err error) {
	if c.srv.opts.TLSConfig != nil && !c.tls {
		if c.mode == modeExportName {
			return false, fmt.Errorf("unsupported option 0x%x: TLS requires fixed newstyle negotiation", opt)
		}
		switch opt {
		case optStartTLS:
			if length != 0 {
				if err := c.rejectLength(opt, length); err != nil {
					return false, err
				}
				return false, fmt.Errorf("option '%s' has unexpected length", optName(opt))
			}
			return false, c.startTLS()
		case optExportName:
			return false, fmt.Errorf("option 0x%x not permitted before TLS", opt)
		case optAbort:
			if err := c.drain(length); err != nil {
				return false, err
			}
			c.sendRep(opt, repAck)
			return false, errAbort
		default:
			return false, c.dropErr(opt, length, repErrTLSReqd, "Option 0x%x not permitted before TLS", opt)
		}
	}
	if c.mode == modeExportName {
		if opt != optExportName {
			return false, fmt.Errorf("unsupported option %d (%s) without fixed newstyle negotiation", opt, optName(opt))
		}
		return c.exportName(length)
	}
	switch opt {
	case optExportName:
		return c.exportName(length)
	case optAbort:
		if err := c.drain(length); err != nil {
			return false, err
		}
		c.sendRep(opt, repAck)
		return false, errAbort
	case optList:
		if length != 0 {
			return false, c.rejectLength(opt, length)
		}
		for _, x := range c.srv.listExports() {
			var l [4]byte
			be.PutUint32(l[:], uint32(len(x.name)))
			c.sendRep(opt, repServer, l[:], []byte(x.name), []byte(x.desc))
		}
		return false, c.sendRep(opt, repAck)
	case optStartTLS:
		switch {
		case length != 0:
			return false, c.rejectLength(opt, length)
		case c.tls:
			return false, c.sendErr(opt, repErrInvalid, "TLS already enabled")
		default:
			return false, c.sendErr(opt, repErrPolicy, "TLS not configured")
		}
	case optInfo, optGo:
		return c.info(opt, length)
	case optStructuredReply:
		switch {
		case length != 0:
			return false, c.rejectLength(opt, length)
		case c.mode >= modeExtended:
			return false, c.sendErr(opt, repErrExtHeaderReqd, "extended headers already negotiated")
		case c.mode >= modeStructured:
			return false, c.sendErr(opt, repErrInvalid, "structured reply already negotiated")
		}
		c.mode = modeStructured
		return false, c.sendRep(opt, repAck)
	case optExtendedHeaders:
		switch {
		case length != 0:
			return false, c.rejectLength(opt, length)
		case c.mode >= modeExtended:
			return false, c.sendErr(opt, repErrInvalid, "extended headers already negotiated")
		}
		c.mode = modeExtended
		return false, c.sendRep(opt, repAck)
	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(opt, length)
	default:
		return false, c.dropErr(opt, length, repErrUnsup, "Unsupported option %d (%s)", opt, optName(opt))
	}
}

// sendRep queues an option reply; the handshake loop flushes it.
func (c *conn) sendRep(opt, typ uint32, payload ...[]byte) error {
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	var h [20]byte
	be.PutUint64(h[0:], magicRep)
	be.PutUint32(h[8:], opt)
	be.PutUint32(h[12:], typ)
	be.PutUint32(h[16:], uint32(n))
	_, err := c.hw.Write(h[:])
	for _, p := range payload {
		if err == nil {
			_, err = c.hw.Write(p)
		}
	}
	return err
}

// sendErr sends an error reply with a message.
func (c *conn) sendErr(opt, typ uint32, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	c.log.Debugf("nbd: option %s refused: %s", optName(opt), msg)
	return c.sendRep(opt, typ, []byte(msg))
}

// drain discards n bytes of option payload.
func (c *conn) drain(n uint32) error {
	if n == 0 {
		return nil
	}
	_, err := io.CopyN(io.Discard, c.nc, int64(n))
	return err
}

// dropErr discards the rest of the option and sends an error reply.
func (c *conn) dropErr(opt, length, typ uint32, format string, args ...any) error {
	if err := c.drain(length); err != nil {
		return err
	}
	return c.sendErr(opt, typ, format, args...)
}

func (c *conn) rejectLength(opt, length uint32) error {
	return c.dropErr(opt, length, repErrInvalid, "option '%s' has unexpected length", optName(opt))
}

func (c *conn) readPayload(n uint32) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c.nc, b)
	return b, err
}

// sanitize shortens a client-provided name for error messages, as QEMU.
func sanitize(name string) string {
	if len(name) < 80 {
		return name
	}
	return name[:80] + "..."
}

// startTLS acknowledges NBD_OPT_STARTTLS and upgrades the connection.
func (c *conn) startTLS() error {
	c.sendRep(optStartTLS, repAck)
	if err := c.hw.Flush(); err != nil {
		return err
	}
	tc := tls.Server(c.raw, c.srv.opts.TLSConfig)
	if err := tc.HandshakeContext(c.ctx); err != nil {
		return fmt.Errorf("TLS handshake failed: %w", err)
	}
	c.nc = tc
	c.hw.Reset(tc)
	c.tls = true
	// Nothing negotiated before STARTTLS survives it.
	c.mode = modeSimple
	c.meta = metaSel{}
	return nil
}

// txFlagsFor returns the transmission flags for export x in the current
// mode.
func (c *conn) txFlagsFor(x *export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendCache)
	if c.srv.opts.MaxConnections != 1 {
		f |= tflagCanMultiConn
	}
	if x.ro {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if c.mode >= modeStructured {
		f |= tflagSendDF
	}
	return f
}

// bind enters x for transmission; c must already be attached to x.
func (c *conn) bind(x *export, size uint64, align uint32) {
	c.exp = x
	c.size = size
	c.txFlags = c.txFlagsFor(x)
	if align > 1 {
		c.checkAlign = uint64(align)
	}
	c.metaBase = c.meta.exp == x && c.meta.base
}

func exportSize(x *export) uint64 {
	if s := x.node.Size(); s > 0 {
		return uint64(s)
	}
	return 0
}

// exportName handles NBD_OPT_EXPORT_NAME, which cannot return errors: any
// failure drops the connection.
func (c *conn) exportName(length uint32) (bool, error) {
	if c.mode >= modeExtended {
		return false, errors.New("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
	}
	if length > maxString {
		return false, fmt.Errorf("export name length %d too long", length)
	}
	b, err := c.readPayload(length)
	if err != nil {
		return false, err
	}
	name := string(b)
	x := c.srv.lookup(name)
	if x == nil {
		return false, fmt.Errorf("export '%s' not present", sanitize(name))
	}
	if !c.srv.attach(c, x) {
		return false, fmt.Errorf("export '%s' is going away", sanitize(name))
	}
	size := exportSize(x)
	c.bind(x, size, 0)
	var r [exportNameReplySz]byte
	be.PutUint64(r[0:], size)
	be.PutUint16(r[8:], c.txFlags)
	n := len(r)
	if c.noZeroes {
		n = 10
	}
	_, err = c.hw.Write(r[:n])
	return true, err
}

// parser reads big-endian fields from an option payload; ok turns false
// on the first short read.
type parser struct {
	b  []byte
	ok bool
}

func (p *parser) u16() uint16 {
	if len(p.b) < 2 {
		p.ok, p.b = false, nil
		return 0
	}
	v := be.Uint16(p.b)
	p.b = p.b[2:]
	return v
}

func (p *parser) u32() uint32 {
	if len(p.b) < 4 {
		p.ok, p.b = false, nil
		return 0
	}
	v := be.Uint32(p.b)
	p.b = p.b[4:]
	return v
}

func (p *parser) bytes(n uint32) []byte {
	if uint64(len(p.b)) < uint64(n) {
		p.ok, p.b = false, nil
		return nil
	}
	v := p.b[:n]
	p.b = p.b[n:]
	return v
}

// info handles NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) info(opt, length uint32) (bool, error) {
	if length > maxInfoOpt {
		return false, c.dropErr(opt, length, repErrInvalid, "option '%s' has unexpected length", optName(opt))
	}
	data, err := c.readPayload(length)
	if err != nil {
		return false, err
	}
	p := parser{b: data, ok: true}
	nl := p.u32()
	if !p.ok {
		return false, c.sendErr(opt, repErrInvalid, "Inconsistent lengths in option %s", optName(opt))
	}
	if nl > maxString {
		return false, c.sendErr(opt, repErrInvalid, "Invalid name length: %d", nl)
	}
	nameb := p.bytes(nl)
	nreq := p.u16()
	var wantName, wantBlockSize bool
	for i := 0; i < int(nreq) && p.ok; i++ {
		switch p.u16() {
		case infoName:
			wantName = true
		case infoBlockSize:
			wantBlockSize = true
		}
	}
	if !p.ok {
		return false, c.sendErr(opt, repErrInvalid, "Inconsistent lengths in option %s", optName(opt))
	}
	if len(p.b) != 0 {
		return false, c.sendErr(opt, repErrInvalid, "option '%s' has unexpected length", optName(opt))
	}
	if bytes.IndexByte(nameb, 0) >= 0 {
		return false, c.sendErr(opt, repErrInvalid, "Unexpected embedded NUL in option %s", optName(opt))
	}
	name := string(nameb)
	x := c.srv.lookup(name)
	if x == nil || (opt == optGo && !c.srv.attach(c, x)) {
		return false, c.sendErr(opt, repErrUnknown, "export '%s' not present", sanitize(name))
	}
	ok := false
	if opt == optGo {
		defer func() {
			if !ok {
				c.srv.detach(c, x)
			}
		}()
	}

	if wantName {
		c.sendInfo(opt, infoName, nameb)
	}
	if x.desc != "" {
		c.sendInfo(opt, infoDescription, []byte(x.desc))
	}
	// As QEMU: advertise the real minimum to clients that asked for it
	// (or only ask for information), 1 to the others for compatibility.
	minb := uint32(1)
	if opt == optInfo || wantBlockSize {
		minb = x.minBlock
	}
	var bsz [12]byte
	be.PutUint32(bsz[0:], minb)
	be.PutUint32(bsz[4:], max(x.prefBlock, minb))
	be.PutUint32(bsz[8:], x.maxBlock)
	c.sendInfo(opt, infoBlockSize, bsz[:])

	size := exportSize(x)
	var ex [10]byte
	be.PutUint64(ex[0:], size)
	be.PutUint16(ex[8:], c.txFlagsFor(x))
	if err := c.sendInfo(opt, infoExport, ex[:]); err != nil {
		return false, err
	}
	if opt == optInfo && !wantBlockSize && x.minBlock > 1 {
		return false, c.sendErr(opt, repErrBlockSizeReqd, "request NBD_INFO_BLOCK_SIZE to use this export")
	}
	if err := c.sendRep(opt, repAck); err != nil {
		return false, err
	}
	if opt == optInfo {
		return false, nil
	}
	align := uint32(0)
	if wantBlockSize {
		align = x.minBlock
	}
	c.bind(x, size, align)
	ok = true
	return true, nil
}

func (c *conn) sendInfo(opt uint32, typ uint16, payload []byte) error {
	var t [2]byte
	be.PutUint16(t[:], typ)
	return c.sendRep(opt, repInfo, t[:], payload)
}

// metaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. Only base:allocation exists.
func (c *conn) metaContext(opt, length uint32) error {
	if opt == optSetMetaContext {
		c.meta = metaSel{} // replaced even when the option fails
		if c.mode < modeStructured {
			return c.dropErr(opt, length, repErrInvalid,
				"request option '%s' when structured reply is not negotiated", optName(opt))
		}
	}
	if length > maxOptBuffered {
		return c.dropErr(opt, length, repErrTooBig, "option '%s' is too long (%d bytes)", optName(opt), length)
	}
	data, err := c.readPayload(length)
	if err != nil {
		return err
	}
	p := parser{b: data, ok: true}
	nl := p.u32()
	if p.ok && nl > maxString {
		return c.sendErr(opt, repErrInvalid, "Invalid name length: %d", nl)
	}
	nameb := p.bytes(nl)
	nq := p.u32()
	if !p.ok {
		return c.sendErr(opt, repErrInvalid, "Inconsistent lengths in option %s", optName(opt))
	}
	if bytes.IndexByte(nameb, 0) >= 0 {
		return c.sendErr(opt, repErrInvalid, "Unexpected embedded NUL in option %s", optName(opt))
	}
	name := string(nameb)
	x := c.srv.lookup(name)
	if x == nil {
		return c.sendErr(opt, repErrUnknown, "export '%s' not present", sanitize(name))
	}
	base := opt == optListMetaContext && nq == 0
	for i := uint32(0); i < nq && p.ok; i++ {
		ql := p.u32()
		q := p.bytes(ql)
		if !p.ok || ql > maxString {
			continue
		}
		if bytes.IndexByte(q, 0) >= 0 {
			return c.sendErr(opt, repErrInvalid, "Unexpected embedded NUL in option %s", optName(opt))
		}
		if leaf, ok := strings.CutPrefix(string(q), "base:"); ok {
			if leaf == "allocation" || (leaf == "" && opt == optListMetaContext) {
				base = true
			}
		}
	}
	if !p.ok || len(p.b) != 0 {
		return c.sendErr(opt, repErrInvalid, "Inconsistent lengths in option %s", optName(opt))
	}
	if base {
		var id [4]byte
		be.PutUint32(id[:], metaIDBaseAllocation)
		c.sendRep(opt, repMetaContext, id[:], []byte(contextBaseAllocation))
	}
	if err := c.sendRep(opt, repAck); err != nil {
		return err
	}
	if opt == optSetMetaContext {
		c.meta = metaSel{exp: x, base: base}
	}
	return nil
}
