package file

import (
	"context"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

var _ graph.Reopener = (*Node)(nil)

// PrepareReopen implements graph.Reopener as QEMU's raw_reopen_prepare: a
// node becoming writable or read-only opens its file again, read-write or
// read-only (a block device set read-only with blockdev --setro fails with
// EACCES), and the new descriptor takes the image locks the node holds
// before it replaces the old one; a node becoming read-only is flushed
// first. The old descriptor stays open until commit closes it (its locks
// go with it); abort goes back to it and closes the new one. Under
// auto-read-only the descriptor already follows the write permission
// (SetPerm), so nothing changes here. No request is in flight.
func (n *Node) PrepareReopen(ctx context.Context, readOnly bool) (commit, abort func(), err error) {
	n.permMu.Lock()
	defer n.permMu.Unlock()
	n.mu.RLock()
	closed, rw := n.fd < 0, n.rw
	n.mu.RUnlock()
	if closed {
		return nil, nil, graph.ErrClosed
	}
	want := !readOnly
	if n.autoRO || want == rw {
		return nil, nil, nil
	}
	if readOnly {
		if err := n.Flush(ctx); err != nil {
			return nil, nil, err
		}
	}
	fd, err := openFile(n.filename, openFlags(want, n.direct), "open")
	if err != nil {
		return nil, nil, err
	}
	if want {
		if err := checkWritable(fd); err != nil {
			unix.Close(fd)
			return nil, nil, errnoErrorf(err, "The device is not writable")
		}
	}
	nl := lockBytes{fd: fd, filename: n.filename}
	if n.useLock {
		if err := nl.apply(n.perm, ^n.shared, false); err != nil {
			unix.Close(fd)
			return nil, nil, err
		}
	}
	n.mu.Lock()
	oldFd, oldLocks := n.fd, n.locks
	n.fd, n.rw, n.locks = fd, want, nl
	n.mu.Unlock()
	n.data.invalidate(0, -1)
	// The new descriptor holds the node's locks now, so the old one lets
	// go of its own: a permission change before the commit (a parent
	// reopened read-write in the same blockdev-reopen) is not refused by
	// the locks of the node's own old descriptor.
	held, unshared := oldLocks.held, oldLocks.unshared
	if n.useLock {
		oldLocks.releaseAll()
	}
	commit = func() { unix.Close(oldFd) }
	abort = func() {
		n.permMu.Lock()
		defer n.permMu.Unlock()
		n.mu.Lock()
		cur := n.locks
		unix.Close(cur.fd)
		if n.useLock {
			// Nothing else could take what the new descriptor held.
			_ = oldLocks.apply(held, unshared, false)
		}
		n.fd, n.rw, n.locks = oldFd, rw, oldLocks
		n.mu.Unlock()
		n.data.invalidate(0, -1)
	}
	return commit, abort, nil
}
