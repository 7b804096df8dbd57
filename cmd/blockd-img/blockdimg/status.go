package blockdimg

import (
	"context"

	"blockd/drivers/raw"
	"blockd/graph"
)

// blockStatus is one answer about a range, in QEMU's terms
// (BDRV_BLOCK_DATA, _ZERO, _ALLOCATED, _OFFSET_VALID).
type blockStatus struct {
	length    int64
	data      bool
	zero      bool
	allocated bool // allocated in the node asked (present)
	depth     int  // how many backing files down the answer came from
	// offset, when offsetValid, is where the range starts in file.
	offsetValid bool
	offset      int64
	file        *graph.BDS
}

// supportsBacking reports whether a node's format has backing files: for
// those an unallocated range is not "present"; for the others (protocols,
// raw, luks) every range is allocated, holes included, as in QEMU.
func supportsBacking(b *graph.BDS) bool {
	return b.Driver().Name == "qcow2"
}

// statusOne asks one node about [off, off+n) through edge c (the node's
// own answer, without looking at backing files).
func statusOne(ctx context.Context, c *graph.Child, off, n int64) (blockStatus, error) {
	ext, err := c.BlockStatus(ctx, off, n)
	if err != nil {
		return blockStatus{}, err
	}
	if len(ext) == 0 || ext[0].Length <= 0 {
		return blockStatus{length: n, data: true, allocated: true}, nil
	}
	x := ext[0]
	b := c.BDS()
	st := blockStatus{length: min(x.Length, n)}
	hole := x.Flags&graph.ExtentHole != 0
	st.zero = x.Flags&graph.ExtentZero != 0
	st.data = !hole && (!st.zero || x.Flags&graph.ExtentData != 0)
	st.allocated = !hole || !supportsBacking(b)
	if hole && !supportsBacking(b) {
		st.zero = true
	}
	st.offsetValid, st.offset, st.file = hostOffset(ctx, b, off, st.length, st.data || st.zero)
	return st, nil
}

// hostOffset finds where guest offset off of node b sits in a protocol
// node, for nodes whose mapping is known: protocols, raw and formats with
// a host mapping capability.
func hostOffset(ctx context.Context, b *graph.BDS, off, n int64, mapped bool) (bool, int64, *graph.BDS) {
	for {
		switch {
		case b.Driver().Protocol:
			return true, off, b
		case b.Driver().Name == "raw":
			if ro, ok := b.Options().Extra.(*raw.Options); ok && ro.Offset != nil {
				off += *ro.Offset
			}
			var file *graph.Child
			for _, c := range b.Children() {
				if c.Name() == "file" {
					file = c
				}
			}
			if file == nil {
				return false, 0, nil
			}
			b = file.BDS()
		default:
			if hm := formatHostMapper(b); hm != nil && mapped {
				h, f, ok := hm(ctx, off, n)
				if !ok || f == nil {
					return false, 0, nil
				}
				off, b = h, f
				continue
			}
			return false, 0, nil
		}
	}
}

// statusAbove answers for the whole backing chain of the node behind c,
// down to (but not including) base, as bdrv_block_status_above: a range
// unallocated in a node is looked up in its backing file.
func statusAbove(ctx context.Context, c *graph.Child, base *graph.BDS, off, n int64) (blockStatus, error) {
	depth := 0
	for {
		st, err := statusOne(ctx, c, off, n)
		if err != nil {
			return st, err
		}
		st.depth = depth
		if st.allocated {
			return st, nil
		}
		bk := cowChild(c.BDS())
		if bk == nil || bk.BDS() == base {
			// No backing file: unallocated reads as zeroes.
			if bk == nil {
				st.zero = true
			}
			return st, nil
		}
		if off >= bk.Size() {
			st.zero = true
			return st, nil
		}
		n = min(st.length, bk.Size()-off)
		c = bk
		depth++
	}
}
