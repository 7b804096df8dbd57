package file

import (
	"context"
	"math"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockd/graph"
	"blockd/internal/qapi"
)

// PreallocMode is QAPI's PreallocMode enum.
type PreallocMode string

func (PreallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// CreateOptions is BlockdevCreateOptionsFile.
type CreateOptions struct {
	Filename       string       `json:"filename"`
	Size           qapi.Size    `json:"size"`
	Preallocation  PreallocMode `json:"preallocation,omitempty"`
	Nocow          *bool        `json:"nocow,omitempty"`
	ExtentSizeHint *qapi.Size   `json:"extent-size-hint,omitempty"`
}

// Linux ioctls and flags the x/sys/unix package does not define (generic
// _IOC encoding, as on x86 and arm).
const (
	fsIocFsgetxattr = 0x801c581f // _IOR('X', 31, struct fsxattr)
	fsIocFssetxattr = 0x401c5820 // _IOW('X', 32, struct fsxattr)
	fsXflagExtsize  = 0x00000800
	fsNocowFl       = 0x00800000
)

// fsxattr is struct fsxattr from <linux/fs.h>.
type fsxattr struct {
	xflags     uint32
	extsize    uint32
	nextents   uint32
	projid     uint32
	cowextsize uint32
	pad        [8]byte
}

var _ [28 - unsafe.Sizeof(fsxattr{})]byte

func create(ctx context.Context, _ *graph.CreateContext, opts any) error {
	return Create(ctx, opts.(*CreateOptions))
}

// Create implements blockdev-create for the file driver, as QEMU's
// raw_co_create: it creates the file or empties an existing one, holding
// the write and resize image locks (and not sharing resize) while it works,
// sets the nocow flag and the extent size hint where the file system has
// them (best effort), then resizes the file to size with the requested
// preallocation.
func Create(ctx context.Context, o *CreateOptions) error {
	hint := uint64(1 << 20)
	if o.ExtentSizeHint != nil {
		hint = uint64(*o.ExtentSizeHint)
	}
	if hint > math.MaxUint32 {
		return errorf(unix.EINVAL, "Extent size hint is too large")
	}
	prealloc := graph.Prealloc(o.Preallocation)
	if prealloc == "" {
		prealloc = graph.PreallocOff
	}
	fd, err := openFile(o.Filename, unix.O_RDWR|unix.O_CREAT, "create")
	if err != nil {
		return err
	}
	// Write to empty the file and resize to size it; nobody else may
	// resize it meanwhile.
	const perm = graph.PermWrite | graph.PermResize
	const shared = graph.PermAll &^ graph.PermResize
	lk := lockBytes{fd: fd, filename: o.Filename}
	err = lk.apply(perm, ^shared, false)
	if err == nil {
		err = lk.check(perm, shared)
		if err == nil {
			err = createBody(ctx, fd, o, hint, prealloc)
		}
		lk.releaseAll()
	}
	if cerr := unix.Close(fd); cerr != nil && err == nil {
		err = errnoErrorf(cerr, "Could not close the new file")
	}
	return err
}

func createBody(ctx context.Context, fd int, o *CreateOptions, hint uint64, prealloc graph.Prealloc) error {
	if err := truncateFile(ctx, fd, 0, graph.PreallocOff); err != nil {
		return err
	}
	if o.Nocow != nil && *o.Nocow {
		// Turns off copy-on-write on btrfs; ignored where unsupported.
		if attr, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS); err == nil {
			_ = unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, attr|fsNocowFl)
		}
	}
	// The extent size hint (XFS) is an optimisation: failures are ignored
	// (QEMU only warns).
	var attr fsxattr
	if ioctlPtr(fd, fsIocFsgetxattr, &attr) == nil {
		attr.xflags |= fsXflagExtsize
		attr.extsize = uint32(hint)
		_ = ioctlPtr(fd, fsIocFssetxattr, &attr)
	}
	return truncateFile(ctx, fd, int64(o.Size), prealloc)
}
