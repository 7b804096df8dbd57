//go:build !linux

package attach

import (
	"context"
	"fmt"

	"blockd/nbd"
)

// Device is an attached NBD device (Linux only).
type Device struct {
	Path  string
	Size  uint64
	Flags uint16
}

// Available always fails outside Linux.
func Available() error { return fmt.Errorf("%w: not Linux", ErrUnavailable) }

// Attach always fails outside Linux.
func Attach(context.Context, *nbd.Server, string, Options) (*Device, error) {
	return nil, Available()
}

// Detach does nothing.
func (d *Device) Detach() error { return nil }

// Done returns a closed channel.
func (d *Device) Done() <-chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}
