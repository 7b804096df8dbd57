package qmp

import (
	"errors"
	"fmt"
)

// QMP error classes (qapi/error.json).
const (
	GenericError    = "GenericError"
	CommandNotFound = "CommandNotFound"
	DeviceNotActive = "DeviceNotActive"
	DeviceNotFound  = "DeviceNotFound"
	KVMMissingCap   = "KVMMissingCap"
)

// Error is a QMP error reply: {"error": {"class": Class, "desc": Desc}}.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Desc }

// Errorf returns a GenericError with a formatted description.
func Errorf(format string, a ...any) error {
	return &Error{Class: GenericError, Desc: fmt.Sprintf(format, a...)}
}

// NewError returns an error of the given class.
func NewError(class, format string, a ...any) error {
	return &Error{Class: class, Desc: fmt.Sprintf(format, a...)}
}

// AsError converts any error to the *Error a reply carries. An error that
// wraps an *Error keeps its class; the desc is always err.Error(), and the
// class of anything else is GenericError.
func AsError(err error) *Error {
	if e, ok := err.(*Error); ok {
		return e
	}
	class := GenericError
	var e *Error
	if errors.As(err, &e) {
		class = e.Class
	}
	return &Error{Class: class, Desc: err.Error()}
}
