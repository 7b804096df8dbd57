package nbd

import "blockd/internal/bufpool"

// Buffers for request payloads and read data come from internal/bufpool,
// so the request loop does not allocate per request once warm; requests
// are at most maxPayload (32 MiB == bufpool.Max).
func getBuf(n int) *[]byte { return bufpool.Get(n) }

func putBuf(bp *[]byte) { bufpool.Put(bp) }

// zeroBuf is a read-only buffer of zeroes used to write zeroes on nodes
// without a graph.Zeroer. Nodes must not modify the buffer passed to WriteAt.
var zeroBuf = make([]byte, 1<<20)
