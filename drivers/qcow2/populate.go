package qcow2

import (
	"bytes"
	"context"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/bufpool"
)

var (
	_ graph.Populator       = (*node)(nil)
	_ graph.BackingReplacer = (*node)(nil)
)

// populateChunk bounds the buffer of one copy-up.
const populateChunk = 1 << 20

// Populate implements graph.Populator, QEMU's copy-on-read as the stream
// job drives it: with the guest clusters of the range locked for writing
// (the stripes every write takes), each run still unallocated in the image
// is read from the backing chain and written to the image, zero runs as
// zero clusters where the version has them (as bdrv_co_do_copy_on_readv
// does for a buffer of zeroes). A guest write to the range waits for the
// copy or has already allocated its clusters, which the copy then skips:
// the copy never overwrites what a guest wrote.
func (n *node) Populate(ctx context.Context, off, l int64) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	m := n.image
	st := m.lockStripes(off, l, true)
	defer m.unlockStripes(st)
	if m.backing == nil {
		return nil // everything unallocated reads as zeroes already
	}
	for pos, end := off, off+l; pos < end; {
		r, err := m.mapRun(ctx, pos, end-pos)
		if err != nil {
			return err
		}
		if r.typ == qcow2fmt.SubUnallocatedPlain || r.typ == qcow2fmt.SubUnallocatedAlloc {
			if err := m.copyUp(ctx, pos, r.n); err != nil {
				return err
			}
		}
		pos += r.n
	}
	return nil
}

// copyUp copies [off, off+l) from the backing chain into the image; the
// stripes are held for writing.
func (m *image) copyUp(ctx context.Context, off, l int64) error {
	bp := bufpool.Get(int(min(l, populateChunk)))
	defer bufpool.Put(bp)
	for l > 0 {
		k := min(l, populateChunk)
		buf := (*bp)[:k]
		if err := m.readBacking(ctx, buf, off); err != nil {
			return err
		}
		var err error
		if m.version >= 3 && !m.dataFileRaw && allZero(buf) {
			err = m.zeroes(ctx, off, k, 0)
		} else {
			err = m.write(ctx, buf, off)
		}
		if err != nil {
			return err
		}
		off, l = off+k, l-k
	}
	return nil
}

var zeroes4k [4096]byte

func allZero(p []byte) bool {
	for len(p) > 0 {
		k := min(len(p), len(zeroes4k))
		if !bytes.Equal(p[:k], zeroes4k[:k]) {
			return false
		}
		p = p[k:]
	}
	return true
}

// ReplaceBacking implements graph.BackingReplacer: the backing child
// becomes c (nil: none) at the end of a stream job. The graph holds the
// node's requests drained; the fields ExplicitBacking reads change under
// metaMu. The backing child is now the graph's choice, not the header's
// (QEMU compares it with the header's name for the node's filename).
func (n *node) ReplaceBacking(c *graph.Child) {
	n.metaMu.Lock()
	defer n.metaMu.Unlock()
	n.backing = c
	n.noBacking = false
	n.explicitBacking = true
	n.headerBacking = n.h.BackingFile
}
