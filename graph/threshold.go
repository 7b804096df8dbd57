package graph

import "fmt"

// WriteThresholdEvent is the data of BLOCK_WRITE_THRESHOLD.
type WriteThresholdEvent struct {
	NodeName       string `json:"node-name"`
	AmountExceeded uint64 `json:"amount-exceeded"`
	WriteThreshold uint64 `json:"write-threshold"`
}

// SetWriteThreshold sets the offset past which a write, write-zeroes or
// discard on the node raises BLOCK_WRITE_THRESHOLD, once (QEMU's
// block-set-write-threshold); 0 disables it.
func (g *Graph) SetWriteThreshold(nodeName string, threshold uint64) error {
	g.mu.Lock()
	b := g.byName[nodeName]
	g.mu.Unlock()
	if b == nil {
		return fmt.Errorf("Device '%s' not found", nodeName)
	}
	b.writeThreshold.Store(threshold)
	return nil
}

// checkThreshold raises BLOCK_WRITE_THRESHOLD when a write to b ends past
// its threshold, and disables the threshold (QEMU's
// bdrv_write_threshold_check_write): one atomic load per write when no
// threshold is set.
func (b *BDS) checkThreshold(off, n int64) {
	t := b.writeThreshold.Load()
	if t == 0 || uint64(off+n) <= t {
		return
	}
	if b.writeThreshold.CompareAndSwap(t, 0) {
		b.g.Emit("BLOCK_WRITE_THRESHOLD", WriteThresholdEvent{NodeName: b.name, AmountExceeded: uint64(off+n) - t, WriteThreshold: t})
	}
}
