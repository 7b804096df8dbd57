//go:build !linux

package qmp

import "net"

// watchHangup does not watch outside Linux: a disconnected client's command
// runs to its end.
func watchHangup(conn net.Conn, gone func()) (stop func()) { return func() {} }
