// Package file is blockd's "file" protocol driver: a node backed by a host
// file, compatible with QEMU's block/file-posix.c (options, open flags,
// error texts, image locking, block status, preallocation and
// blockdev-create). HostDeviceDriver is the same code for block and
// character devices ("host_device"), which QEMU's "file" driver refuses.
//
// Every request is a pread/pwrite (or fallocate, lseek...) issued by the
// calling goroutine; with cache.direct=on the file is opened with O_DIRECT,
// the node reports the probed alignment in its Limits, and buffers that are
// not aligned in memory go through pooled bounce buffers.
package file

import (
	"context"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"blockd/graph"
	"blockd/internal/qapi"
)

// OnOffAuto is QAPI's OnOffAuto enum (the locking option).
type OnOffAuto string

func (OnOffAuto) EnumValues() []string { return []string{"auto", "on", "off"} }

// AioMode is BlockdevAioOptions. blockd always does its I/O from the
// calling goroutine; the value is checked as QEMU checks it.
type AioMode string

func (AioMode) EnumValues() []string { return []string{"threads", "native", "io_uring"} }

// Options is BlockdevOptionsFile (also used by host_device).
type Options struct {
	Filename           string    `json:"filename"`
	PrManager          string    `json:"pr-manager,omitempty"`
	Locking            OnOffAuto `json:"locking,omitempty"`
	Aio                AioMode   `json:"aio,omitempty"`
	AioMaxBatch        *int64    `json:"aio-max-batch,omitempty"`
	DropCache          *bool     `json:"drop-cache,omitempty"`
	XCheckCacheDropped *bool     `json:"x-check-cache-dropped,omitempty"`
}

// Driver returns the "file" driver: regular files only, with
// blockdev-create.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:     "file",
		Protocol: true,
		Options:  func() any { return new(Options) },
		Open: func(_ context.Context, o *graph.Opener, opts any) (graph.Node, error) {
			return open(o, opts.(*Options), false)
		},
		CreateOptions: func() any { return new(CreateOptions) },
		Create:        create,
	}
}

// HostDeviceDriver returns the "host_device" driver: block and character
// devices, with the same options as "file".
func HostDeviceDriver() *graph.Driver {
	return &graph.Driver{
		Name:     "host_device",
		Protocol: true,
		Options:  func() any { return new(Options) },
		Open: func(_ context.Context, o *graph.Opener, opts any) (graph.Node, error) {
			return open(o, opts.(*Options), true)
		},
	}
}

// Node is an open file. All methods are safe for concurrent use.
type Node struct {
	filename string
	regular  bool // a regular file (else a block or character device)
	blockdev bool
	direct   bool // O_DIRECT
	noFlush  bool // cache.no-flush: Flush and FUA do nothing
	autoRO   bool // auto-read-only: read-write only while a writer exists
	align    int64
	memAlign int

	// mu guards fd against being closed or replaced while in use: every
	// request holds it shared; Close and the auto-read-only fd switch hold
	// it exclusively. fd is -1 once closed.
	mu sync.RWMutex
	fd int
	rw bool // fd is open read-write

	// size is the cached virtual size: the file size rounded up to 512
	// bytes, as QEMU reports it. Set at open and after each truncate.
	size atomic.Int64

	// Capabilities the file system turned out not to have (QEMU's
	// has_write_zeroes, has_discard, has_fallocate, cleared on ENOTSUP).
	noZeroRange, noDiscard, noFallocate atomic.Bool

	// data remembers data extents for BlockStatus.
	data dataCache

	// flushErr is the errno of a failed fdatasync on a buffered file:
	// after one, the page cache can no longer be trusted and every later
	// flush fails too.
	flushErr atomic.Int32

	// truncMu serialises Truncate calls.
	truncMu sync.Mutex

	// permMu protects the image locks and the permissions they reflect.
	permMu       sync.Mutex
	useLock      bool
	locks        lockBytes
	perm, shared graph.Perm
}

// The optional capabilities of graph/node.go and graph/graph.go. Left out on purpose: Amender and ExplicitBackinger (a protocol node has no format metadata and no backing file).
var (
	_ graph.Zeroer          = (*Node)(nil)
	_ graph.Discarder       = (*Node)(nil)
	_ graph.BlockStatuser   = (*Node)(nil)
	_ graph.Limiter         = (*Node)(nil)
	_ graph.Resizer         = (*Node)(nil)
	_ graph.PreallocResizer = (*Node)(nil)
	_ graph.Cacher          = (*Node)(nil)
	_ graph.Infoer          = (*Node)(nil)
	_ graph.PermSetter      = (*Node)(nil)
	_ graph.StrongOptioner  = (*Node)(nil)
)

var (
	_ graph.Node            = (*Node)(nil)
	_ graph.Zeroer          = (*Node)(nil)
	_ graph.Discarder       = (*Node)(nil)
	_ graph.BlockStatuser   = (*Node)(nil)
	_ graph.Limiter         = (*Node)(nil)
	_ graph.Resizer         = (*Node)(nil)
	_ graph.PreallocResizer = (*Node)(nil)
	_ graph.Cacher          = (*Node)(nil)
	_ graph.PermSetter      = (*Node)(nil)
	_ graph.Infoer          = (*Node)(nil)
)

// openFile opens name with QEMU's error texts (qemu_open_internal): action
// is "open" or "create".
func openFile(name string, flags int, action string) (int, error) {
	for {
		fd, err := unix.Open(name, flags|unix.O_CLOEXEC, 0o644)
		if err == nil {
			return fd, nil
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EINVAL && flags&unix.O_DIRECT != 0 {
			if fd2, err2 := unix.Open(name, (flags&^unix.O_DIRECT)|unix.O_CLOEXEC, 0o644); err2 == nil {
				unix.Close(fd2)
				return -1, errorf(err, "Could not %s '%s': filesystem does not support O_DIRECT", action, name)
			}
		}
		return -1, errnoErrorf(err, "Could not %s '%s'", action, name)
	}
}

func openFlags(rw, direct bool) int {
	f := unix.O_RDONLY
	if rw {
		f = unix.O_RDWR
	}
	if direct {
		f |= unix.O_DIRECT
	}
	return f
}

// checkWritable fails with EACCES for a block device set read-only with
// blockdev --setro (QEMU's check_hdev_writable).
func checkWritable(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil
	}
	ro, err := unix.IoctlGetInt(fd, unix.BLKROGET)
	if err != nil {
		return err
	}
	if ro != 0 {
		return unix.EACCES
	}
	return nil
}

// open opens a file node; device selects host_device semantics. The checks
// and their order follow QEMU's raw_open_common.
func open(o *graph.Opener, opts *Options, device bool) (graph.Node, error) {
	c := o.Common()
	drvName := "file"
	if device {
		drvName = "host_device"
	}
	var useLock bool
	switch opts.Locking {
	case "on":
		useLock = true
	case "off":
	default:
		useLock = HasOFDLocks()
	}
	if opts.PrManager != "" {
		// blockd has no pr-manager objects.
		return nil, errorf(graph.ErrNotFound, "No persistent reservation manager with id '%s'", opts.PrManager)
	}
	ro := o.ReadOnly()
	autoRO := !ro && c.AutoReadOnly != nil && *c.AutoReadOnly
	rw := !ro && !autoRO
	direct := c.Direct()
	fd, err := openFile(opts.Filename, openFlags(rw, direct), "open")
	if err != nil {
		return nil, err
	}
	fail := func(err error) (graph.Node, error) {
		unix.Close(fd)
		return nil, err
	}
	if rw {
		if err := checkWritable(fd); err != nil {
			return fail(errnoErrorf(err, "The device is not writable"))
		}
	}
	if opts.Aio == "native" && !direct {
		return fail(errorf(unix.EINVAL, "aio=native was specified, but it requires cache.direct=on, which was not specified."))
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(errnoErrorf(err, "Could not stat file"))
	}
	mode := st.Mode & unix.S_IFMT
	if !device && mode != unix.S_IFREG {
		return fail(errorf(unix.EINVAL, "'%s' driver requires '%s' to be a regular file", drvName, opts.Filename))
	}
	if device && mode != unix.S_IFBLK && mode != unix.S_IFCHR {
		return fail(errorf(unix.EINVAL, "'%s' driver requires '%s' to be either a character or block device", drvName, opts.Filename))
	}
	n := &Node{
		filename: opts.Filename,
		regular:  mode == unix.S_IFREG,
		blockdev: mode == unix.S_IFBLK,
		direct:   direct,
		noFlush:  c.NoFlush(),
		autoRO:   autoRO,
		align:    1,
		fd:       fd,
		rw:       rw,
		useLock:  useLock,
		shared:   graph.PermAll,
		locks:    lockBytes{fd: fd, filename: opts.Filename},
	}
	if direct {
		if n.align, n.memAlign, err = probeAlignment(fd); err != nil {
			return fail(err)
		}
	}
	size, err := n.fileSize(fd)
	if err != nil {
		return fail(errnoErrorf(err, "Could not refresh total sector count"))
	}
	n.size.Store(size)
	return n, nil
}

// roundSector rounds a byte count up to whole 512-byte sectors: QEMU keeps
// sizes in sectors, so a 1000-byte file is a 1024-byte node whose tail
// reads as zeroes.
func roundSector(n int64) int64 { return (n + 511) &^ 511 }

// fileSize returns the current virtual size of the file on fd.
func (n *Node) fileSize(fd int) (int64, error) {
	if n.regular {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return 0, err
		}
		return roundSector(st.Size), nil
	}
	if n.blockdev {
		var sz uint64
		if err := ioctlPtr(fd, unix.BLKGETSIZE64, &sz); err == nil {
			return roundSector(int64(sz)), nil
		}
	}
	end, err := unix.Seek(fd, 0, unix.SEEK_END)
	if err != nil {
		return 0, err
	}
	return roundSector(end), nil
}

// Filename returns the filename the node was opened with.
func (n *Node) Filename() string { return n.filename }

// Size returns the virtual size in bytes (cached; see Truncate).
func (n *Node) Size() int64 { return n.size.Load() }

// Limits reports the O_DIRECT alignment (1 and 0 for buffered I/O).
func (n *Node) Limits() graph.Limits {
	return graph.Limits{Align: n.align, MemAlign: n.memAlign}
}

// Info reports the file's name and allocated size.
func (n *Node) Info() graph.ImageInfo {
	info := graph.ImageInfo{Filename: n.filename, ActualSize: -1}
	dirty := false
	info.DirtyFlag = &dirty
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return info
	}
	var st unix.Stat_t
	if unix.Fstat(n.fd, &st) == nil {
		info.ActualSize = st.Blocks * 512
	}
	return info
}

// SetPerm applies the permissions the node's users hold as QEMU-compatible
// image locks and, with auto-read-only, reopens the file read-write while
// anybody holds a write permission (read-only again when nobody does).
func (n *Node) SetPerm(perm, shared graph.Perm) error {
	n.permMu.Lock()
	defer n.permMu.Unlock()
	n.mu.RLock()
	closed := n.fd < 0
	n.mu.RUnlock()
	if closed {
		return graph.ErrClosed
	}
	newFd := -1
	wantRW := n.rw
	if n.autoRO {
		wantRW = perm&(graph.PermWrite|graph.PermWriteUnchanged|graph.PermResize) != 0
	}
	if wantRW != n.rw {
		fd, err := openFile(n.filename, openFlags(wantRW, n.direct), "open")
		if err != nil {
			return err
		}
		if wantRW {
			if err := checkWritable(fd); err != nil {
				unix.Close(fd)
				return errnoErrorf(err, "The device is not writable")
			}
		}
		newFd = fd
	}
	if n.useLock {
		if err := n.locks.change(n.perm, n.shared, perm, shared); err != nil {
			if newFd >= 0 {
				unix.Close(newFd)
			}
			return err
		}
	}
	if newFd >= 0 {
		nl := lockBytes{fd: newFd, filename: n.filename}
		if n.useLock {
			if err := nl.apply(perm, ^shared, false); err != nil {
				unix.Close(newFd)
				_ = n.locks.change(perm, shared, n.perm, n.shared)
				return err
			}
		}
		n.mu.Lock()
		old := n.fd
		n.fd, n.rw = newFd, wantRW
		n.mu.Unlock()
		n.data.invalidate(0, -1)
		// Closing the old descriptor drops its locks; the new one holds
		// the same set.
		unix.Close(old)
		n.locks = nl
	}
	n.perm, n.shared = perm, shared
	return nil
}

// Close closes the file, which releases its image locks. It is idempotent.
func (n *Node) Close() error {
	n.permMu.Lock()
	defer n.permMu.Unlock()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.fd < 0 {
		return nil
	}
	err := unix.Close(n.fd)
	n.fd = -1
	n.locks.fd = -1
	n.locks.held, n.locks.unshared = 0, 0
	if err != nil {
		return errnoErrorf(err, "Could not close '%s'", n.filename)
	}
	return nil
}

// StrongOptions reports the filename, the option that says what the node
// is (it appears in json: filenames of the nodes above).
func (n *Node) StrongOptions() qapi.Object {
	return qapi.Object{{Name: "filename", Value: n.filename}}
}
