package daemon

import (
	"context"
	"errors"

	"blockd/nbd/attach"
)

// AttachLocal connects an export to the local kernel as a /dev/nbdN device
// (what qemu-nbd --connect does); the device is detached when the daemon
// closes. device may be empty to take the first free one.
func (d *Daemon) AttachLocal(ctx context.Context, exportName, device string, readOnly bool) (string, error) {
	d.mu.Lock()
	st := d.nbd
	d.mu.Unlock()
	if st == nil {
		return "", errors.New("NBD server not running")
	}
	dev, err := attach.Attach(ctx, st.srv, exportName, attach.Options{Device: device, ReadOnly: readOnly})
	if err != nil {
		return "", err
	}
	d.mu.Lock()
	d.attached = append(d.attached, dev)
	d.mu.Unlock()
	return dev.Path, nil
}
