package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
)

// exportInfo is what the handshake learned about the export.
type exportInfo struct {
	size       uint64
	flags      uint16
	structured bool
	// baseAlloc: base:allocation was negotiated with context id ctxID.
	baseAlloc bool
	ctxID     uint32
	// Block size constraints (0: not advertised).
	minBlock, prefBlock, maxBlock uint32
}

// dialer holds what a connection attempt needs.
type dialer struct {
	addr    *SocketAddress
	export  string
	tls     *tls.Config // nil: plain
	tlsHost string
}

// handshakeError is a failure in the negotiation with a server that
// answered: retrying will not help (QEMU gives up on these, too).
type handshakeError struct{ err error }

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

func hsErrorf(format string, a ...any) error {
	return &handshakeError{fmt.Errorf(format, a...)}
}

// dial connects and negotiates; the returned connection is in
// transmission phase.
func (d *dialer) dial(ctx context.Context) (net.Conn, *bufio.Reader, exportInfo, error) {
	nw, addr, err := d.addr.network()
	if err != nil {
		return nil, nil, exportInfo{}, &handshakeError{err}
	}
	var nd net.Dialer
	nc, err := nd.DialContext(ctx, nw, addr)
	if err != nil {
		return nil, nil, exportInfo{}, fmt.Errorf("Failed to connect to '%s': %v", addr, sysErr(err))
	}
	// The handshake must not outlive ctx.
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	h := &handshake{nc: nc, br: bufio.NewReaderSize(nc, 64<<10), d: d}
	info, err := h.run()
	if err != nil {
		h.nc.Close()
		if ctx.Err() != nil {
			return nil, nil, exportInfo{}, ctx.Err()
		}
		return nil, nil, exportInfo{}, err
	}
	return h.nc, h.br, info, nil
}

// sysErr is the system error under net's "dial unix x:" prefixes, in
// strerror's words ("Connection refused").
func sysErr(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		s := en.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	return err.Error()
}

type handshake struct {
	nc net.Conn
	br *bufio.Reader
	d  *dialer
	// noZeroes: the server leaves out the 124 zero bytes after
	// NBD_OPT_EXPORT_NAME's reply.
	noZeroes bool
}

func (h *handshake) readFull(b []byte) error {
	if _, err := io.ReadFull(h.br, b); err != nil {
		return fmt.Errorf("failed to read from the server during the handshake: %v", err)
	}
	return nil
}

func (h *handshake) run() (exportInfo, error) {
	var b [18]byte
	if err := h.readFull(b[:16]); err != nil {
		return exportInfo{}, err
	}
	if binary.BigEndian.Uint64(b[:]) != magicNBD {
		return exportInfo{}, hsErrorf("Bad initial magic received: 0x%x", binary.BigEndian.Uint64(b[:]))
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case magicOpts:
	case magicOldstyle:
		return exportInfo{}, hsErrorf("Server is oldstyle: oldstyle negotiation is not supported")
	default:
		return exportInfo{}, hsErrorf("Bad server magic received: 0x%x", m)
	}
	if err := h.readFull(b[:2]); err != nil {
		return exportInfo{}, err
	}
	sflags := binary.BigEndian.Uint16(b[:])
	fixed := sflags&flagFixedNewstyle != 0
	var cflags uint32
	if fixed {
		cflags |= flagCFixedNewstyle
	}
	if sflags&flagNoZeroes != 0 {
		cflags |= flagCNoZeroes
		h.noZeroes = true
	}
	binary.BigEndian.PutUint32(b[:], cflags)
	if _, err := h.nc.Write(b[:4]); err != nil {
		return exportInfo{}, fmt.Errorf("failed to send client flags: %v", err)
	}
	if h.d.tls != nil {
		if !fixed {
			return exportInfo{}, hsErrorf("Server does not support STARTTLS")
		}
		if err := h.startTLS(); err != nil {
			return exportInfo{}, err
		}
	}
	var info exportInfo
	if !fixed {
		// Plain newstyle: only NBD_OPT_EXPORT_NAME.
		return info, h.exportName(&info)
	}
	ok, err := h.simpleOpt(optStructuredReply, nil)
	if err != nil {
		return info, err
	}
	info.structured = ok
	if ok {
		if err := h.setMetaContext(&info); err != nil {
			return info, err
		}
	}
	done, err := h.goOpt(&info)
	if err != nil || done {
		return info, err
	}
	return info, h.exportName(&info)
}

// sendOpt sends an option request.
func (h *handshake) sendOpt(opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b, magicOpts)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	if _, err := h.nc.Write(b); err != nil {
		return fmt.Errorf("failed to send option request: %v", err)
	}
	return nil
}

// optReply is one option reply.
type optReply struct {
	typ  uint32
	data []byte
}

func (h *handshake) readReply(opt uint32) (optReply, error) {
	var b [20]byte
	if err := h.readFull(b[:]); err != nil {
		return optReply{}, err
	}
	if m := binary.BigEndian.Uint64(b[:]); m != magicRep {
		return optReply{}, hsErrorf("Unexpected option reply magic 0x%x", m)
	}
	if o := binary.BigEndian.Uint32(b[8:]); o != opt {
		return optReply{}, hsErrorf("Unexpected option type %d in reply, expected %d", o, opt)
	}
	r := optReply{typ: binary.BigEndian.Uint32(b[12:])}
	n := binary.BigEndian.Uint32(b[16:])
	if n > maxOptReply {
		return optReply{}, hsErrorf("server option reply of %d bytes is too long", n)
	}
	r.data = make([]byte, n)
	if err := h.readFull(r.data); err != nil {
		return optReply{}, err
	}
	return r, nil
}

// optNames are the option names QEMU's messages use (nbd_opt_lookup).
var optNames = map[uint32]string{optExportName: "export name", optStartTLS: "starttls", optGo: "go", optStructuredReply: "structured reply", optSetMetaContext: "set meta context"}

// replyError turns an error reply into QEMU's message (nbd_handle_reply_err;
// the server's own message is a hint there, not part of the error).
func replyError(opt uint32, r optReply) error {
	o := fmt.Sprintf("option %d (%s)", opt, optNames[opt])
	var msg string
	switch r.typ {
	case repErrPolicy:
		msg = "Requested " + o + " is forbidden"
	case repErrInvalid:
		msg = "Requested " + o + " is invalid"
	case repErrPlatform:
		msg = "Server lacks support for " + o
	case repErrTLSReqd:
		msg = "TLS negotiation required before " + o
	case repErrUnknown:
		msg = "Requested export not available"
	case repErrShutdown:
		msg = "Server shutting down before " + o
	case repErrBSReqd:
		msg = "Server requires INFO_BLOCK_SIZE for " + o
	case repErrTooBig:
		msg = "Request for " + o + " is too big"
	default:
		msg = "Unknown error code when asking for " + o
	}
	return &handshakeError{errors.New(msg)}
}

// printable returns a server message with control characters dropped and
// its length bounded, fit for an error text.
func printable(b []byte) string {
	if len(b) > 256 {
		b = b[:256]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, string(b))
}

// simpleOpt sends an option that has no data in its ACK: ok is false when
// the server does not support it.
func (h *handshake) simpleOpt(opt uint32, data []byte) (bool, error) {
	if err := h.sendOpt(opt, data); err != nil {
		return false, err
	}
	r, err := h.readReply(opt)
	if err != nil {
		return false, err
	}
	switch {
	case r.typ == repAck:
		if len(r.data) != 0 {
			return false, hsErrorf("Server sent a payload with ACK to option %d", opt)
		}
		return true, nil
	case r.typ == repErrUnsup:
		return false, nil
	case r.typ&repErrBit != 0:
		return false, replyError(opt, r)
	}
	return false, hsErrorf("Unexpected reply type %d to option %d", r.typ, opt)
}

func (h *handshake) startTLS() error {
	ok, err := h.simpleOpt(optStartTLS, nil)
	if err != nil {
		return err
	}
	if !ok {
		return hsErrorf("Server don't support STARTTLS option")
	}
	if h.br.Buffered() != 0 {
		return hsErrorf("Server sent data before the TLS handshake")
	}
	cfg := h.d.tls.Clone()
	cfg.ServerName = h.d.tlsHost
	if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
		// QEMU checks no host name when it has none (a unix socket
		// without tls-hostname): verify the chain only.
		roots := cfg.RootCAs
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyChain(cs, roots)
		}
	}
	tc := tls.Client(h.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return hsErrorf("TLS handshake failed: %v", err)
	}
	h.nc = tc
	h.br = bufio.NewReaderSize(tc, 64<<10)
	return nil
}

// setMetaContext asks for base:allocation; a server without meta
// contexts leaves block status to the default (all data).
func (h *handshake) setMetaContext(info *exportInfo) error {
	name := h.d.export
	data := make([]byte, 0, 4+len(name)+4+4+len(contextBaseAllocation))
	data = binary.BigEndian.AppendUint32(data, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint32(data, 1)
	data = binary.BigEndian.AppendUint32(data, uint32(len(contextBaseAllocation)))
	data = append(data, contextBaseAllocation...)
	if err := h.sendOpt(optSetMetaContext, data); err != nil {
		return err
	}
	for {
		r, err := h.readReply(optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case r.typ == repAck:
			return nil
		case r.typ == repMetaContext:
			if len(r.data) < 4 {
				return hsErrorf("Server sent a short meta context reply")
			}
			if string(r.data[4:]) != contextBaseAllocation || info.baseAlloc {
				return hsErrorf("Server replied with an unexpected meta context '%s'", printable(r.data[4:]))
			}
			info.baseAlloc = true
			info.ctxID = binary.BigEndian.Uint32(r.data)
		case r.typ == repErrUnsup:
			return nil
		case r.typ&repErrBit != 0:
			return replyError(optSetMetaContext, r)
		default:
			return hsErrorf("Unexpected reply type %d to option %d", r.typ, optSetMetaContext)
		}
	}
}

// goOpt sends NBD_OPT_GO asking for block sizes; done is false when the
// server does not know the option (fall back to EXPORT_NAME).
func (h *handshake) goOpt(info *exportInfo) (bool, error) {
	name := h.d.export
	data := make([]byte, 0, 4+len(name)+4)
	data = binary.BigEndian.AppendUint32(data, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	if err := h.sendOpt(optGo, data); err != nil {
		return false, err
	}
	haveExport := false
	for {
		r, err := h.readReply(optGo)
		if err != nil {
			return false, err
		}
		switch {
		case r.typ == repAck:
			if !haveExport {
				return false, hsErrorf("server did not send export info before ACK")
			}
			return true, nil
		case r.typ == repInfo:
			if len(r.data) < 2 {
				return false, hsErrorf("server sent a short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(r.data) {
			case infoExport:
				if len(r.data) != 12 {
					return false, hsErrorf("server sent a NBD_INFO_EXPORT of %d bytes", len(r.data))
				}
				info.size = binary.BigEndian.Uint64(r.data[2:])
				info.flags = binary.BigEndian.Uint16(r.data[10:])
				haveExport = true
			case infoBlockSize:
				if len(r.data) != 14 {
					return false, hsErrorf("server sent a NBD_INFO_BLOCK_SIZE of %d bytes", len(r.data))
				}
				if err := setBlockSizes(info, binary.BigEndian.Uint32(r.data[2:]), binary.BigEndian.Uint32(r.data[6:]), binary.BigEndian.Uint32(r.data[10:])); err != nil {
					return false, err
				}
			}
		case r.typ == repErrUnsup:
			return false, nil
		case r.typ&repErrBit != 0:
			return false, replyError(optGo, r)
		default:
			return false, hsErrorf("Unexpected reply type %d to option %d", r.typ, optGo)
		}
	}
}

// setBlockSizes checks NBD_INFO_BLOCK_SIZE as QEMU's nbd_opt_info_or_go.
func setBlockSizes(info *exportInfo, min, pref, max uint32) error {
	if min == 0 || min&(min-1) != 0 || min > 64<<10 {
		return hsErrorf("server minimum block size %d is not a power of two", min)
	}
	if pref&(pref-1) != 0 || pref < min {
		return hsErrorf("server preferred block size %d is not valid", pref)
	}
	if max < pref || max%min != 0 {
		return hsErrorf("server maximum block size %d is not valid", max)
	}
	info.minBlock, info.prefBlock, info.maxBlock = min, pref, max
	return nil
}

// exportName ends the handshake with NBD_OPT_EXPORT_NAME.
func (h *handshake) exportName(info *exportInfo) error {
	if err := h.sendOpt(optExportName, []byte(h.d.export)); err != nil {
		return err
	}
	n := exportNameReplySz
	if h.noZeroes {
		n = 10
	}
	b := make([]byte, n)
	if err := h.readFull(b); err != nil {
		return hsErrorf("Requested export '%s' not present or the server refused it: %v", h.d.export, err)
	}
	info.size = binary.BigEndian.Uint64(b)
	info.flags = binary.BigEndian.Uint16(b[8:])
	return nil
}
