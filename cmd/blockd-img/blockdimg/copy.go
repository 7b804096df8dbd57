package blockdimg

import (
	"bytes"
	"context"
	"fmt"
	"math/bits"
	"strconv"
	"sync"
	"time"

	"blockd/graph"
)

// convertJob copies the concatenation of srcs to dst with a pool of
// workers, as qemu-img's convert coroutines do: one planner hands out
// ranges by block status (data, or zeroes that need no reading), workers
// read, find zero blocks, and write, in order when the target's layout
// depends on it.
type convertJob struct {
	e         *env
	srcs      []*image
	dst       *image
	total     int64
	minSparse int64
	zeroInit  bool
	workers   int
	inOrder   bool
	salvage   bool
	quiet     bool
	rate      int64 // bytes per second, 0: unlimited
	compress  compressFunc
	cluster   int64
	bar       *progress

	// mu protects the planner state and err.
	mu       sync.Mutex
	next     int64
	statEnd  int64
	statZero bool
	err      error

	// wmu protects wrOff; wcond signals its changes (in-order writes).
	wmu   sync.Mutex
	wcond *sync.Cond
	wrOff int64

	// rmu protects the rate limiter's state.
	rmu     sync.Mutex
	started time.Time
	written int64
}

const convertBuf = ioBufSize

// part returns the source holding byte off of the concatenation and the
// offset inside it.
func (j *convertJob) part(off int64) (*image, int64, int64) {
	for _, s := range j.srcs {
		sz := (s.size() + 511) &^ 511
		if off < sz {
			return s, off, sz
		}
		off -= sz
	}
	return nil, 0, 0
}

// status returns the kind of the range at off and where it ends.
func (j *convertJob) status(off int64) (zero bool, end int64, err error) {
	src, so, sz := j.part(off)
	if src == nil {
		return true, j.total, nil
	}
	if so >= src.size() {
		// The rounding up of an odd-sized source to whole sectors.
		return true, off + (sz - so), nil
	}
	st, err := statusAbove(j.e.ctx, src.blk, nil, so, src.size()-so)
	if err != nil {
		return false, 0, err
	}
	return st.zero, off + st.length, nil
}

// allocatedBytes is the amount of work for the progress bar: the data
// ranges, and the zero ranges too with -S 0 (qemu-img's pre-pass).
func (j *convertJob) allocatedBytes() (int64, error) {
	var n int64
	for off := int64(0); off < j.total; {
		zero, end, err := j.status(off)
		if err != nil {
			return 0, failf("error while reading block status at offset %d: %s", off, errno(err))
		}
		if !zero || j.minSparse == 0 {
			n += end - off
		}
		off = end
	}
	return n, nil
}

type chunk struct {
	off, n int64
	zero   bool
}

// nextChunk hands out the next range (under mu).
func (j *convertJob) nextChunk() (chunk, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err != nil || j.next >= j.total {
		return chunk{}, false
	}
	off := j.next
	if j.statEnd <= off {
		zero, end, err := j.status(off)
		if err != nil {
			j.err = failf("error while reading block status at offset %d: %s", off, errno(err))
			return chunk{}, false
		}
		j.statZero, j.statEnd = zero, end
	}
	c := chunk{off: off, n: j.statEnd - off, zero: j.statZero}
	if !c.zero || j.minSparse == 0 {
		c.n = min(c.n, convertBuf)
	}
	if j.compress != nil {
		cl := j.cluster
		if c.n < cl {
			c.n, c.zero = min(cl, j.total-off), false
		} else {
			c.n -= c.n % cl
		}
	}
	j.next += c.n
	return c, true
}

func (j *convertJob) fail(err error) {
	j.mu.Lock()
	if j.err == nil {
		j.err = err
	}
	j.mu.Unlock()
	j.wmu.Lock()
	j.wcond.Broadcast()
	j.wmu.Unlock()
}

func (j *convertJob) failed() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err != nil
}

func (j *convertJob) run() error {
	j.wcond = sync.NewCond(&j.wmu)
	j.started = time.Now()
	var wg sync.WaitGroup
	for i := 0; i < j.workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			j.worker()
		}()
	}
	wg.Wait()
	return j.err
}

func (j *convertJob) worker() {
	buf := make([]byte, convertBuf)
	ctx := j.e.ctx
	for {
		c, ok := j.nextChunk()
		if !ok {
			return
		}
		p := buf[:min(c.n, convertBuf)]
		if !c.zero {
			if err := j.read(ctx, p, c.off); err != nil {
				j.fail(failf("error while reading at byte %d: %s", c.off, errno(err)))
				return
			}
		}
		if j.inOrder && !j.waitTurn(c.off) {
			return
		}
		err := j.write(ctx, c, p)
		if j.inOrder {
			j.wmu.Lock()
			j.wrOff = c.off + c.n
			j.wcond.Broadcast()
			j.wmu.Unlock()
		}
		if err != nil {
			j.fail(failf("error while writing at byte %d: %s", c.off, errno(err)))
			return
		}
		if !c.zero || j.minSparse == 0 {
			j.bar.add(c.n)
		}
	}
}

// waitTurn blocks until every range before off is written; false means
// the job failed meanwhile.
func (j *convertJob) waitTurn(off int64) bool {
	j.wmu.Lock()
	defer j.wmu.Unlock()
	for j.wrOff != off {
		if j.failed() {
			return false
		}
		j.wcond.Wait()
	}
	return !j.failed()
}

// read fills p from the sources at off (it may span sources).
func (j *convertJob) read(ctx context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		src, so, sz := j.part(off)
		if src == nil {
			clear(p)
			return nil
		}
		n := min(int64(len(p)), sz-so)
		q := p[:n]
		valid := max(min(n, src.size()-so), 0)
		if valid > 0 {
			if err := src.blk.ReadAt(ctx, q[:valid], so); err != nil {
				if !j.salvage {
					return err
				}
				j.salvageRead(ctx, src, q[:valid], so)
			}
		}
		clear(q[valid:])
		p, off = p[n:], off+n
	}
	return nil
}

// salvageRead reads sector by sector, zeroing what cannot be read.
func (j *convertJob) salvageRead(ctx context.Context, src *image, p []byte, off int64) {
	for i := int64(0); i < int64(len(p)); i += 512 {
		s := p[i:min(i+512, int64(len(p)))]
		if err := src.blk.ReadAt(ctx, s, off+i); err != nil {
			if !j.quiet {
				j.e.warnf("error while reading offset %d: %s", off+i, errno(err))
			}
			clear(s)
		}
	}
}

// write stores one range at the target.
func (j *convertJob) write(ctx context.Context, c chunk, p []byte) error {
	dst := j.dst.blk
	if j.compress != nil {
		// A zero chunk is not read (p holds stale bytes) and may be
		// longer than p.
		if c.zero || allZero(p) {
			return j.writeZero(ctx, c.off, c.n)
		}
		j.throttle(c.n)
		return j.compress(ctx, p, c.off)
	}
	if c.zero {
		if j.minSparse == 0 {
			// -S 0: the target is fully allocated, zeroes included.
			for off, end := c.off, c.off+c.n; off < end; {
				n := min(end-off, int64(len(zeroPage)))
				j.throttle(n)
				if err := dst.WriteAt(ctx, zeroPage[:n], off, j.dst.writeFlags()); err != nil {
					return err
				}
				off += n
			}
			return nil
		}
		return j.writeZero(ctx, c.off, c.n)
	}
	if j.minSparse == 0 {
		j.throttle(c.n)
		return dst.WriteAt(ctx, p, c.off, j.dst.writeFlags())
	}
	// Split the buffer into data and runs of zero blocks of at least
	// minSparse bytes; the zero runs are not written.
	g := j.granule()
	start, zeroStart := int64(0), int64(-1)
	n := int64(len(p))
	flushData := func(from, to int64) error {
		if to <= from {
			return nil
		}
		j.throttle(to - from)
		return dst.WriteAt(ctx, p[from:to], c.off+from, j.dst.writeFlags())
	}
	for i := int64(0); i < n; {
		// Blocks follow the target's alignment grid.
		end := min((c.off+i)/g*g+g-c.off, n)
		if isZero(p[i:end]) {
			if zeroStart < 0 {
				zeroStart = i
			}
		} else if zeroStart >= 0 {
			if i-zeroStart >= j.minSparse {
				if err := flushData(start, zeroStart); err != nil {
					return err
				}
				if err := j.writeZero(ctx, c.off+zeroStart, i-zeroStart); err != nil {
					return err
				}
				start = i
			}
			zeroStart = -1
		}
		i = end
	}
	if zeroStart >= 0 && (n-zeroStart >= j.minSparse || zeroStart == 0) {
		if err := flushData(start, zeroStart); err != nil {
			return err
		}
		return j.writeZero(ctx, c.off+zeroStart, n-zeroStart)
	}
	return flushData(start, n)
}

// granule is the block size of zero detection: the sparse size rounded
// down to a power of two, at least the target's alignment.
func (j *convertJob) granule() int64 {
	g := int64(1) << (63 - bits.LeadingZeros64(uint64(j.minSparse)))
	return max(g, j.dst.blk.Limits().Align, 512)
}

// writeZero makes a range of the target read as zeroes: nothing on a
// target known to be zero, else write-zeroes that may deallocate.
func (j *convertJob) writeZero(ctx context.Context, off, n int64) error {
	if j.zeroInit {
		return nil
	}
	return j.dst.blk.WriteZeroes(ctx, off, n, graph.MayUnmap)
}

// throttle implements -r: it sleeps to keep writes under the rate.
func (j *convertJob) throttle(n int64) {
	if j.rate <= 0 {
		return
	}
	j.rmu.Lock()
	j.written += n
	due := j.started.Add(time.Duration(float64(j.written) / float64(j.rate) * float64(time.Second)))
	j.rmu.Unlock()
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}

func isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeroPage))
		if !bytes.Equal(p[:n], zeroPage[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

func allZero(p []byte) bool { return isZero(p) }

// parseInt0 parses an integer with C's base-0 prefixes.
func parseInt0(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid number %q", s)
	}
	return n, nil
}
