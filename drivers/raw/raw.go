// Package raw is the raw format driver: the file child's bytes as they are,
// optionally a window [offset, offset+size) of them.
package raw

import (
	"context"
	"fmt"

	"blockd/graph"
	"blockd/internal/qapi"
)

// Options is BlockdevOptionsRaw.
type Options struct {
	File   graph.Ref `json:"file"`
	Offset *int64    `json:"offset,omitempty"`
	Size   *int64    `json:"size,omitempty"`
}

// Driver returns the raw driver.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:          "raw",
		Options:       func() any { return new(Options) },
		Open:          open,
		CreateOptions: nil,
	}
}

type node struct {
	file    *graph.Child
	offset  int64
	hasSize bool
	size    int64
}

// The optional capabilities of graph/node.go, each passed down to file. Left out on purpose: PermSetter (the file node below takes the locks), Resizer (PreallocResizer covers plain truncation), Amender and ExplicitBackinger (raw has no metadata and no backing file).
var (
	_ graph.Zeroer          = (*node)(nil)
	_ graph.Discarder       = (*node)(nil)
	_ graph.BlockStatuser   = (*node)(nil)
	_ graph.Limiter         = (*node)(nil)
	_ graph.PreallocResizer = (*node)(nil)
	_ graph.Cacher          = (*node)(nil)
	_ graph.Infoer          = (*node)(nil)
	_ graph.StrongOptioner  = (*node)(nil)
)

func open(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
	opts := v.(*Options)
	n := &node{}
	// QEMU converts these to QemuOpts sizes, which reject negatives.
	if opts.Offset != nil && *opts.Offset < 0 {
		return nil, fmt.Errorf("Parameter 'offset' expects a non-negative number below 2^64")
	}
	if opts.Size != nil && *opts.Size < 0 {
		return nil, fmt.Errorf("Parameter 'size' expects a non-negative number below 2^64")
	}
	if opts.Offset != nil {
		n.offset = *opts.Offset
	}
	if opts.Size != nil {
		n.hasSize, n.size = true, *opts.Size
	}
	role := graph.RoleFiltered | graph.RolePrimary
	if n.offset != 0 || n.hasSize {
		role = graph.RoleData | graph.RolePrimary
	}
	file, err := o.Child(ctx, "file", &opts.File, graph.ChildSpec{Role: role, OnlyWhenNeeded: true})
	if err != nil {
		return nil, err
	}
	n.file = file
	real := file.Size()
	if n.offset < 0 || uint64(n.offset) > uint64(real) {
		return nil, fmt.Errorf("Offset (%d) cannot be greater than size of the containing file (%d)", uint64(n.offset), real)
	}
	if n.hasSize && (n.size < 0 || real-n.offset < n.size) {
		return nil, fmt.Errorf("The sum of offset (%d) and size (%d) has to be smaller or equal to the  actual size of the containing file (%d)", n.offset, uint64(n.size), real)
	}
	if n.hasSize && n.size%512 != 0 {
		return nil, fmt.Errorf("Specified size is not multiple of 512")
	}
	return n, nil
}

func (n *node) Size() int64 {
	if n.hasSize {
		return n.size
	}
	return max(n.file.Size()-n.offset, 0)
}

func (n *node) ReadAt(ctx context.Context, p []byte, off int64) error {
	return n.file.ReadAt(ctx, p, off+n.offset)
}

func (n *node) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	return n.file.WriteAt(ctx, p, off+n.offset, f)
}

func (n *node) WriteZeroes(ctx context.Context, off, l int64, f graph.ReqFlags) error {
	return n.file.WriteZeroes(ctx, off+n.offset, l, f)
}

func (n *node) Discard(ctx context.Context, off, l int64) error {
	return n.file.Discard(ctx, off+n.offset, l)
}

func (n *node) BlockStatus(ctx context.Context, off, l int64) ([]graph.Extent, error) {
	return n.file.BlockStatus(ctx, off+n.offset, l)
}

func (n *node) Cache(ctx context.Context, off, l int64) error {
	return n.file.Cache(ctx, off+n.offset, l)
}

func (n *node) Flush(ctx context.Context) error { return n.file.Flush(ctx) }

// TruncatePrealloc resizes the file child (block_resize).
func (n *node) TruncatePrealloc(ctx context.Context, size int64, mode graph.Prealloc) error {
	if n.hasSize {
		return fmt.Errorf("Cannot resize fixed-size raw disks: %w", graph.ErrNotSupported)
	}
	if size > 1<<63-1-n.offset {
		return fmt.Errorf("Disk size too large for the chosen offset")
	}
	return n.file.Truncate(ctx, size+n.offset, mode)
}

func (n *node) Limits() graph.Limits { return n.file.Limits() }

// Info passes the file's dirty flag through (QEMU's raw_get_info asks the
// file node, so raw over null-co has none).
func (n *node) Info() graph.ImageInfo {
	in := graph.ImageInfo{ActualSize: -1}
	if fi, ok := n.file.BDS().Node().(graph.Infoer); ok {
		in.DirtyFlag = fi.Info().DirtyFlag
	}
	return in
}

// StrongOptions reports offset and size, which change what the node shows.
func (n *node) StrongOptions() qapi.Object {
	var o qapi.Object
	if n.offset != 0 {
		o = append(o, qapi.Member{Name: "offset", Value: n.offset})
	}
	if n.hasSize {
		o = append(o, qapi.Member{Name: "size", Value: n.size})
	}
	return o
}

func (n *node) Close() error { return nil }
