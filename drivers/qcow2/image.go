package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/blockcrypto"
)

// nStripes is the number of guest cluster locks; a guest cluster index
// maps to stripe index % nStripes.
const nStripes = 256

// image is an open qcow2 image: the format state shared by the data path.
//
// Lock order: stripes (ascending) → metaMu → l1mu / ovMu / l2Cache.mu →
// l2Table.mu. No lock is held across a call that takes a lock earlier in
// that order, and only metaMu is held across metadata I/O.
type image struct {
	file    *graph.Child // header and metadata (and data without a data file)
	data    *graph.Child // data clusters: file, or the external data file
	backing *graph.Child // nil without a backing file
	ro      atomic.Bool  // read-only; changes only with no request in flight (PrepareReopen)
	g       qcow2fmt.Geometry
	emit    func(name string, data any)
	name    string // node name for events

	// Immutable after open.
	version      uint32
	compression  uint8
	dataFileRaw  bool
	lazy         bool // lazy refcounts in use
	passRequest  bool // pass discards of guest requests to the file
	passOther    bool // pass discards of other frees to the file
	passSnap     bool // pass discards of clusters freed by snapshot operations
	overlap      olFlags
	cipher       *blockcrypto.Cipher // nil unless encrypted
	luks         *luksfmt.Header     // the LUKS header of an encrypted image
	cryptLen     int64               // encryption sector size (512)
	hasBitmapExt bool

	size atomic.Int64 // virtual size

	// stripes serialise requests on the same guest clusters: reads hold
	// them shared, writes, zero writes and discards exclusively.
	stripes [nStripes]sync.RWMutex

	// metaMu protects h, reftable, rc, freeHint, pendingFree,
	// dirtyMarked, packOff and every change of refcounts, the L1 table, the header
	// and the file size; writeback runs under it.
	metaMu      sync.Mutex
	h           *qcow2fmt.Header
	reftable    []uint64
	rc          *rcCache
	freeHint    int64
	pendingFree []freeReq
	dirtyMarked bool
	packOff     int64 // where the next compressed cluster may go (0: a new cluster)
	snapshots   []qcow2fmt.Snapshot
	reserved    func(cluster int64) bool // repair: clusters not to allocate
	repairAdj   map[int64]int64          // repair: references added by metadata it creates

	// l1mu protects l1 (entries and length). Writers also hold metaMu.
	l1mu sync.RWMutex
	l1   []uint64

	l2 *l2Cache

	// ovMu protects ov, the metadata map for overlap checks.
	ovMu sync.RWMutex
	ov   overlapMap

	broken    atomic.Bool // fatal corruption met: refuse all I/O
	signalled atomic.Bool // a corruption event was sent

	bufPool sync.Pool // *[]byte of bufSize

	preallocOnce sync.Once
	metaPrealloc bool // see metadataPreallocated
}

// bufSize is the scratch buffer size for encryption and COW.
const bufSize = 1 << 20

// freeReq is a host range whose references were dropped from an L2 entry
// that is not yet stable; its refcounts drop at the next writeback.
type freeReq struct {
	off, size int64
	discard   bool // pass a discard to the file once free
	dataFile  bool // a cluster of the external data file: discard only
}

func (m *image) cs() int64 { return m.g.ClusterSize }

func (m *image) getBuf() *[]byte {
	if b, ok := m.bufPool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, bufSize)
	return &b
}

// errBroken is returned once a fatal corruption made the image unusable.
var errBroken = fmt.Errorf("qcow2: the image was marked corrupt: %w", graph.ErrCorrupt)

// readChild reads from a child; bytes past its end read as zeroes (as QEMU
// pads reads at the end of a file).
func readChild(ctx context.Context, c *graph.Child, p []byte, off int64) error {
	size := c.Size()
	if off >= size {
		clear(p)
		return nil
	}
	n := int64(len(p))
	if off+n > size {
		clear(p[size-off:])
		n = size - off
	}
	return c.ReadAt(ctx, p[:n], off)
}

// ensureSize grows child c to at least end bytes. metaMu is held (or the
// image is not shared yet).
func (m *image) ensureSize(ctx context.Context, c *graph.Child, end int64) error {
	if end <= c.Size() {
		return nil
	}
	return c.Truncate(ctx, end, graph.PreallocOff)
}

// writeMeta writes metadata to the image file, growing it as needed.
// metaMu is held.
func (m *image) writeMeta(ctx context.Context, p []byte, off int64) error {
	if err := m.ensureSize(ctx, m.file, off+int64(len(p))); err != nil {
		return err
	}
	return m.file.WriteAt(ctx, p, off, 0)
}

// writeHeader rewrites the whole header cluster from m.h and flushes.
// metaMu is held.
func (m *image) writeHeader(ctx context.Context) error {
	buf, err := m.h.Marshal(true)
	if err != nil {
		return err
	}
	if err := m.writeMeta(ctx, buf, 0); err != nil {
		return err
	}
	return m.file.Flush(ctx)
}

// setIncompatible sets or clears incompatible feature bits on disk (with a
// flush before and after, as qcow2_mark_dirty and qcow2_mark_clean).
// metaMu is held.
func (m *image) setIncompatible(ctx context.Context, bits uint64, on bool) error {
	v := m.h.IncompatibleFeatures
	if on {
		v |= bits
	} else {
		v &^= bits
	}
	if v == m.h.IncompatibleFeatures || m.version < 3 {
		return nil
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	if err := m.file.WriteAt(ctx, b[:], 72, 0); err != nil {
		return err
	}
	if err := m.file.Flush(ctx); err != nil {
		return err
	}
	m.h.IncompatibleFeatures = v
	return nil
}

// stripeSet is a set of locked stripes.
type stripeSet struct {
	set   [nStripes / 64]uint64
	write bool
}

// lockStripes locks the guest clusters of [off, off+n) (in ascending
// stripe order) and returns what unlockStripes releases.
func (m *image) lockStripes(off, n int64, write bool) stripeSet {
	s := stripeSet{write: write}
	first := off >> m.g.ClusterBits
	last := (off + max(n, 1) - 1) >> m.g.ClusterBits
	if last-first >= nStripes {
		for i := range s.set {
			s.set[i] = ^uint64(0)
		}
	} else {
		for c := first; c <= last; c++ {
			i := c % nStripes
			s.set[i/64] |= 1 << (i % 64)
		}
	}
	// Set bits only, in ascending order.
	for w, bitsw := range s.set {
		for bitsw != 0 {
			i := w*64 + bits.TrailingZeros64(bitsw)
			bitsw &= bitsw - 1
			if write {
				m.stripes[i].Lock()
			} else {
				m.stripes[i].RLock()
			}
		}
	}
	return s
}

// unlockStripes releases what lockStripes took.
func (m *image) unlockStripes(s stripeSet) {
	for w := len(s.set) - 1; w >= 0; w-- {
		for bitsw := s.set[w]; bitsw != 0; {
			b := 63 - bits.LeadingZeros64(bitsw)
			bitsw &^= 1 << b
			if i := w*64 + b; s.write {
				m.stripes[i].Unlock()
			} else {
				m.stripes[i].RUnlock()
			}
		}
	}
}

// l1Entry returns the L1 entry for guest offset off (0 past the table).
func (m *image) l1Entry(off int64) (int64, uint64) {
	i := m.g.L1Index(off)
	m.l1mu.RLock()
	defer m.l1mu.RUnlock()
	if i >= int64(len(m.l1)) {
		return i, 0
	}
	return i, m.l1[i]
}

// loadL2 returns the pinned L2 table at off.
func (m *image) loadL2(ctx context.Context, l1i int64, off int64) (*l2Table, error) {
	if off&(m.cs()-1) != 0 {
		return nil, m.corrupt(ctx, true, -1, -1, "L2 table offset %#x unaligned (L1 index: %#x)", off, l1i)
	}
	if off+m.cs() > m.file.Size() {
		return nil, m.corrupt(ctx, true, -1, -1, "L2 table offset %#x beyond the end of the image file (L1 index: %#x)", off, l1i)
	}
	if kind := m.overlaps(off, m.cs(), olActiveL2); kind != 0 {
		return nil, m.corrupt(ctx, true, -1, -1, "L2 table offset %#x overlaps with %s (L1 index: %#x)", off, kind, l1i)
	}
	return m.l2.get(ctx, off, func(buf []byte) error {
		return m.file.ReadAt(ctx, buf, off)
	})
}

// corruptError is a request's error after a corruption.
type corruptError struct{ msg string }

func (e *corruptError) Error() string { return "qcow2: " + e.msg }
func (e *corruptError) Unwrap() error { return graph.ErrCorrupt }

// corruptEvent is BLOCK_IMAGE_CORRUPTED's data.
type corruptEvent struct {
	Device   string `json:"device"`
	NodeName string `json:"node-name,omitempty"`
	Msg      string `json:"msg"`
	Offset   *int64 `json:"offset,omitempty"`
	Size     *int64 `json:"size,omitempty"`
	Fatal    bool   `json:"fatal"`
}

// corrupt reports inconsistent metadata met at run time, as
// qcow2_signal_corruption: the first event (or a fatal one after non-fatal
// ones) goes out as BLOCK_IMAGE_CORRUPTED; a fatal corruption of a
// writable image sets the corrupt bit and makes the node refuse all I/O.
// It returns the error for the request. metaMu must not be held (see
// corruptLocked).
func (m *image) corrupt(ctx context.Context, fatal bool, off, size int64, format string, a ...any) error {
	return m.signal(ctx, false, fatal, off, size, fmt.Sprintf(format, a...))
}

// corruptLocked is corrupt with metaMu held.
func (m *image) corruptLocked(ctx context.Context, fatal bool, off, size int64, format string, a ...any) error {
	return m.signal(ctx, true, fatal, off, size, fmt.Sprintf(format, a...))
}

func (m *image) signal(ctx context.Context, locked, fatal bool, off, size int64, msg string) error {
	fatal = fatal && !m.ro.Load()
	if !m.signalled.Load() || (fatal && !m.broken.Load()) {
		m.signalled.Store(true)
		ev := corruptEvent{Device: "", NodeName: m.name, Msg: msg, Fatal: fatal}
		if off >= 0 {
			ev.Offset = &off
		}
		if size >= 0 {
			ev.Size = &size
		}
		if m.emit != nil {
			m.emit("BLOCK_IMAGE_CORRUPTED", ev)
		}
		if fatal && m.broken.CompareAndSwap(false, true) {
			if !locked {
				m.metaMu.Lock()
			}
			m.h.IncompatibleFeatures |= qcow2fmt.IncompatCorrupt
			_ = m.writeHeader(context.WithoutCancel(ctx))
			if !locked {
				m.metaMu.Unlock()
			}
		}
	}
	return &corruptError{msg: msg}
}
