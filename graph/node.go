// Package graph is blockd's block graph: the Node interface every driver
// implements, the optional capabilities a node may have, the child edges
// that connect nodes (with roles and permissions), node names, and the one
// validation layer (range checks, read-only, alignment) every request passes.
package graph

import (
	"context"
)

// ReqFlags modify a single request.
type ReqFlags uint32

const (
	// FUA asks that the data be on stable storage when the call returns.
	FUA ReqFlags = 1 << iota
	// MayUnmap lets WriteZeroes deallocate the range (NBD's !NO_HOLE).
	MayUnmap
	// NoFallback makes WriteZeroes fail with ErrNotSupported rather than
	// writing explicit zero buffers (NBD's FAST_ZERO).
	NoFallback
)

// Node is one block device in the graph. All methods are safe to call in
// parallel. ReadAt fills all of p or returns an error; WriteAt writes all of
// p or returns an error. Offsets and lengths have already been checked by the
// graph's validation layer against Size() and the node's Limits.
type Node interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, f ReqFlags) error
	// Size is the current virtual size in bytes.
	Size() int64
	Flush(ctx context.Context) error
	Close() error
}

// Zeroer is implemented by nodes that can write zeroes without a data buffer.
// With MayUnmap the node may deallocate; with NoFallback it must return
// ErrNotSupported instead of writing slowly.
type Zeroer interface {
	WriteZeroes(ctx context.Context, off, n int64, f ReqFlags) error
}

// Discarder is implemented by nodes that can deallocate a range. After a
// discard the range reads as unspecified data unless BlockStatus says zero.
type Discarder interface {
	Discard(ctx context.Context, off, n int64) error
}

// ExtentFlags describe a range as reported by BlockStatus.
type ExtentFlags uint32

const (
	// ExtentHole: the range is not allocated in this node (it may be
	// allocated below, e.g. in a backing file).
	ExtentHole ExtentFlags = 1 << iota
	// ExtentZero: the range reads as zeroes.
	ExtentZero
	// ExtentData (with ExtentZero): the format maps data there that reads
	// as zeroes, because the file holds a hole (QEMU's BDRV_BLOCK_DATA
	// together with BDRV_BLOCK_ZERO).
	ExtentData
)

// Extent is one run of a BlockStatus answer.
type Extent struct {
	Length int64
	Flags  ExtentFlags
}

// BlockStatuser reports allocation for [off, off+n). It returns at least one
// extent; the extents are contiguous, start at off and may end before off+n
// (the caller asks again) but never after it.
type BlockStatuser interface {
	BlockStatus(ctx context.Context, off, n int64) ([]Extent, error)
}

// Limits tell the validation layer how a node wants its requests.
type Limits struct {
	// Align is the request alignment in bytes (a power of two, 0 or 1 means
	// byte-granular). Requests to the node are widened with
	// read-modify-write so the driver only sees aligned offsets and lengths.
	Align int64
	// MaxTransfer is the largest request the node accepts (0: no limit).
	MaxTransfer int64
	// MemAlign is the buffer alignment the node needs (O_DIRECT), 0 if none.
	MemAlign int
}

// Limiter is implemented by nodes with alignment or size limits.
type Limiter interface {
	Limits() Limits
}

// Resizer is implemented by nodes that can change their size.
type Resizer interface {
	Truncate(ctx context.Context, size int64) error
}

// Prealloc is a preallocation mode for Truncate-style growth.
type Prealloc string

const (
	PreallocOff      Prealloc = "off"
	PreallocMetadata Prealloc = "metadata"
	PreallocFalloc   Prealloc = "falloc"
	PreallocFull     Prealloc = "full"
)

// PreallocResizer is implemented by nodes that can grow with preallocation.
type PreallocResizer interface {
	TruncatePrealloc(ctx context.Context, size int64, mode Prealloc) error
}

// Cacher is implemented by nodes that can prefetch a range (NBD_CMD_CACHE).
type Cacher interface {
	Cache(ctx context.Context, off, n int64) error
}

// ImageInfo is what a node reports for query-named-block-nodes' "image"
// member beyond what the graph knows itself.
type ImageInfo struct {
	// Filename overrides the node's filename ("" means inherit from the
	// file child, as QEMU does for format drivers).
	Filename string
	// ActualSize is the allocated size on the host, -1 if unknown.
	ActualSize int64
	// ClusterSize, DirtyFlag and Encrypted are optional; zero values are
	// omitted.
	ClusterSize int64
	DirtyFlag   *bool
	Encrypted   bool
	// BackingFilename is the backing file named in the image, if any.
	BackingFilename       string
	FullBackingFilename   string
	BackingFilenameFormat string
	// Snapshots are the image's internal snapshots (nil: none).
	Snapshots []SnapshotInfo
	// FormatSpecific is {type, data} as QEMU reports it, or nil.
	FormatSpecific any
}

// SnapshotInfo is QEMU's SnapshotInfo: one internal snapshot.
type SnapshotInfo struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	Icount      *int64 `json:"icount,omitempty"`
}

// Infoer is implemented by nodes with more to say in queries.
type Infoer interface {
	Info() ImageInfo
}
