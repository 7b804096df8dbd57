package graph

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Drivers wrap them (fmt.Errorf("...: %w", ErrCorrupt)) so
// the edges (QMP, NBD) can classify failures with errors.Is.
var (
	ErrNotFound     = errors.New("not found")
	ErrInUse        = errors.New("in use")
	ErrReadOnly     = errors.New("block node is read-only")
	ErrCorrupt      = errors.New("image is corrupt")
	ErrNotSupported = errors.New("operation not supported")
	ErrRange        = errors.New("request out of range")
	ErrClosed       = errors.New("node is closed")
	ErrPermission   = errors.New("permission conflict")
	ErrNoSpace      = errors.New("no space left on device")
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
