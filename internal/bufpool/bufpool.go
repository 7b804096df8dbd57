// Package bufpool hands out byte buffers by power-of-two size class, from
// 4 KiB to 32 MiB, so that request paths do not allocate per request once
// warm. Buffers come back with old contents.
//
// Classes below 64 KiB are sync.Pools of heap buffers (held as *[]byte, so
// that Put does not allocate); the garbage collector empties them. What
// they can hold after a burst is small: at most one buffer of 32 KiB or
// less per request that was in flight.
//
// Classes from 64 KiB up are anonymous memory mappings outside the Go heap,
// kept on free lists and unmapped once unused for a while: a free list
// gives back, every IdlePeriod, as many buffers as it never dipped below
// during the period before. After a burst of large requests the memory
// thus goes back to the system within two periods (1-2 s), where buffers
// on the heap would stay until a collection (minutes, on an idle daemon)
// and then until the runtime returns the pages. A steady load keeps its
// buffers. ReadStats reports the bytes of these large buffers. Using a
// buffer after Put is a fault once it is unmapped, and the race detector
// does not see accesses to mapped memory.
package bufpool

import (
	"math/bits"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	minClassShift   = 12 // 4 KiB
	largeClassShift = 16 // 64 KiB: the first class kept in mappings
	maxClassShift   = 25 // 32 MiB

	// Max is the largest buffer the pools hold; Get makes larger ones
	// without pooling.
	Max = 1 << maxClassShift

	// IdlePeriod is how often the large free lists give back the buffers
	// that were not needed during the period before.
	IdlePeriod = time.Second

	nsmall = largeClassShift - minClassShift
	nlarge = maxClassShift - largeClassShift + 1
)

var small [nsmall]sync.Pool

func init() {
	for i := range small {
		size := 1 << (minClassShift + i)
		small[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// largePool holds the mapped buffers.
type largePool struct {
	mu    sync.Mutex // guards the fields below
	free  [nlarge][]*[]byte
	low   [nlarge]int    // fewest buffers on each free list since the last trim
	out   map[*byte]bool // every mapped buffer by its first byte; true while handed out
	inUse int64          // bytes handed out
	idle  int64          // bytes on the free lists or being unmapped
	peak  int64          // highest inUse since ResetPeak
	timer *time.Timer    // runs trim
	armed bool           // timer is pending
}

var large largePool

var (
	mmapAnon   = mmapAnonymous // replaced by tests
	munmap     = unix.Munmap
	idlePeriod = IdlePeriod // guarded by large.mu; shortened by tests
)

func mmapAnonymous(n int) ([]byte, error) {
	return unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
}

// class returns the class index for a buffer of n bytes (n <= Max).
func class(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// Cap returns the capacity of the buffer Get(n) returns: the memory that
// a request for n bytes holds.
func Cap(n int) int {
	if n > Max {
		return n
	}
	return 1 << (minClassShift + class(n))
}

// Get returns a buffer with len n. The returned pointer must be handed
// back to Put, once, and the buffer not used afterwards.
func Get(n int) *[]byte {
	if n > Max {
		b := make([]byte, n)
		return &b
	}
	c := class(n)
	if c < nsmall {
		bp := small[c].Get().(*[]byte)
		*bp = (*bp)[:n]
		return bp
	}
	bp := getLarge(c - nsmall)
	*bp = (*bp)[:n]
	return bp
}

func getLarge(i int) *[]byte {
	size := int64(1) << (largeClassShift + i)
	l := &large
	l.mu.Lock()
	if k := len(l.free[i]); k > 0 {
		bp := l.free[i][k-1]
		l.free[i][k-1] = nil
		l.free[i] = l.free[i][:k-1]
		l.low[i] = min(l.low[i], k-1)
		l.out[&(*bp)[0]] = true
		l.idle -= size
		l.addInUse(size)
		l.mu.Unlock()
		return bp
	}
	l.mu.Unlock()

	b, err := mmapAnon(int(size))
	if err != nil {
		// Out of mappings: a heap buffer, which Put leaves to the
		// garbage collector.
		b = make([]byte, size)
		return &b
	}
	l.mu.Lock()
	if l.out == nil {
		l.out = make(map[*byte]bool)
	}
	l.out[&b[0]] = true
	l.addInUse(size)
	l.mu.Unlock()
	return &b
}

// addInUse counts handed-out bytes. l.mu is held.
func (l *largePool) addInUse(n int64) {
	l.inUse += n
	l.peak = max(l.peak, l.inUse)
}

// Put returns a buffer obtained from Get; nil is ignored, and so are
// buffers of a large class that are not handed out (returned twice, or
// not from Get).
func Put(bp *[]byte) {
	if bp == nil || cap(*bp) > Max || cap(*bp) == 0 {
		return
	}
	b := (*bp)[:cap(*bp)]
	c := class(cap(b))
	if c < nsmall {
		if cap(b) != 1<<(minClassShift+c) {
			return // not from Get: Get slices class-sized buffers
		}
		*bp = b
		small[c].Put(bp)
		return
	}
	i := c - nsmall
	size := int64(1) << (largeClassShift + i)
	l := &large
	l.mu.Lock()
	defer l.mu.Unlock()
	if int64(cap(b)) != size || !l.out[&b[0]] {
		return
	}
	*bp = b
	l.out[&b[0]] = false
	l.inUse -= size
	l.idle += size
	l.free[i] = append(l.free[i], bp)
	if !l.armed {
		l.armed = true
		if l.timer == nil {
			l.timer = time.AfterFunc(idlePeriod, trim)
		} else {
			l.timer.Reset(idlePeriod)
		}
	}
}

// trim unmaps, per large class, as many idle buffers as stayed unused
// since the last trim (the oldest ones), and runs again while any buffer
// is idle.
func trim() {
	var drop []*[]byte
	var dropped int64
	l := &large
	l.mu.Lock()
	pending := false
	for i := range l.free {
		fl := l.free[i]
		k := min(l.low[i], len(fl))
		if k > 0 {
			drop = append(drop, fl[:k]...)
			n := copy(fl, fl[k:])
			clear(fl[n:])
			fl = fl[:n]
			l.free[i] = fl
			dropped += int64(k) << (largeClassShift + i)
		}
		l.low[i] = len(fl)
		pending = pending || len(fl) > 0
	}
	for _, bp := range drop {
		delete(l.out, &(*bp)[0])
	}
	l.armed = pending
	if pending {
		l.timer.Reset(idlePeriod)
	}
	l.mu.Unlock()
	for _, bp := range drop {
		munmap(*bp)
	}
	if dropped > 0 {
		// Counted as idle until unmapped.
		l.mu.Lock()
		l.idle -= dropped
		l.mu.Unlock()
	}
}

// Stats describes the large buffers (64 KiB and up).
type Stats struct {
	InUse int64 // bytes handed out by Get and not yet returned
	Idle  int64 // bytes kept for reuse
	Peak  int64 // the highest InUse since the last ResetPeak
}

// ReadStats returns the current Stats.
func ReadStats() Stats {
	large.mu.Lock()
	defer large.mu.Unlock()
	return Stats{InUse: large.inUse, Idle: large.idle, Peak: large.peak}
}

// ResetPeak sets Stats.Peak to the current InUse.
func ResetPeak() {
	large.mu.Lock()
	large.peak = large.inUse
	large.mu.Unlock()
}
