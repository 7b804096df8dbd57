package nbd

import (
	"context"
	"sync"
)

// budget bounds the bytes of request buffers (READ data, WRITE payloads)
// in flight. Requests are granted in the order they asked, so a large
// request is never overtaken for good by a stream of small ones. The
// limit is at least maxPayload, so every valid request fits on its own.
type budget struct {
	limit int64 // 0: unlimited

	mu      sync.Mutex // guards used and waiters
	used    int64
	waiters []*budgetWaiter // in arrival order
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed once the bytes are granted
}

// newBudget returns a budget of limit bytes: 0 means def, a negative
// value no limit, and a positive one is raised to maxPayload.
func newBudget(limit, def int64) *budget {
	switch {
	case limit == 0:
		limit = def
	case limit < 0:
		limit = 0
	}
	if limit > 0 {
		limit = max(limit, maxPayload)
	}
	return &budget{limit: limit}
}

// tryAcquire takes n bytes if they are free and nobody waits.
func (b *budget) tryAcquire(n int64) bool {
	if b.limit == 0 {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.waiters) == 0 && b.used+n <= b.limit {
		b.used += n
		return true
	}
	return false
}

// acquire takes n bytes, waiting for them in turn; it fails only when ctx
// ends first.
func (b *budget) acquire(ctx context.Context, n int64) error {
	if b.tryAcquire(n) {
		return nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.mu.Lock()
	b.waiters = append(b.waiters, w)
	b.grantLocked() // the bytes may have come back meanwhile
	b.mu.Unlock()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready: // granted meanwhile: give the bytes back
		b.used -= n
	default:
		for i, x := range b.waiters {
			if x == w {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				break
			}
		}
	}
	b.grantLocked()
	return ctx.Err()
}

// release gives back n bytes taken with tryAcquire or acquire.
func (b *budget) release(n int64) {
	if b.limit == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	b.grantLocked()
	b.mu.Unlock()
}

// grantLocked hands free bytes to the waiters at the head of the queue.
// b.mu is held.
func (b *budget) grantLocked() {
	for len(b.waiters) > 0 {
		w := b.waiters[0]
		if b.used+w.n > b.limit {
			return
		}
		b.used += w.n
		close(w.ready)
		b.waiters[0] = nil
		b.waiters = b.waiters[1:]
	}
}

// inUse returns the bytes taken.
func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}
