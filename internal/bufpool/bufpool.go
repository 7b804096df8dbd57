// Package bufpool hands out byte buffers from one sync.Pool per
// power-of-two size class, from 4 KiB to 32 MiB, so that request paths do
// not allocate per request once warm. The pools hold *[]byte so that Put
// does not allocate either. Buffers come back with old contents.
package bufpool

import (
	"math/bits"
	"sync"
)

const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB

	// Max is the largest buffer the pools hold; Get makes larger ones
	// without pooling.
	Max = 1 << maxClassShift
)

var pools [maxClassShift - minClassShift + 1]sync.Pool

func init() {
	for i := range pools {
		size := 1 << (minClassShift + i)
		pools[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// class returns the pool index for a buffer of n bytes (n <= Max).
func class(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// Get returns a buffer with len n. The returned pointer must be handed
// back to Put.
func Get(n int) *[]byte {
	if n > Max {
		b := make([]byte, n)
		return &b
	}
	bp := pools[class(n)].Get().(*[]byte)
	*bp = (*bp)[:n]
	return bp
}

// Put returns a buffer obtained from Get; nil is ignored.
func Put(bp *[]byte) {
	if bp == nil || cap(*bp) > Max {
		return
	}
	b := (*bp)[:cap(*bp)]
	*bp = b
	pools[class(cap(b))].Put(bp)
}
