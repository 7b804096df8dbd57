package nbd

import (
	"errors"
	"fmt"
	"syscall"

	"blockd/graph"
)

// Wire constants of the NBD protocol (doc/proto.md in NetworkBlockDevice/nbd)
// that the client uses. The server in package nbd keeps its own copy: the
// two sides share no code, so a misreading of the specification on one side
// shows up in the tests of the other.
const (
	magicNBD         = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpts        = 0x49484156454F5054 // "IHAVEOPT"
	magicOldstyle    = 0x00420281861253
	magicRep         = 0x3e889045565a9
	magicRequest     = 0x25609513
	magicSimpleReply = 0x67446698
	magicStructReply = 0x668e33ef

	requestSize       = 28
	simpleReplySize   = 16
	structReplySize   = 20
	exportNameReplySz = 134
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
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendFastZero    = 1 << 11
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optStartTLS        = 5
	optGo              = 7
	optStructuredReply = 8
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrPolicy   = repErrBit | 2
	repErrInvalid  = repErrBit | 3
	repErrPlatform = repErrBit | 4
	repErrTLSReqd  = repErrBit | 5
	repErrUnknown  = repErrBit | 6
	repErrShutdown = repErrBit | 7
	repErrBSReqd   = repErrBit | 8
	repErrTooBig   = repErrBit | 9
)

// NBD_INFO types.
const (
	infoExport    = 0
	infoBlockSize = 3
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagFastZero = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone        = 1 << 0
	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeErrBit      = 1 << 15
	replyTypeErrorOffset = 1<<15 | 2
)

// base:allocation state flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

const (
	// maxBuffer is the largest READ or WRITE sent (QEMU's
	// NBD_MAX_BUFFER_SIZE): the server may advertise more, never less.
	maxBuffer = 32 << 20
	// maxString bounds export names and queries (NBD_MAX_STRING_SIZE).
	maxString = 4096
	// maxOptReply bounds an option reply's payload read into memory.
	maxOptReply = 64 << 10
	// maxChunkPayload bounds a structured chunk other than OFFSET_DATA:
	// block status (a server's 1 MiB of descriptors) and error messages.
	maxChunkPayload = 1<<20 + 4
	// maxInFlight is the number of requests on one connection (QEMU's
	// MAX_NBD_REQUESTS).
	maxInFlight = 16
	// contextBaseAllocation is the metadata context block status reads.
	contextBaseAllocation = "base:allocation"
	defaultPort           = "10809"
)

// Error is an error the server replied to a request with: the NBD errno
// as a system errno (what graph.Errno reports), and the graph sentinel it
// corresponds to, so callers can classify it either way.
type Error struct {
	Errno syscall.Errno
	// Msg is the message of a structured error chunk, if the server sent
	// one ("" otherwise).
	Msg string
}

func (e *Error) Error() string {
	if e.Msg != "" {
		return fmt.Sprintf("nbd server: %s (%s)", e.Errno.Error(), e.Msg)
	}
	return "nbd server: " + e.Errno.Error()
}

// Unwrap returns the errno and the graph sentinel it stands for.
func (e *Error) Unwrap() []error {
	errs := []error{e.Errno}
	switch e.Errno {
	case syscall.EPERM:
		errs = append(errs, graph.ErrReadOnly)
	case syscall.ENOSPC:
		errs = append(errs, graph.ErrNoSpace)
	case syscall.EINVAL, syscall.EOVERFLOW:
		errs = append(errs, graph.ErrRange)
	case syscall.ENOTSUP:
		errs = append(errs, graph.ErrNotSupported)
	}
	return errs
}

// errnoFromWire maps an NBD error value to a system errno, as QEMU's
// nbd_errno_to_system_errno does: values the specification does not name
// become EINVAL.
func errnoFromWire(v uint32) syscall.Errno {
	switch v {
	case 1:
		return syscall.EPERM
	case 5:
		return syscall.EIO
	case 12:
		return syscall.ENOMEM
	case 22:
		return syscall.EINVAL
	case 28:
		return syscall.ENOSPC
	case 75:
		return syscall.EOVERFLOW
	case 95:
		return syscall.ENOTSUP
	case 108:
		return syscall.ESHUTDOWN
	}
	return syscall.EINVAL
}

// ErrConnection is wrapped by the errors of requests that failed because
// the connection to the server was lost or is being reconnected; they
// report EIO.
var ErrConnection = errors.New("nbd: connection to the server lost")

// connError is a request's failure through no fault of its own: the
// connection ended (cause says why). It unwraps to ErrConnection and EIO.
type connError struct{ cause error }

func (e *connError) Error() string {
	if e.cause == nil {
		return ErrConnection.Error()
	}
	return fmt.Sprintf("%v: %v", ErrConnection, e.cause)
}

func (e *connError) Unwrap() []error { return []error{ErrConnection, syscall.EIO} }

// protocolError is a reply the client cannot make sense of. The
// connection is dropped and not reconnected, as QEMU does.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return "nbd protocol error: " + e.msg }

func protoErrorf(format string, a ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, a...)}
}
