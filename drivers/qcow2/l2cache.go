package qcow2

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
)

// l2Table is one cached L2 table (a whole cluster).
type l2Table struct {
	off int64 // host offset, fixed for the entry's life

	// mu protects data and dirty. Readers of entries hold it shared;
	// writers modifying entries hold it exclusively, briefly (never
	// across I/O or while taking other locks).
	mu    sync.RWMutex
	data  []byte
	dirty bool
	gen   uint64 // bumped on every modification

	// Protected by l2Cache.mu.
	refs  int
	elem  *list.Element
	ready chan struct{} // closed once data or err is set
	err   error
}

// l2Cache holds L2 tables by host offset, least recently used first out.
// Dirty tables stay until written back (see image.writeback); pinned ones
// (refs > 0) until released.
type l2Cache struct {
	mu       sync.Mutex // protects m, lru and every table's refs/elem
	m        map[int64]*l2Table
	lru      *list.List // front: most recently used
	capacity int
	size     int64 // cluster size
	dirty    atomic.Int64
	pool     sync.Pool // spare table buffers
}

func newL2Cache(capacity int, clusterSize int64) *l2Cache {
	c := &l2Cache{m: map[int64]*l2Table{}, lru: list.New(), capacity: max(capacity, 2), size: clusterSize}
	c.pool.New = func() any { return make([]byte, clusterSize) }
	return c
}

// get returns the table at off, loading it with load if it is not cached.
// The table is pinned until put.
func (c *l2Cache) get(ctx context.Context, off int64, load func(buf []byte) error) (*l2Table, error) {
	c.mu.Lock()
	t := c.m[off]
	if t != nil {
		t.refs++
		c.lru.MoveToFront(t.elem)
		c.mu.Unlock()
		select {
		case <-t.ready:
		case <-ctx.Done():
			c.put(t)
			return nil, ctx.Err()
		}
		if t.err != nil {
			err := t.err
			c.put(t)
			return nil, err
		}
		return t, nil
	}
	t = &l2Table{off: off, refs: 1, ready: make(chan struct{})}
	t.elem = c.lru.PushFront(t)
	c.m[off] = t
	c.evictLocked()
	c.mu.Unlock()
	buf := c.pool.Get().([]byte)
	err := load(buf)
	if err != nil {
		c.pool.Put(buf)
		c.mu.Lock()
		t.err = err
		if c.m[off] == t {
			delete(c.m, off)
			c.lru.Remove(t.elem)
		}
		close(t.ready)
		t.refs--
		c.mu.Unlock()
		return nil, err
	}
	c.mu.Lock()
	t.data = buf
	close(t.ready)
	c.mu.Unlock()
	return t, nil
}

// insert caches a table whose contents the caller has written to the
// file (a new L2 table), replacing any stale entry, and returns it pinned.
func (c *l2Cache) insert(off int64, data []byte) *l2Table {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.m[off]; old != nil {
		delete(c.m, off)
		c.lru.Remove(old.elem)
		old.mu.Lock()
		if old.dirty {
			old.dirty = false
			c.dirty.Add(-1)
		}
		old.mu.Unlock()
	}
	t := &l2Table{off: off, refs: 1, ready: make(chan struct{}), data: data}
	close(t.ready)
	t.elem = c.lru.PushFront(t)
	c.m[off] = t
	c.evictLocked()
	return t
}

// put releases a pinned table.
func (c *l2Cache) put(t *l2Table) {
	c.mu.Lock()
	t.refs--
	c.evictLocked()
	c.mu.Unlock()
}

// evictLocked drops clean, unpinned tables beyond the capacity. c.mu is
// held.
func (c *l2Cache) evictLocked() {
	for e := c.lru.Back(); e != nil && len(c.m) > c.capacity; {
		prev := e.Prev()
		t := e.Value.(*l2Table)
		if t.refs == 0 && t.data != nil && t.mu.TryLock() {
			if !t.dirty {
				delete(c.m, t.off)
				c.lru.Remove(e)
				c.pool.Put(t.data)
				t.data = nil
			}
			t.mu.Unlock()
		}
		e = prev
	}
}

// overfull reports whether dirty tables keep the cache above its capacity.
func (c *l2Cache) overfull() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m) > c.capacity && c.dirty.Load() > 0
}

// markDirty records a modification of t; t.mu is held exclusively.
func (c *l2Cache) markDirty(t *l2Table) {
	t.gen++
	if !t.dirty {
		t.dirty = true
		c.dirty.Add(1)
	}
}

// dirtyTables returns the dirty tables, pinned.
func (c *l2Cache) dirtyTables() []*l2Table {
	if c.dirty.Load() == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*l2Table
	for _, t := range c.m {
		if t.data == nil {
			continue
		}
		t.mu.RLock()
		d := t.dirty
		t.mu.RUnlock()
		if d {
			t.refs++
			out = append(out, t)
		}
	}
	return out
}

// drop forgets everything (close).
func (c *l2Cache) drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m = map[int64]*l2Table{}
	c.lru.Init()
	c.dirty.Store(0)
}
