package blockdimg

import (
	"bytes"
)

const ioBufSize = 2 << 20

func cmdCompare(e *env, args []string) error {
	opts, rest, err := getopt(args, ":hf:F:T:pqsU", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	var o1, o2 openOpts
	cache, progress, quiet, strict := "", false, false, false
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			o1.fmt = p.arg
		case 'F':
			o2.fmt = p.arg
		case 'T':
			cache = p.arg
		case 'p':
			progress = true
		case 'q':
			quiet = true
		case 's':
			strict = true
		case 'U':
			o1.forceShare, o2.forceShare = true, true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return withCode(2, err)
			}
		case optImageOpts:
			o1.imageOpts, o2.imageOpts = true, true
		}
	}
	if quiet {
		progress = false
	}
	if len(rest) != 2 {
		return usagef("Expecting two image file names")
	}
	if _, _, _, ok := cacheFlags(cache); !ok {
		return &exitError{code: 2, msg: "Invalid source cache option: " + cache}
	}
	o1.cache, o2.cache = cache, cache
	f1, f2 := rest[0], rest[1]
	im1, err := e.open(f1, o1)
	if err != nil {
		return withCode(2, err)
	}
	defer im1.close()
	im2, err := e.open(f2, o2)
	if err != nil {
		return withCode(2, err)
	}
	defer im2.close()
	c := &comparer{e: e, quiet: quiet, buf1: make([]byte, ioBufSize), buf2: make([]byte, ioBufSize)}
	size1, size2 := im1.size(), im2.size()
	total := min(size1, size2)
	bar := newProgress(e, progress, max(size1, size2), "compare")
	code, err := c.run(im1, im2, f1, f2, size1, size2, total, strict, bar)
	if err != nil || code != 0 {
		bar.abort()
		if err != nil {
			return withCode(code, err)
		}
		return exitCode(code)
	}
	bar.finish()
	e.printf(quiet, "Images are identical.\n")
	return nil
}

type comparer struct {
	e          *env
	quiet      bool
	buf1, buf2 []byte
}

// run is qemu-img's img_compare loop. It returns the exit status: 0
// identical, 1 different, 3 block status error, 4 read error.
func (c *comparer) run(im1, im2 *image, f1, f2 string, size1, size2, total int64, strict bool, bar *progress) (int, error) {
	e := c.e
	if strict && size1 != size2 {
		e.printf(c.quiet, "Strict mode: Image size mismatch!\n")
		return 1, nil
	}
	off := int64(0)
	for off < total {
		s1, err := statusAbove(e.ctx, im1.blk, nil, off, size1-off)
		if err != nil {
			return 3, failf("Sector allocation test failed for %s", f1)
		}
		s2, err := statusAbove(e.ctx, im2.blk, nil, off, size2-off)
		if err != nil {
			return 3, failf("Sector allocation test failed for %s", f2)
		}
		chunk := min(s1.length, s2.length, total-off)
		if strict && (s1.allocated != s2.allocated || s1.data != s2.data || s1.zero != s2.zero) {
			e.printf(c.quiet, "Strict mode: Offset %d block status mismatch!\n", off)
			return 1, nil
		}
		switch {
		case s1.zero && s2.zero:
		case s1.allocated == s2.allocated:
			chunk = min(chunk, ioBufSize)
			if err := im1.blk.ReadAt(e.ctx, c.buf1[:chunk], off); err != nil {
				return 4, failf("Error while reading offset %d of %s: %s", off, f1, errno(err))
			}
			if err := im2.blk.ReadAt(e.ctx, c.buf2[:chunk], off); err != nil {
				return 4, failf("Error while reading offset %d of %s: %s", off, f2, errno(err))
			}
			if at := firstMismatch(c.buf1[:chunk], c.buf2[:chunk]); at >= 0 {
				e.printf(c.quiet, "Content mismatch at offset %d!\n", off+at)
				return 1, nil
			}
		default:
			chunk = min(chunk, ioBufSize)
			im, fn := im1, f1
			if s2.allocated {
				im, fn = im2, f2
			}
			if code, err := c.checkEmpty(im, off, chunk, fn); code != 0 {
				return code, err
			}
		}
		off += chunk
		bar.add(chunk)
	}
	if size1 != size2 {
		e.printf(c.quiet, "Warning: Image size mismatch!\n")
		over, fn, end := im1, f1, size1
		if size2 > size1 {
			over, fn, end = im2, f2, size2
		}
		for off < end {
			st, err := statusAbove(e.ctx, over.blk, nil, off, end-off)
			if err != nil {
				return 3, failf("Sector allocation test failed for %s", fn)
			}
			chunk := st.length
			if st.allocated && !st.zero {
				chunk = min(chunk, ioBufSize)
				if code, err := c.checkEmpty(over, off, chunk, fn); code != 0 {
					return code, err
				}
			}
			off += chunk
			bar.add(chunk)
		}
	}
	return 0, nil
}

// checkEmpty is qemu-img's check_empty_sectors.
func (c *comparer) checkEmpty(im *image, off, n int64, fn string) (int, error) {
	if err := im.blk.ReadAt(c.e.ctx, c.buf1[:n], off); err != nil {
		return 4, failf("Error while reading offset %d of %s: %s", off, fn, errno(err))
	}
	if i := firstNonZero(c.buf1[:n]); i >= 0 {
		c.e.printf(c.quiet, "Content mismatch at offset %d!\n", off+i)
		return 1, nil
	}
	return 0, nil
}

// firstMismatch returns the offset of the first 512-byte sector that
// differs, as qemu-img's compare_buffers reports it, or -1.
func firstMismatch(a, b []byte) int64 {
	for i := 0; i < len(a); i += 512 {
		end := min(i+512, len(a))
		if !bytes.Equal(a[i:end], b[i:end]) {
			return int64(i)
		}
	}
	return -1
}

var zeroPage = make([]byte, 64<<10)

// firstNonZero returns the start of the first 512-byte sector that is
// not all zeroes (qemu-img's find_nonzero), or -1.
func firstNonZero(p []byte) int64 {
	for i := 0; i < len(p); i += len(zeroPage) {
		end := min(i+len(zeroPage), len(p))
		if !bytes.Equal(p[i:end], zeroPage[:end-i]) {
			for j := i; j < end; j += 512 {
				e := min(j+512, end)
				if !bytes.Equal(p[j:e], zeroPage[:e-j]) {
					return int64(j)
				}
			}
		}
	}
	return -1
}
