package graph

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Drivers wrap them (fmt.Errorf("...: %w", ErrCorrupt)) so
// the edges (QMP, NBD) can classify failures with errors.Is.
var (
	// ErrNotFound is returned when a named object (an export, a persistent
	// reservation manager) does not exist; callers report it in QEMU's words
	// and change nothing.
	ErrNotFound = errors.New("not found")

	// ErrInUse is returned when an object cannot be removed yet because
	// others use it (an export with clients, or one already shutting down);
	// callers fail the command or, in hard mode, disconnect the users first.
	ErrInUse = errors.New("in use")

	// ErrReadOnly is returned for a write, zero, discard, truncate or
	// metadata change on a node or edge without write permission; NBD
	// replies EPERM.
	ErrReadOnly = errors.New("block node is read-only")

	// ErrCorrupt is returned when an image's metadata is damaged (qcow2
	// tables that overlap or point past the file, a LUKS header that does
	// not parse); the request fails with EIO and the image needs a check.
	ErrCorrupt = errors.New("image is corrupt")

	// ErrNotSupported is returned when a node cannot do an operation, or
	// cannot do it fast when NoFallback asks for that; the graph falls back
	// (explicit zero buffers) where it may, and NBD replies ENOTSUP.
	ErrNotSupported = errors.New("operation not supported")

	// ErrRange is returned for a request outside what the node allows (past
	// its size, a negative offset or size, part of a compressed cluster);
	// NBD replies EINVAL.
	ErrRange = errors.New("request out of range")

	// ErrClosed is returned by a node or edge used after it was closed or
	// detached; the caller's reference is stale and must be dropped.
	ErrClosed = errors.New("node is closed")

	// ErrPermission is returned when a permission cannot be taken because
	// another user holds a conflicting one (the file driver's image locks);
	// the open or permission change that needed it fails and nothing changes.
	ErrPermission = errors.New("permission conflict")

	// ErrNoSpace is returned when an image cannot grow further (a qcow2 L1
	// table past its maximum, no room left in a LUKS header); NBD replies
	// ENOSPC.
	ErrNoSpace = errors.New("no space left on device")
)

// OpError records a failed request on a node. It unwraps to the cause.
type OpError struct {
	Op   string // "read", "write", "flush", "zero", "discard", "status", "truncate"
	Node string // node name, may be empty
	Off  int64
	Len  int64
	Err  error
}

func (e *OpError) Error() string {
	if e.Node == "" {
		return fmt.Sprintf("%s at %d+%d: %v", e.Op, e.Off, e.Len, e.Err)
	}
	return fmt.Sprintf("%s on %s at %d+%d: %v", e.Op, e.Node, e.Off, e.Len, e.Err)
}

func (e *OpError) Unwrap() error { return e.Err }

// Errno maps an error to the errno an I/O edge (NBD) should report.
func Errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var en syscall.Errno
	switch {
	case errors.As(err, &en):
		return en
	case errors.Is(err, ErrReadOnly):
		return syscall.EPERM
	case errors.Is(err, ErrRange):
		return syscall.EINVAL
	case errors.Is(err, ErrNotSupported):
		return syscall.ENOTSUP
	case errors.Is(err, ErrNoSpace):
		return syscall.ENOSPC
	default:
		return syscall.EIO
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
