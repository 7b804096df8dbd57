package file

import (
	"errors"
	"fmt"
	"syscall"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

// strerror returns the C library's text for an errno ("No such file or
// directory"), which QEMU puts in its messages. Go's table holds the same
// texts with a lower-case first letter.
func strerror(err error) string {
	var en syscall.Errno
	if !errors.As(err, &en) {
		return err.Error()
	}
	s := en.Error()
	r, n := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError {
		return s
	}
	return string(unicode.ToUpper(r)) + s[n:]
}

// Error is a driver failure with QEMU's message text. It unwraps to the
// errno (or sentinel) that caused it, so graph.Errno and errors.Is still
// classify it.
type Error struct {
	Msg string
	Err error
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Err }

// errorf builds an Error without an errno suffix.
func errorf(cause error, format string, a ...any) error {
	return &Error{Msg: fmt.Sprintf(format, a...), Err: cause}
}

// errnoErrorf builds an Error whose text ends with ": <strerror>", as
// QEMU's error_setg_errno does.
func errnoErrorf(errno error, format string, a ...any) error {
	return &Error{Msg: fmt.Sprintf(format, a...) + ": " + strerror(errno), Err: errno}
}

// LockError reports that another process holds conflicting image locks
// (or that a lock byte could not be taken). Its text is QEMU's; Hint is the
// line qemu-img prints below it.
type LockError struct {
	Msg      string
	Filename string
	Err      error // the errno of the failed fcntl, or EAGAIN for a conflict
}

func (e *LockError) Error() string { return e.Msg }

// Hint is the suggestion QEMU appends for tools: "Is another process using
// the image [f]?".
func (e *LockError) Hint() string {
	return fmt.Sprintf("Is another process using the image [%s]?", e.Filename)
}

// Unwrap makes a LockError match graph.ErrPermission and its errno.
func (e *LockError) Unwrap() []error { return []error{graph.ErrPermission, e.Err} }

// notSupported reports whether errno means "this file system cannot do it",
// as QEMU's translate_err does.
func notSupported(err error) bool {
	switch err {
	case unix.ENODEV, unix.ENOSYS, unix.EOPNOTSUPP, unix.ENOTTY:
		return true
	}
	return false
}

// errNotSupported wraps graph.ErrNotSupported for op.
func errNotSupported(op string) error {
	return fmt.Errorf("%s: %w", op, graph.ErrNotSupported)
}
