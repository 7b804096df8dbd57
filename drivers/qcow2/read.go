package qcow2

import (
	"context"
	"fmt"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// run is a piece of a guest range with one mapping.
type run struct {
	typ   qcow2fmt.SubclusterType
	n     int64  // bytes
	host  int64  // host offset of the first byte (types with a host cluster)
	entry uint64 // L2 entry (compressed clusters)
}

// hasHost reports subcluster types whose host offset is valid.
func hasHost(t qcow2fmt.SubclusterType) bool {
	return t == qcow2fmt.SubNormal || t == qcow2fmt.SubZeroAlloc || t == qcow2fmt.SubUnallocatedAlloc
}

// checkEntry validates an L2 entry met at guest offset gOff; it returns a
// corruption message or "".
func (m *image) checkEntry(le, bm uint64, l2off, idx, gOff int64) string {
	g := m.g
	ct := g.ClusterType(le)
	switch ct {
	case qcow2fmt.ClusterCompressed:
		if g.DataFile {
			return fmt.Sprintf("Compressed cluster entry found in image with external data file (L2 offset: %#x, L2 index: %#x)", l2off, idx)
		}
	case qcow2fmt.ClusterNormal, qcow2fmt.ClusterZeroAlloc:
		host := qcow2fmt.HostOffset(le)
		if host&(g.ClusterSize-1) != 0 {
			return fmt.Sprintf("Cluster allocation offset %#x unaligned (L2 offset: %#x, L2 index: %#x)", host, l2off, idx)
		}
		if g.DataFile && host != gOff&^(g.ClusterSize-1) {
			return fmt.Sprintf("External data file host cluster offset %#x does not match guest cluster offset: %#x, L2 index: %#x)", host, gOff&^(g.ClusterSize-1), idx)
		}
	}
	if m.version < 3 && (ct == qcow2fmt.ClusterZeroPlain || ct == qcow2fmt.ClusterZeroAlloc) {
		return fmt.Sprintf("Zero cluster entry found in pre-v3 image (L2 offset: %#x, L2 index: %#x)", l2off, idx)
	}
	if g.Extended && g.Subcluster(le, bm, 0) == qcow2fmt.SubInvalid {
		return fmt.Sprintf("Invalid cluster entry found  (L2 offset: %#x, L2 index: %#x)", l2off, idx)
	}
	return ""
}

// mapRun maps the guest range at off (at most n bytes) to its longest
// prefix with one subcluster type, contiguous on the host for normal data,
// within one L2 table; a compressed cluster is one run.
func (m *image) mapRun(ctx context.Context, off, n int64) (run, error) {
	g := m.g
	tableSpan := int64(1) << (g.ClusterBits + g.L2Bits)
	limit := min(n, (off|(tableSpan-1))+1-off)
	l1i, e := m.l1Entry(off)
	l2off := int64(e & qcow2fmt.L1OffsetMask)
	if l2off == 0 {
		return run{typ: qcow2fmt.SubUnallocatedPlain, n: limit}, nil
	}
	t, err := m.loadL2(ctx, l1i, l2off)
	if err != nil {
		return run{}, err
	}
	defer m.l2.put(t)
	var r run
	var bad string
	t.mu.RLock()
	pos, end := off, off+limit
	lastIdx := int64(-1)
	for pos < end {
		idx := g.L2Index(pos)
		le, bm := g.L2Entry(t.data, idx)
		if idx != lastIdx {
			if bad = m.checkEntry(le, bm, l2off, idx, pos); bad != "" {
				break
			}
			lastIdx = idx
		}
		sc := int((pos & (g.ClusterSize - 1)) >> g.SubclusterBits)
		typ := g.Subcluster(le, bm, sc)
		subEnd := min(((pos>>g.SubclusterBits)+1)<<g.SubclusterBits, end)
		var host int64
		if hasHost(typ) {
			host = qcow2fmt.HostOffset(le) + pos&(g.ClusterSize-1)
		}
		if pos == off {
			r = run{typ: typ, n: subEnd - pos, host: host, entry: le}
			if typ == qcow2fmt.SubCompressed {
				r.n = min((pos|(g.ClusterSize-1))+1, end) - pos
				break
			}
		} else {
			if typ != r.typ || typ == qcow2fmt.SubCompressed || (typ == qcow2fmt.SubNormal && host != r.host+r.n) {
				break
			}
			r.n += subEnd - pos
		}
		pos = subEnd
	}
	t.mu.RUnlock()
	if bad != "" {
		return run{}, m.corrupt(ctx, true, -1, -1, "%s", bad)
	}
	return r, nil
}

// read fills p from guest offset off; the stripes are held.
func (m *image) read(ctx context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		r, err := m.mapRun(ctx, off, int64(len(p)))
		if err != nil {
			return err
		}
		seg := p[:r.n]
		if err := m.readRun(ctx, seg, off, r); err != nil {
			return err
		}
		p, off = p[r.n:], off+r.n
	}
	return nil
}

// readRun reads one mapped run.
func (m *image) readRun(ctx context.Context, seg []byte, off int64, r run) error {
	switch r.typ {
	case qcow2fmt.SubNormal:
		if err := readChild(ctx, m.data, seg, r.host); err != nil {
			return err
		}
		if m.cipher != nil {
			return m.cipher.Decrypt(seg, seg, uint64(r.host)/512, 512)
		}
		return nil
	case qcow2fmt.SubZeroPlain, qcow2fmt.SubZeroAlloc:
		clear(seg)
		return nil
	case qcow2fmt.SubCompressed:
		return m.readCompressed(ctx, seg, off, r.entry)
	default:
		return m.readBacking(ctx, seg, off)
	}
}

// readBacking reads unallocated guest data: the backing file's, zeroes
// past its end or without one.
func (m *image) readBacking(ctx context.Context, p []byte, off int64) error {
	if m.backing == nil {
		clear(p)
		return nil
	}
	bs := m.backing.Size()
	if off >= bs {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), bs-off)
	clear(p[n:])
	return m.backing.ReadAt(ctx, p[:n], off)
}

// readCompressed decompresses the cluster of entry and copies the part of
// it p covers (p lies in one cluster starting at guest offset off).
func (m *image) readCompressed(ctx context.Context, p []byte, off int64, entry uint64) error {
	cs := m.cs()
	coff, csize := m.g.Compressed(entry)
	bp := m.getBuf()
	defer m.bufPool.Put(bp)
	buf := *bp
	var src, dst []byte
	if csize+cs <= int64(len(buf)) {
		src, dst = buf[:csize], buf[csize:csize+cs]
	} else {
		src, dst = make([]byte, csize), make([]byte, cs)
	}
	if err := readChild(ctx, m.file, src, coff); err != nil {
		return err
	}
	if err := qcow2fmt.Decompress(m.compression, dst, src); err != nil {
		return fmt.Errorf("qcow2: compressed cluster at %#x: %w", coff, err)
	}
	copy(p, dst[off&(cs-1):])
	return nil
}

// blockStatus reports the allocation of [off, off+n) from the metadata.
func (m *image) blockStatus(ctx context.Context, off, n int64) ([]graph.Extent, error) {
	var out []graph.Extent
	add := func(l int64, f graph.ExtentFlags) {
		if k := len(out); k > 0 && out[k-1].Flags == f {
			out[k-1].Length += l
			return
		}
		out = append(out, graph.Extent{Length: l, Flags: f})
	}
	end := off + n
	for off < end && len(out) < 1024 {
		r, err := m.mapRun(ctx, off, end-off)
		if err != nil {
			return nil, err
		}
		switch r.typ {
		case qcow2fmt.SubNormal:
			m.dataStatus(ctx, r, add)
		case qcow2fmt.SubCompressed:
			add(r.n, 0)
		case qcow2fmt.SubZeroPlain, qcow2fmt.SubZeroAlloc:
			add(r.n, graph.ExtentZero)
		default:
			// Unallocated here: it reads from the backing file, or as
			// zeroes without one or past its end.
			if m.backing == nil {
				add(r.n, graph.ExtentHole|graph.ExtentZero)
			} else if bs := m.backing.Size(); off >= bs {
				add(r.n, graph.ExtentHole|graph.ExtentZero)
			} else if off+r.n > bs {
				add(bs-off, graph.ExtentHole)
				add(off+r.n-bs, graph.ExtentHole|graph.ExtentZero)
			} else {
				add(r.n, graph.ExtentHole)
			}
		}
		off += r.n
	}
	return out, nil
}

// dataStatus reports a run of data clusters. In an image whose metadata
// was preallocated, the parts the file holds as holes read as zeroes
// (QEMU's BDRV_BLOCK_RECURSE for such images).
func (m *image) dataStatus(ctx context.Context, r run, add func(int64, graph.ExtentFlags)) {
	if m.cipher != nil || r.host+r.n > m.data.Size() || !m.metadataPreallocated(ctx) {
		add(r.n, 0)
		return
	}
	ext, err := m.data.BlockStatus(ctx, r.host, r.n)
	pos := int64(0)
	if err == nil {
		for _, e := range ext {
			l := min(e.Length, r.n-pos)
			if l <= 0 {
				break
			}
			f := graph.ExtentFlags(0)
			if e.Flags&graph.ExtentZero != 0 {
				f = graph.ExtentZero | graph.ExtentData
			}
			add(l, f)
			pos += l
		}
	}
	if pos < r.n {
		add(r.n-pos, 0)
	}
}

// metadataPreallocated guesses, once, whether the image was created with
// metadata preallocation (qcow2_detect_metadata_preallocation): the
// clusters in use outnumber those the file really stores by a ninth.
func (m *image) metadataPreallocated(ctx context.Context) bool {
	m.preallocOnce.Do(func() {
		as := m.file.BDS().ImageInfo(false).ActualSize
		if as == nil {
			return
		}
		cs := m.cs()
		real := *as / cs
		threshold := max(real*10/9, real+2)
		end := (m.file.Size() + cs - 1) / cs
		var count int64
		m.metaMu.Lock()
		for i := int64(0); i < end && count < threshold; i++ {
			rc, err := m.refcount(ctx, i)
			if err != nil {
				break
			}
			if rc > 0 {
				count++
			}
		}
		m.metaMu.Unlock()
		m.metaPrealloc = count >= threshold
	})
	return m.metaPrealloc
}
