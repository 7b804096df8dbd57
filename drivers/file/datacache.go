package file

import (
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// seek is lseek(2); tests replace it to count the calls.
var seek = unix.Seek

// dataCacheSlots is how many data extents a node remembers: enough for a
// few sequential readers at different places in the file (an NBD client
// with several connections, a copy job next to a guest).
const dataCacheSlots = 4

// dataCache remembers data extents that SEEK_DATA/SEEK_HOLE found, so that
// BlockStatus answers requests inside them without asking the file system
// again. The NBD server asks for the block status of every large READ, and
// on some file systems finding the end of a data extent costs time in
// proportion to the extent (tmpfs walks its page cache from the offset to
// the next hole, which for a fully written image is the end of the file),
// so without the cache a sequential pass over a file is quadratic.
//
// Only data is cached, never holes: writing into a hole makes it data
// without any notice here, while a stale data extent merely reports data
// for what may have become a hole, which is always a correct answer (the
// range reads as whatever it holds). Anything that can deallocate — write
// zeroes, discard, truncate, replacing the descriptor — calls invalidate
// once it is done, so a caller that asks after such a request returns sees
// the hole.
//
// A lookup that raced with an invalidation must not put its (possibly
// stale) answer back: store takes the generation read before the seeks and
// drops the extent when an invalidation happened since.
type dataCache struct {
	gen atomic.Uint64

	mu   sync.Mutex
	ext  [dataCacheSlots]span // empty when end <= start
	next int                  // slot replaced when all are in use
}

// span is the byte range [start, end).
type span struct{ start, end int64 }

func (s span) empty() bool             { return s.end <= s.start }
func (s span) contains(off int64) bool { return s.start <= off && off < s.end }

// touches reports whether s and [start, end) overlap or are adjacent.
func (s span) touches(start, end int64) bool { return s.start <= end && start <= s.end }

// generation returns the value to pass to store for a lookup that starts
// now.
func (c *dataCache) generation() uint64 { return c.gen.Load() }

// lookup returns the end of a cached data extent that contains off.
func (c *dataCache) lookup(off int64) (end int64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.ext {
		if s.contains(off) {
			return s.end, true
		}
	}
	return 0, false
}

// store records [start, end) as data, unless an invalidation happened
// after gen was read. Extents it touches are merged into it: all of them
// are data at this generation.
func (c *dataCache) store(gen uint64, start, end int64) {
	if end <= start {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen.Load() != gen {
		return
	}
	free := -1
	for i, s := range c.ext {
		switch {
		case s.empty():
		case s.touches(start, end):
			start, end = min(start, s.start), max(end, s.end)
			c.ext[i] = span{}
		default:
			continue
		}
		if free < 0 {
			free = i
		}
	}
	if free < 0 {
		free = c.next
		c.next = (c.next + 1) % dataCacheSlots
	}
	c.ext[free] = span{start, end}
}

// invalidate forgets the cached extents that overlap [off, off+n) (all of
// them when n < 0) and makes every lookup that started before the call
// drop its answer. Call it after the request that may have deallocated the
// range has completed.
func (c *dataCache) invalidate(off, n int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen.Add(1)
	for i, s := range c.ext {
		if n < 0 || (s.start < off+n && off < s.end) {
			c.ext[i] = span{}
		}
	}
}
