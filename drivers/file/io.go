package file

import (
	"context"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

func ioctlPtr[T any](fd int, req uint, arg *T) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(arg)))
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return e
	}
}

func fallocate(fd int, mode uint32, off, n int64) error {
	for {
		err := unix.Fallocate(fd, mode, off, n)
		if err != unix.EINTR {
			return err
		}
	}
}

// preadFull fills p from off. A read that ends early at end of file fills
// the rest with zeroes (QEMU does the same; it happens for the tail of a
// file whose size is not a multiple of 512, or of the O_DIRECT alignment).
// With O_DIRECT, EINVAL after a short read means end of file as well.
func preadFull(fd int, p []byte, off int64, direct bool) error {
	done := 0
	for done < len(p) {
		m, err := unix.Pread(fd, p[done:], off+int64(done))
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			if err == unix.EINVAL && direct && done > 0 {
				break
			}
			return err
		}
		if m == 0 {
			break
		}
		done += m
	}
	clear(p[done:])
	return nil
}

func pwriteFull(fd int, p []byte, off int64) error {
	done := 0
	for done < len(p) {
		m, err := unix.Pwrite(fd, p[done:], off+int64(done))
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return err
		}
		if m == 0 {
			return unix.EIO
		}
		done += m
	}
	return nil
}

// ReadAt reads len(p) bytes at off. With O_DIRECT, p may have any memory
// alignment and off and len(p) need not be aligned: such requests are
// served through a bounce buffer.
func (n *Node) ReadAt(_ context.Context, p []byte, off int64) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	if !n.direct {
		return preadFull(n.fd, p, off, false)
	}
	a := n.align
	if (off|int64(len(p)))&(a-1) == 0 && isAligned(p, n.memAlign) {
		return preadFull(n.fd, p, off, true)
	}
	chunk := max(int64(bounceMax), a)
	for len(p) > 0 {
		start := off &^ (a - 1)
		head := off - start
		l := min(int64(len(p)), chunk-head)
		end := (off + l + a - 1) &^ (a - 1)
		bp := getBounce(int(end-start), n.memAlign)
		err := preadFull(n.fd, (*bp)[:end-start], start, true)
		if err == nil {
			copy(p[:l], (*bp)[head:])
		}
		putBounce(bp)
		if err != nil {
			return err
		}
		p, off = p[l:], off+l
	}
	return nil
}

// WriteAt writes p at off; FUA makes it stable before returning (unless
// cache.no-flush). With O_DIRECT, off and len(p) must be multiples of the
// alignment (the graph guarantees it); p may have any memory alignment.
func (n *Node) WriteAt(_ context.Context, p []byte, off int64, f graph.ReqFlags) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	if err := n.write(p, off); err != nil {
		return err
	}
	if f&graph.FUA != 0 {
		return n.sync()
	}
	return nil
}

// write is WriteAt without FUA. n.mu is held shared.
func (n *Node) write(p []byte, off int64) error {
	if !n.direct {
		return pwriteFull(n.fd, p, off)
	}
	a := n.align
	if (off|int64(len(p)))&(a-1) != 0 {
		return unix.EINVAL
	}
	if isAligned(p, n.memAlign) {
		return pwriteFull(n.fd, p, off)
	}
	chunk := max(bounceMax, int(a))
	for len(p) > 0 {
		l := min(len(p), chunk)
		bp := getBounce(l, n.memAlign)
		b := (*bp)[:l]
		copy(b, p)
		err := pwriteFull(n.fd, b, off)
		putBounce(bp)
		if err != nil {
			return err
		}
		p, off = p[l:], off+int64(l)
	}
	return nil
}

// sync is fdatasync with QEMU's rule that once a flush of a buffered file
// failed, the page cache is suspect and every later flush fails as well.
// n.mu is held shared.
func (n *Node) sync() error {
	if n.noFlush {
		return nil
	}
	if e := n.flushErr.Load(); e != 0 {
		return unix.Errno(e)
	}
	for {
		err := unix.Fdatasync(n.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil && !n.direct {
			if en, ok := err.(unix.Errno); ok {
				n.flushErr.CompareAndSwap(0, int32(en))
			}
		}
		return err
	}
}

// Flush makes written data stable (fdatasync), unless cache.no-flush.
func (n *Node) Flush(context.Context) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	return n.sync()
}

// WriteZeroes zeroes [off, off+length) without a data buffer: with
// MayUnmap by punching a hole, else with FALLOC_FL_ZERO_RANGE, or punching
// a hole and reallocating it; block devices use BLKZEROOUT (not with
// NoFallback, because the kernel may fall back to writing zeroes). When
// none works it returns graph.ErrNotSupported and the graph writes zero
// buffers unless the caller asked for NoFallback.
func (n *Node) WriteZeroes(_ context.Context, off, length int64, f graph.ReqFlags) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	err := n.writeZeroes(off, length, f)
	// Zeroing may deallocate (a punched hole, or unwritten extents that
	// SEEK_HOLE reports as holes), also when it failed half-way.
	n.data.invalidate(off, length)
	if err != nil {
		return err
	}
	if f&graph.FUA != 0 {
		return n.sync()
	}
	return nil
}

// writeZeroes follows QEMU's handle_aiocb_write_zeroes_unmap and
// handle_aiocb_write_zeroes. n.mu is held shared.
func (n *Node) writeZeroes(off, length int64, f graph.ReqFlags) error {
	fd := n.fd
	if f&graph.MayUnmap != 0 {
		err := fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		switch {
		case err == nil:
			return nil
		case notSupported(err), err == unix.EINVAL, err == unix.EBUSY:
		default:
			return err
		}
	}
	if !n.regular {
		if n.blockdev && f&graph.NoFallback == 0 {
			r := [2]uint64{uint64(off), uint64(length)}
			err := ioctlPtr(fd, unix.BLKZEROOUT, &r)
			if err == nil || !notSupported(err) {
				return err
			}
		}
		return errNotSupported("write zeroes")
	}
	if !n.noZeroRange.Load() {
		err := fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, off, length)
		switch {
		case err == nil:
			return nil
		case notSupported(err):
			n.noZeroRange.Store(true)
		case err != unix.EINVAL:
			// EINVAL: some file systems refuse unaligned ranges; try
			// the other ways.
			return err
		}
	}
	if !n.noDiscard.Load() && !n.noFallocate.Load() {
		err := fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		switch {
		case err == nil:
			err = fallocate(fd, 0, off, length)
			if err == nil || !notSupported(err) {
				return err
			}
			n.noFallocate.Store(true)
		case notSupported(err):
			n.noDiscard.Store(true)
		case err != unix.EINVAL:
			return err
		}
	}
	if !n.noFallocate.Load() {
		// Past the end of the file, allocating is zeroing.
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && off >= st.Size {
			err := fallocate(fd, 0, off, length)
			if err == nil || !notSupported(err) {
				return err
			}
			n.noFallocate.Store(true)
		}
	}
	return errNotSupported("write zeroes")
}

// Discard deallocates [off, off+length): a punched hole in a file,
// BLKDISCARD on a block device. File systems that cannot get
// graph.ErrNotSupported (the graph then ignores the request).
func (n *Node) Discard(_ context.Context, off, length int64) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	if n.noDiscard.Load() {
		return errNotSupported("discard")
	}
	var err error
	switch {
	case n.blockdev:
		r := [2]uint64{uint64(off), uint64(length)}
		err = ioctlPtr(n.fd, unix.BLKDISCARD, &r)
	case n.regular:
		err = fallocate(n.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	default:
		err = unix.ENOTSUP
	}
	n.data.invalidate(off, length)
	if err != nil && notSupported(err) {
		n.noDiscard.Store(true)
		return errNotSupported("discard")
	}
	return err
}

// maxExtents bounds the extents one BlockStatus call returns.
const maxExtents = 64

// BlockStatus reports holes (graph.ExtentHole|graph.ExtentZero) and data
// from SEEK_DATA/SEEK_HOLE, following QEMU's find_allocation: a trailing
// hole or a range past the end of the file is a hole; a file system that
// cannot tell reports data. Data extents found are remembered (see
// dataCache), so requests inside a known data extent cost no system call.
func (n *Node) BlockStatus(_ context.Context, off, length int64) ([]graph.Extent, error) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return nil, graph.ErrClosed
	}
	end := off + length
	if e, ok := n.data.lookup(off); ok && n.dataLen(off, e) >= length {
		// The common case of a read inside a known data extent.
		return []graph.Extent{{Length: length}}, nil
	}
	var out []graph.Extent
	add := func(l int64, fl graph.ExtentFlags) {
		if k := len(out); k > 0 && out[k-1].Flags == fl {
			out[k-1].Length += l
		} else {
			out = append(out, graph.Extent{Length: l, Flags: fl})
		}
		off += l
	}
	const hole = graph.ExtentHole | graph.ExtentZero
	busy := 0 // lookups that lost a race with a concurrent punch
	for off < end && len(out) < maxExtents {
		if e, ok := n.data.lookup(off); ok {
			add(min(n.dataLen(off, e), end-off), 0)
			continue
		}
		gen := n.data.generation()
		data, holeAt, err := n.findAllocation(off)
		switch {
		case err == unix.ENXIO:
			add(end-off, hole)
		case err == unix.EBUSY && busy < 3:
			// off became a hole between the two seeks: look again rather
			// than calling the rest of the range data.
			busy++
		case err != nil:
			add(end-off, 0)
		case data == off:
			n.data.store(gen, off, holeAt)
			add(min(n.dataLen(off, holeAt), end-off), 0)
		default:
			add(min(data-off, end-off), hole)
		}
	}
	return out, nil
}

// dataLen is the length of the data from off to the hole at holeAt in
// whole blocks: a partial block at the end of the file counts as a whole
// one, as in QEMU.
func (n *Node) dataLen(off, holeAt int64) int64 {
	l := holeAt - off
	if a := n.align; l&(a-1) != 0 {
		l = (l + a - 1) &^ (a - 1)
	}
	return l
}

// findAllocation returns, for start in data, data=start and the next hole;
// for start in a hole, hole=start and the next data. ENXIO means start is
// in a trailing hole or past the end of the file. n.mu is held shared.
func (n *Node) findAllocation(start int64) (data, hole int64, err error) {
	offs, err := seek(n.fd, start, unix.SEEK_DATA)
	if err != nil {
		return 0, 0, err
	}
	if offs < start {
		return 0, 0, unix.EIO
	}
	if offs > start {
		return offs, start, nil
	}
	offs, err = seek(n.fd, start, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, err
	}
	if offs < start {
		return 0, 0, unix.EIO
	}
	if offs > start {
		return start, offs, nil
	}
	// A hole was punched between the two calls.
	return 0, 0, unix.EBUSY
}

// Cache asks the kernel to read [off, off+length) ahead (NBD_CMD_CACHE).
func (n *Node) Cache(_ context.Context, off, length int64) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	err := unix.Fadvise(n.fd, off, length, unix.FADV_WILLNEED)
	if err != nil && notSupported(err) {
		return nil
	}
	return err
}

// Truncate resizes the file without preallocation.
func (n *Node) Truncate(ctx context.Context, size int64) error {
	return n.TruncatePrealloc(ctx, size, graph.PreallocOff)
}

// TruncatePrealloc resizes the file to exactly size bytes, preallocating
// growth with falloc (fallocate) or full (written zeroes), with QEMU's
// rules and error texts. Devices cannot grow; shrinking them does nothing.
func (n *Node) TruncatePrealloc(ctx context.Context, size int64, mode graph.Prealloc) error {
	n.truncMu.Lock()
	defer n.truncMu.Unlock()
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.fd < 0 {
		return graph.ErrClosed
	}
	if mode == "" {
		mode = graph.PreallocOff
	}
	var err error
	if n.regular {
		err = truncateFile(ctx, n.fd, size, mode)
	} else {
		err = n.truncateDevice(size, mode)
	}
	n.data.invalidate(0, -1)
	if sz, serr := n.fileSize(n.fd); serr == nil {
		n.size.Store(sz)
	}
	return err
}

func (n *Node) truncateDevice(size int64, mode graph.Prealloc) error {
	if mode != graph.PreallocOff {
		return errorf(graph.ErrNotSupported, "Preallocation mode '%s' unsupported for this non-regular file", mode)
	}
	cur, err := n.fileSize(n.fd)
	if err != nil {
		return errnoErrorf(err, "Could not refresh total sector count")
	}
	if size > cur {
		return errorf(unix.EINVAL, "Cannot grow device files")
	}
	return nil
}

// truncateFile is QEMU's handle_aiocb_truncate for a regular file on fd.
func truncateFile(ctx context.Context, fd int, size int64, mode graph.Prealloc) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return errnoErrorf(err, "Could not stat file")
	}
	cur := st.Size
	if cur > size && mode != graph.PreallocOff {
		return errorf(graph.ErrNotSupported, "Cannot use preallocation for shrinking files")
	}
	var err error
	switch mode {
	case graph.PreallocOff:
		if err := unix.Ftruncate(fd, size); err != nil {
			return errnoErrorf(err, "Could not resize file")
		}
		if cur == 0 && size > 0 {
			allocateFirstBlock(fd, size)
		}
		return nil
	case graph.PreallocFalloc:
		if size == cur {
			return nil
		}
		if e := posixFallocate(ctx, fd, cur, size-cur); e != nil {
			err = errnoErrorf(e, "Could not preallocate new data")
		} else if cur == 0 {
			allocateFirstBlock(fd, size)
		}
	case graph.PreallocFull:
		err = fillZeroes(ctx, fd, cur, size)
	default:
		return errorf(graph.ErrNotSupported, "Unsupported preallocation mode: %s", mode)
	}
	if err != nil {
		// Restore the old length; nothing to report if that fails too.
		_ = unix.Ftruncate(fd, cur)
	}
	return err
}

// fillZeroes grows the file from cur to size by writing zeroes, then
// syncs it (preallocation=full).
func fillZeroes(ctx context.Context, fd int, cur, size int64) error {
	if err := unix.Ftruncate(fd, size); err != nil {
		return errnoErrorf(err, "Could not resize file")
	}
	if size <= cur {
		return nil
	}
	// The descriptor may be O_DIRECT: then use aligned buffers and writes
	// (maxAlign is a multiple of any alignment probed), starting with the
	// partial block at cur read back from the file, and cut the file back
	// to size at the end.
	bp := getBounce(bounceMax, 0)
	defer putBounce(bp)
	buf := *bp
	clear(buf)
	off := cur
	fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	direct := fl&unix.O_DIRECT != 0
	if direct && off&(maxAlign-1) != 0 {
		start := off &^ (maxAlign - 1)
		blk := buf[:maxAlign]
		err := preadFull(fd, blk, start, true)
		if err == nil {
			err = pwriteFull(fd, blk, start)
		}
		clear(blk)
		if err != nil {
			return errnoErrorf(err, "Could not write zeros for preallocation")
		}
		off = start + maxAlign
	}
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		l := min(int64(len(buf)), size-off)
		if direct {
			l = (l + maxAlign - 1) &^ (maxAlign - 1)
		}
		if err := pwriteFull(fd, buf[:l], off); err != nil {
			return errnoErrorf(err, "Could not write zeros for preallocation")
		}
		off += l
	}
	if err := unix.Fsync(fd); err != nil {
		return errnoErrorf(err, "Could not flush file to disk")
	}
	if off > size {
		// An aligned tail write went past size.
		if err := unix.Ftruncate(fd, size); err != nil {
			return errnoErrorf(err, "Could not resize file")
		}
	}
	return nil
}

// posixFallocate allocates [off, off+n) like posix_fallocate(3): with
// fallocate when the file system has it, else by writing.
func posixFallocate(ctx context.Context, fd int, off, n int64) error {
	err := fallocate(fd, 0, off, n)
	if err != unix.EOPNOTSUPP {
		return err
	}
	return allocateByWriting(ctx, fd, off, n)
}

// allocateByWriting is glibc's posix_fallocate fallback: it writes a zero
// byte into every block of [off, off+n) that reads as zero, extending the
// file to off+n if it is shorter.
func allocateByWriting(ctx context.Context, fd int, off, n int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	end := off + n
	if st.Size < end {
		if err := unix.Ftruncate(fd, end); err != nil {
			return err
		}
	}
	bs := int64(st.Blksize)
	if bs <= 0 || bs&(bs-1) != 0 {
		bs = 4096
	}
	var one [1]byte
	for o := off &^ (bs - 1); o < end; o += bs {
		if err := ctx.Err(); err != nil {
			return err
		}
		at := max(o, off)
		if _, err := unix.Pread(fd, one[:], at); err != nil {
			return err
		}
		if one[0] == 0 {
			if _, err := unix.Pwrite(fd, one[:], at); err != nil {
				return err
			}
		}
	}
	return nil
}

// allocateFirstBlock writes zeroes to the start of a file that was empty,
// so that later O_DIRECT alignment probing sees data rather than a hole
// (QEMU's allocate_first_block: 512 bytes, 4 KiB when the file is at least
// that big; a smaller file thus grows to 512 bytes). Errors are ignored.
func allocateFirstBlock(fd int, size int64) {
	n := 512
	if size >= maxAlign {
		n = maxAlign
	}
	bp := getBounce(maxAlign, 0)
	b := (*bp)[:n]
	clear(b)
	_ = pwriteFull(fd, b, 0)
	putBounce(bp)
}
