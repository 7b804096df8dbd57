package file

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

// Image locking, compatible with QEMU (block/file-posix.c). For every
// permission bit i (consistent read=0, write=1, write unchanged=2,
// resize=3) a user that holds the permission takes a shared (read) lock on
// byte 100+i, and a user that does not share it takes a shared lock on byte
// 200+i. Before taking a permission a user tests for a lock on byte 200+i
// (someone does not share it), and for every permission it does not share
// it tests byte 100+i (someone holds it). Tests probe for a write lock with
// F_OFD_GETLK, so the caller's own locks (same open file description) never
// count. All locks are read locks, so holders never block each other; only
// the tests see conflicts. QEMU 7.2 has only these four permissions (the
// old graph-mod bit, bytes 104 and 204, is gone). Which permissions each
// user takes and shares is the graph's business (graph.childPerm, the
// export's backend); tests/e2e TestImageLocksMatchQSD compares the bytes
// with qemu-storage-daemon's.

const (
	lockPermBase   = 100
	lockSharedBase = 200
	numPerms       = 4
)

// lockOps are the fcntl commands used for locks: OFD locks when the kernel
// has them (QEMU's qemu_probe_lock_ops), process-associated POSIX locks
// otherwise.
var lockOps struct {
	once         sync.Once
	setlk, getlk int
	ofd          bool
}

func probeLockOps() {
	lockOps.once.Do(func() {
		lockOps.setlk, lockOps.getlk = unix.F_SETLK, unix.F_GETLK
		fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return
		}
		defer unix.Close(fd)
		fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
		if unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &fl) == nil {
			lockOps.setlk, lockOps.getlk = unix.F_OFD_SETLK, unix.F_OFD_GETLK
			lockOps.ofd = true
		}
	})
}

// HasOFDLocks reports whether the kernel supports open file description
// locks; locking=auto turns image locking on only when it does.
func HasOFDLocks() bool {
	probeLockOps()
	return lockOps.ofd
}

func lockFcntl(fd int, off int64, typ int16) error {
	probeLockOps()
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
	for {
		err := unix.FcntlFlock(uintptr(fd), lockOps.setlk, &fl)
		if err != unix.EINTR {
			return err
		}
	}
}

// lockTest reports whether another open file description holds a lock on
// byte off that conflicts with a write lock (QEMU's qemu_lock_fd_test with
// exclusive=true).
func lockTest(fd int, off int64) (bool, error) {
	probeLockOps()
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	for {
		err := unix.FcntlFlock(uintptr(fd), lockOps.getlk, &fl)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, err
		}
		return fl.Type != unix.F_UNLCK, nil
	}
}

// lockErr builds QEMU's raw_lock_error_setg_errno text: the errno is left
// out for EAGAIN and EACCES, which mean "someone else holds it".
func lockErr(filename string, errno error, format string, a ...any) error {
	msg := fmt.Sprintf(format, a...)
	if errno != unix.EAGAIN && errno != unix.EACCES {
		msg += ": " + strerror(errno)
	}
	return &LockError{Msg: msg, Filename: filename, Err: errno}
}

// lockBytes is the set of lock bytes held on one file descriptor.
type lockBytes struct {
	fd       int
	filename string
	held     graph.Perm // bytes 100+i held
	unshared graph.Perm // bytes 200+i held
}

// apply takes the locks for perm (bytes 100+i) and unshared (bytes 200+i)
// that are not held yet; with unlock it also releases the ones held but no
// longer wanted (QEMU's raw_apply_lock_bytes). On error the bytes taken so
// far stay held and recorded.
func (l *lockBytes) apply(perm, unshared graph.Perm, unlock bool) error {
	perm &= graph.PermAll
	unshared &= graph.PermAll
	for _, set := range []struct {
		base   int64
		want   graph.Perm
		locked *graph.Perm
	}{{lockPermBase, perm, &l.held}, {lockSharedBase, unshared, &l.unshared}} {
		for i := 0; i < numPerms; i++ {
			bit := graph.Perm(1) << i
			off := set.base + int64(i)
			switch {
			case set.want&bit != 0 && *set.locked&bit == 0:
				if err := lockFcntl(l.fd, off, unix.F_RDLCK); err != nil {
					return lockErr(l.filename, err, "Failed to lock byte %d", off)
				}
				*set.locked |= bit
			case unlock && *set.locked&bit != 0 && set.want&bit == 0:
				if err := lockFcntl(l.fd, off, unix.F_UNLCK); err != nil {
					return errnoErrorf(err, "Failed to unlock byte %d", off)
				}
				*set.locked &^= bit
			}
		}
	}
	return nil
}

// releaseAll drops every lock byte, whatever the recorded state says.
func (l *lockBytes) releaseAll() {
	l.held, l.unshared = graph.PermAll, graph.PermAll
	_ = l.apply(0, 0, true)
	l.held, l.unshared = 0, 0
}

// check tests that nobody else holds locks that conflict with holding perm
// and sharing only shared (QEMU's raw_check_lock_bytes).
func (l *lockBytes) check(perm, shared graph.Perm) error {
	for i := 0; i < numPerms; i++ {
		p := graph.Perm(1) << i
		if perm&p == 0 {
			continue
		}
		busy, err := lockTest(l.fd, lockSharedBase+int64(i))
		if err != nil {
			return lockErr(l.filename, err, "Failed to get \"%s\" lock", p)
		}
		if busy {
			return lockErr(l.filename, unix.EAGAIN, "Failed to get \"%s\" lock", p)
		}
	}
	for i := 0; i < numPerms; i++ {
		p := graph.Perm(1) << i
		if shared&p != 0 {
			continue
		}
		busy, err := lockTest(l.fd, lockPermBase+int64(i))
		if err != nil {
			return lockErr(l.filename, err, "Failed to get shared \"%s\" lock", p)
		}
		if busy {
			return lockErr(l.filename, unix.EAGAIN, "Failed to get shared \"%s\" lock", p)
		}
	}
	return nil
}

// change moves the locks from (cur, curShared) to (perm, shared): it takes
// the union first, checks for conflicts, then drops what is no longer
// needed, as QEMU's prepare/commit pair does. On error the old locks are
// restored.
func (l *lockBytes) change(cur, curShared, perm, shared graph.Perm) error {
	if cur|perm != cur || curShared&shared != curShared {
		err := l.apply(cur|perm, ^curShared|^shared, false)
		if err == nil {
			err = l.check(perm, shared)
		}
		if err != nil {
			_ = l.apply(cur, ^curShared, true)
			return err
		}
	}
	// Dropping locks cannot conflict; like QEMU, a failure here is not a
	// reason to refuse the change.
	_ = l.apply(perm, ^shared, true)
	return nil
}
