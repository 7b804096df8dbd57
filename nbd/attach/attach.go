// Package attach connects an export of an in-process nbd.Server to the
// local kernel as a /dev/nbdN block device, as qemu-nbd --connect does.
//
// Each kernel connection is one end of a socket pair whose other end is
// served by the server (Server.ServeConn). The package performs the
// handshake itself (NBD_OPT_GO with NBD_INFO_BLOCK_SIZE), then hands the
// socket to the kernel with the NBD_SET_SOCK family of ioctls and runs
// NBD_DO_IT until the device is detached. When /dev/nbd0 is missing it
// loads the nbd module (github.com/pmorjan/kmod). Kernels without nbd
// support give an error starting with "kernel nbd support unavailable".
package attach

import (
	"errors"
	"time"
)

// ErrUnavailable is wrapped by every error caused by missing kernel nbd
// support; its text starts those errors.
var ErrUnavailable = errors.New("kernel nbd support unavailable")

// Options for Attach.
type Options struct {
	// Device is the device to use ("/dev/nbd3"); "" picks the first free
	// one.
	Device string
	// Connections is the number of sockets handed to the kernel (used
	// only when the export advertises NBD_FLAG_CAN_MULTI_CONN); 0 means 1.
	Connections int
	// Timeout is the kernel's per-request timeout; 0 keeps its default.
	Timeout time.Duration
	// ReadOnly attaches the device read-only even if the export is
	// writable.
	ReadOnly bool
}
