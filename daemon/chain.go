package daemon

import (
	"context"

	"blockd/graph"
)

// allocatedAbove is bdrv_is_allocated_above over the layers of a backing
// chain, topmost first (a stream job's nodes between the top and the
// base, a commit job's from its top down to the node above the base):
// whether the first bytes of [off, off+n) are allocated in one of them,
// whether that layer stores them as zeroes (a zero cluster: QEMU's
// BDRV_BLOCK_ZERO, which the commit job writes as zeroes), and for how
// many bytes that answer holds.
func allocatedAbove(ctx context.Context, layers []*graph.Child, off, n int64) (alloc, zero bool, _ int64, _ error) {
	for _, c := range layers {
		size := c.Size()
		if off >= size {
			continue // reads as zeroes from here: not this layer's data
		}
		ext, err := c.BlockStatus(ctx, off, min(n, size-off))
		if err != nil {
			return false, false, 0, err
		}
		if len(ext) == 0 {
			continue
		}
		if f := ext[0].Flags; f&graph.ExtentHole == 0 {
			return true, f&graph.ExtentZero != 0, ext[0].Length, nil
		}
		n = min(n, ext[0].Length)
	}
	return false, false, n, nil
}
