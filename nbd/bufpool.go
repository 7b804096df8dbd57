package nbd

import (
	"math/bits"
	"sync"
)

// Buffers for request payloads and read data come from one sync.Pool per
// power-of-two size class, from 4 KiB to maxPayload, so the request loop
// does not allocate per request once warm. The pools hold *[]byte so that
// Put does not allocate either.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == maxPayload
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func init() {
	for i := range bufPools {
		size := 1 << (minClassShift + i)
		bufPools[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// sizeClass returns the pool index for a buffer of n bytes (n <= maxPayload).
func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a pooled buffer with len n (n <= maxPayload). The returned
// pointer must be handed back to putBuf.
func getBuf(n int) *[]byte {
	bp := bufPools[sizeClass(n)].Get().(*[]byte)
	*bp = (*bp)[:n]
	return bp
}

// putBuf returns a buffer obtained from getBuf.
func putBuf(bp *[]byte) {
	if bp == nil {
		return
	}
	b := (*bp)[:cap(*bp)]
	*bp = b
	bufPools[sizeClass(cap(b))].Put(bp)
}

// zeroBuf is a read-only buffer of zeroes used to write zeroes on nodes
// without a graph.Zeroer. Nodes must not modify the buffer passed to WriteAt.
var zeroBuf = make([]byte, 1<<20)
