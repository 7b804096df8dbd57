package nbd

import (
	"context"
	"errors"
	"syscall"

	"blockd/graph"
)

// Wire constants from the NBD protocol (doc/proto.md in
// NetworkBlockDevice/nbd, extended headers from its extension-ext-header
// branch). Names follow the specification without the NBD_ prefix.
const (
	magicNBD          = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpts         = 0x49484156454F5054 // "IHAVEOPT"
	magicRep          = 0x3e889045565a9
	magicRequest      = 0x25609513
	magicExtRequest   = 0x21e41c71
	magicSimpleReply  = 0x67446698
	magicStructReply  = 0x668e33ef
	magicExtReply     = 0x6e8a278c
	greetingSize      = 18
	requestSize       = 28
	extRequestSize    = 32
	simpleReplySize   = 16
	structReplySize   = 20
	extReplySize      = 32
	optHeaderSize     = 16
	exportNameReplySz = 134 // size(8) + flags(2) + 124 zero bytes
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags         = 1 << 0
	tflagReadOnly         = 1 << 1
	tflagSendFlush        = 1 << 2
	tflagSendFUA          = 1 << 3
	tflagRotational       = 1 << 4
	tflagSendTrim         = 1 << 5
	tflagSendWriteZeroes  = 1 << 6
	tflagSendDF           = 1 << 7
	tflagCanMultiConn     = 1 << 8
	tflagSendResize       = 1 << 9
	tflagSendCache        = 1 << 10
	tflagSendFastZero     = 1 << 11
	tflagBlockStatPayload = 1 << 12
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optPeekExport      = 4
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11
)

// Option reply types.
const (
	repAck              = 1
	repServer           = 2
	repInfo             = 3
	repMetaContext      = 4
	repErrBit           = 1 << 31
	repErrUnsup         = repErrBit | 1
	repErrPolicy        = repErrBit | 2
	repErrInvalid       = repErrBit | 3
	repErrPlatform      = repErrBit | 4
	repErrTLSReqd       = repErrBit | 5
	repErrUnknown       = repErrBit | 6
	repErrShutdown      = repErrBit | 7
	repErrBlockSizeReqd = repErrBit | 8
	repErrTooBig        = repErrBit | 9
	repErrExtHeaderReqd = repErrBit | 10
)

// NBD_INFO types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA        = 1 << 0
	cmdFlagNoHole     = 1 << 1
	cmdFlagDF         = 1 << 2
	cmdFlagReqOne     = 1 << 3
	cmdFlagFastZero   = 1 << 4
	cmdFlagPayloadLen = 1 << 5
)

// Structured reply flags and types.
const (
	replyFlagDone          = 1 << 0
	replyTypeNone          = 0
	replyTypeOffsetData    = 1
	replyTypeOffsetHole    = 2
	replyTypeBlockStatus   = 5
	replyTypeBlockStatusEx = 6
	replyTypeError         = 1<<15 | 1
	replyTypeErrorOffset   = 1<<15 | 2
)

// base:allocation state flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

// NBD error values.
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// Limits.
const (
	// maxPayload is the largest READ/WRITE/CACHE length accepted (QEMU's
	// NBD_MAX_BUFFER_SIZE) and the largest option length before the
	// connection is dropped.
	maxPayload = 32 << 20
	// maxString bounds names, descriptions, queries and messages.
	maxString = 4096
	// maxOptBuffered bounds the options this server reads into memory
	// (meta-context queries); longer ones are skipped and refused with
	// NBD_REP_ERR_TOO_BIG.
	maxOptBuffered = 64 << 10
	// maxInfoOpt is the longest well-formed NBD_OPT_INFO/GO payload.
	maxInfoOpt = 4 + maxString + 2 + 2*0xffff
	// maxExtents bounds one block status chunk (1 MiB of descriptors in
	// compact mode, as QEMU).
	maxExtents = 1 << 17
	// metaIDBaseAllocation is the context id of base:allocation.
	metaIDBaseAllocation = 0
	// contextBaseAllocation is the only metadata context served.
	contextBaseAllocation = "base:allocation"
)

// protocol modes, in increasing order of capability (as QEMU's NBDMode).
type mode uint8

const (
	modeExportName mode = iota // non-fixed newstyle: only NBD_OPT_EXPORT_NAME
	modeSimple                 // fixed newstyle, simple replies
	modeStructured             // NBD_OPT_STRUCTURED_REPLY negotiated
	modeExtended               // NBD_OPT_EXTENDED_HEADERS negotiated
)

var optNames = map[uint32]string{
	optExportName:      "export name",
	optAbort:           "abort",
	optList:            "list",
	optPeekExport:      "peek export",
	optStartTLS:        "starttls",
	optInfo:            "info",
	optGo:              "go",
	optStructuredReply: "structured reply",
	optListMetaContext: "list meta context",
	optSetMetaContext:  "set meta context",
	optExtendedHeaders: "extended headers",
}

func optName(o uint32) string {
	if n, ok := optNames[o]; ok {
		return n
	}
	return "<unknown>"
}

var cmdNames = [...]string{"read", "write", "disconnect", "flush", "trim", "cache", "write zeroes", "block status"}

func cmdName(t uint16) string {
	if int(t) < len(cmdNames) {
		return cmdNames[t]
	}
	return "<unknown>"
}

// nbdErrno maps an error from a node to the NBD error value sent on the
// wire, as QEMU's system_errno_to_nbd_errno does with the errno.
func nbdErrno(err error) uint32 {
	if errors.Is(err, context.Canceled) {
		return errShutdown
	}
	switch graph.Errno(err) {
	case 0:
		return 0
	case syscall.EPERM, syscall.EROFS:
		return errPerm
	case syscall.EIO:
		return errIO
	case syscall.ENOMEM:
		return errNoMem
	case syscall.EDQUOT, syscall.EFBIG, syscall.ENOSPC:
		return errNoSpc
	case syscall.EOVERFLOW:
		return errOverflow
	case syscall.ENOTSUP:
		return errNotSup
	case syscall.ESHUTDOWN:
		return errShutdown
	default:
		return errInval
	}
}
