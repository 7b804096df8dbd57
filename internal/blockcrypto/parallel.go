package blockcrypto

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// Large requests are cut into parts of about parallelMin/4 bytes (whole
// sectors). The calling goroutine and any idle helper goroutines claim
// parts one at a time until none is left; the caller then waits only for
// the parts a helper is still working on. A helper that is slow to get a
// CPU (a busy machine) delays the request by at most the part it claimed:
// the caller does the parts nobody took. The helpers are started on demand, at most
// GOMAXPROCS-1 for the whole process, and stay parked on helperWork
// between requests, so a split request allocates nothing (a goroutine
// per part would allocate its closure and a WaitGroup).

// split is one request being done in parts. It is pooled; the last of the
// caller and the helpers it was handed to puts it back.
type split struct {
	c     *Cipher
	step  uint64
	ss    int
	enc   bool
	parts []part

	next    atomic.Int32  // index of the next part to claim
	pending atomic.Int32  // parts not finished yet
	refs    atomic.Int32  // the caller and the helpers holding the split
	done    chan struct{} // receives one value when pending reaches 0
}

// part is a run of whole sectors; sector k of it has IV number
// first + k*step.
type part struct {
	dst, src []byte
	first    uint64
}

var (
	splitPool = sync.Pool{New: func() any { return &split{done: make(chan struct{}, 1)} }}

	// helperWork is unbuffered: a send succeeds only when a helper is
	// parked in its receive, that is idle.
	helperWork = make(chan *split)
	helpers    atomic.Int32
)

// parallel does a large request (sector k has IV number first + k*step)
// in parts on the calling goroutine and on idle helpers.
func (c *Cipher) parallel(dst, src []byte, first, step uint64, ss int, enc bool) {
	nsect := len(src) / ss
	per := max(1, parallelMin/4/ss)
	sp := splitPool.Get().(*split)
	sp.c, sp.step, sp.ss, sp.enc = c, step, ss, enc
	for lo := 0; lo < nsect; lo += per {
		hi := min(lo+per, nsect)
		sp.parts = append(sp.parts, part{dst: dst[lo*ss : hi*ss], src: src[lo*ss : hi*ss], first: first + uint64(lo)*step})
	}
	sp.next.Store(0)
	sp.pending.Store(int32(len(sp.parts)))
	sp.refs.Store(1)
	for range min(len(sp.parts), runtime.GOMAXPROCS(0)) - 1 {
		sp.refs.Add(1)
		if !handOff(sp) {
			sp.refs.Add(-1)
			break
		}
	}
	sp.work()
	<-sp.done
	sp.release()
}

// work claims and does parts until none is left.
func (sp *split) work() {
	for {
		i := int(sp.next.Add(1)) - 1
		if i >= len(sp.parts) {
			return
		}
		p := &sp.parts[i]
		sp.c.crypt(p.dst, p.src, p.first, sp.step, sp.ss, sp.enc)
		if sp.pending.Add(-1) == 0 {
			sp.done <- struct{}{}
		}
	}
}

// release drops a reference; the last one returns the split to the pool.
func (sp *split) release() {
	if sp.refs.Add(-1) != 0 {
		return
	}
	clear(sp.parts) // drop the references to the request's buffers
	sp.parts = sp.parts[:0]
	sp.c = nil
	splitPool.Put(sp)
}

// handOff gives sp to an idle helper, starting one if fewer than
// GOMAXPROCS-1 exist, and reports whether it did.
func handOff(sp *split) bool {
	select {
	case helperWork <- sp:
		return true
	default:
	}
	for {
		n := helpers.Load()
		if int(n) >= runtime.GOMAXPROCS(0)-1 {
			return false
		}
		if helpers.CompareAndSwap(n, n+1) {
			go helper(sp)
			return true
		}
	}
}

// helper works on the splits handed to it until the process exits.
func helper(sp *split) {
	for {
		sp.work()
		sp.release()
		sp = <-helperWork
	}
}
