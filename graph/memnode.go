package graph

import (
	"context"
	"sync"
)

// MemNode is an in-memory Node for tests and demos. It supports zeroing,
// discard (to zeroes) and resizing.
type MemNode struct {
	mu   sync.RWMutex // protects data
	data []byte
}

// NewMemNode returns a zero-filled node of the given size.
func NewMemNode(size int64) *MemNode { return &MemNode{data: make([]byte, size)} }

// Bytes returns the backing slice (not a copy); for tests.
func (m *MemNode) Bytes() []byte { return m.data }

func (m *MemNode) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return ErrRange
	}
	copy(p, m.data[off:])
	return nil
}

func (m *MemNode) WriteAt(_ context.Context, p []byte, off int64, _ ReqFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return ErrRange
	}
	copy(m.data[off:], p)
	return nil
}

func (m *MemNode) WriteZeroes(_ context.Context, off, n int64, _ ReqFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+n > int64(len(m.data)) {
		return ErrRange
	}
	clear(m.data[off : off+n])
	return nil
}

func (m *MemNode) Discard(ctx context.Context, off, n int64) error {
	return m.WriteZeroes(ctx, off, n, MayUnmap)
}

func (m *MemNode) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

func (m *MemNode) Truncate(_ context.Context, size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if size <= int64(cap(m.data)) {
		old := len(m.data)
		m.data = m.data[:size]
		if int(size) > old {
			clear(m.data[old:])
		}
		return nil
	}
	nd := make([]byte, size)
	copy(nd, m.data)
	m.data = nd
	return nil
}

func (m *MemNode) Flush(context.Context) error { return nil }
func (m *MemNode) Close() error                { return nil }
