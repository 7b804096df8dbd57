package file

import (
	"math/bits"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxAlign is the largest alignment probed for O_DIRECT, QEMU's
// MAX(MAX_BLOCKSIZE, page size) on the usual 4 KiB-page hosts.
const maxAlign = 4096

const (
	xfsIocDioinfo = 0x800c581e // _IOR('X', 30, struct dioattr)
	nfsSuperMagic = 0x6969
)

var errNoAlignment = &Error{Msg: "Could not find working O_DIRECT alignment", Err: unix.EINVAL}

// alignedBuf returns a zeroed n-byte slice whose first byte is aligned to
// align (a power of two).
func alignedBuf(n, align int) []byte {
	if align <= 1 {
		return make([]byte, n)
	}
	b := make([]byte, n+align)
	o := int(uintptr(unsafe.Pointer(&b[0])) & uintptr(align-1))
	if o != 0 {
		o = align - o
	}
	return b[o : o+n : o+n]
}

// isAligned reports whether p starts at a multiple of align.
func isAligned(p []byte, align int) bool {
	if align <= 1 || len(p) == 0 {
		return true
	}
	return uintptr(unsafe.Pointer(&p[0]))&uintptr(align-1) == 0
}

// ioAligned reports whether an O_DIRECT read of buf at offset 0 is accepted
// (QEMU's raw_is_io_aligned): Linux answers EINVAL for a misaligned request
// and any other outcome says nothing against the alignment.
func ioAligned(fd int, buf []byte) bool {
	for {
		_, err := unix.Pread(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		return err != unix.EINVAL
	}
}

// probeAlignment finds the request and memory alignment O_DIRECT needs on
// fd, the way QEMU's raw_probe_alignment does: the logical block size from
// BLKSSZGET (block devices) or XFS_IOC_DIOINFO, else trial reads of 1, 512,
// 1024, 2048 and 4096 bytes; the memory alignment by trial reads into
// buffers offset from a 4 KiB boundary.
func probeAlignment(fd int) (align int64, memAlign int, err error) {
	var sfs unix.Statfs_t
	if unix.Fstatfs(fd, &sfs) == nil && sfs.Type == nfsSuperMagic {
		// NFS accepts byte-aligned direct I/O.
		return 1, 0, nil
	}
	if v, err := unix.IoctlGetInt(fd, unix.BLKSSZGET); err == nil && v > 0 {
		align = int64(v)
	}
	var dio struct{ mem, miniosz, maxiosz uint32 }
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), xfsIocDioinfo, uintptr(unsafe.Pointer(&dio))); e == 0 && dio.miniosz > 0 {
		align = int64(dio.miniosz)
	}
	sizes := []int{1, 512, 1024, 2048, 4096}
	if align == 0 {
		buf := alignedBuf(maxAlign, maxAlign)
		for _, a := range sizes {
			if ioAligned(fd, buf[:a]) {
				align = int64(a)
				if a == 1 {
					// Probing failed (e.g. an empty file): use a safe value.
					align = maxAlign
				}
				break
			}
		}
	}
	buf := alignedBuf(2*maxAlign, maxAlign)
	for _, a := range sizes {
		if ioAligned(fd, buf[a:a+maxAlign]) {
			memAlign = a
			if a == 1 {
				memAlign = int(align)
			}
			break
		}
	}
	if align == 0 || memAlign == 0 || bits.OnesCount64(uint64(align)) != 1 || bits.OnesCount(uint(memAlign)) != 1 {
		return 0, 0, errNoAlignment
	}
	return align, memAlign, nil
}

// Bounce buffers for O_DIRECT requests whose caller buffer is not aligned
// in memory. One sync.Pool per size class (4 KiB, 64 KiB, 1 MiB), buffers
// aligned to bounceAlign; larger requests go through in 1 MiB pieces. The
// pools hold *[]byte so Get and Put do not allocate.
const (
	bounceAlign = maxAlign
	bounceMax   = 1 << 20
)

var bounceClasses = [...]int{4 << 10, 64 << 10, bounceMax}

var bouncePools [len(bounceClasses)]sync.Pool

func init() {
	for i, size := range bounceClasses {
		bouncePools[i].New = func() any {
			b := alignedBuf(size, bounceAlign)
			return &b
		}
	}
}

// getBounce returns a buffer of at least n bytes (n <= bounceMax) aligned
// to memAlign; hand it back with putBounce.
func getBounce(n, memAlign int) *[]byte {
	if memAlign > bounceAlign || n > bounceMax {
		b := alignedBuf(n, max(memAlign, bounceAlign))
		return &b
	}
	for i, size := range bounceClasses {
		if n <= size {
			return bouncePools[i].Get().(*[]byte)
		}
	}
	panic("unreachable")
}

func putBounce(bp *[]byte) {
	for i, size := range bounceClasses {
		if cap(*bp) == size && len(*bp) == size && isAligned(*bp, bounceAlign) {
			bouncePools[i].Put(bp)
			return
		}
	}
}
