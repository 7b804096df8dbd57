package blockdimg

import (
	"errors"
	"math"
	"strconv"
	"time"

	"blockd/graph"
)

// commitOpts are commit's command line.
type commitOpts struct {
	o               openOpts
	base            string
	hasBase, drop   bool
	progress, quiet bool
	rate            int64 // bytes per second, 0: unlimited
}

// cmdCommit is qemu-img's img_commit: the data the top image and the
// images between it and the base hold is copied into the base (its
// immediate backing file, or -b's), as QEMU's active commit job does,
// then the top image is emptied unless -d (or -b) is given.
func cmdCommit(e *env, args []string) error {
	co, file, err := parseCommit(e, args)
	if err != nil {
		return err
	}
	im, err := e.open(file, co.o)
	if err != nil {
		return err
	}
	defer func() { im.close() }()
	prog := newProgress(e, co.progress, 1, "commit")
	edge, err := commitBase(im, co, file)
	if err != nil {
		prog.abort()
		return err
	}
	if edge.BDS().ReadOnly() {
		// The base was opened read-only as a backing file: open the
		// chain again with the base writable (QEMU reopens it).
		im, edge, err = reopenForCommit(e, im, edge, co, file)
		if err != nil {
			prog.abort()
			return err
		}
	}
	if err := commitCopy(e, im, edge.BDS(), co, prog); err != nil {
		prog.abort()
		return err
	}
	if !co.drop {
		if err := makeEmpty(e, im); err != nil {
			prog.abort()
			return err
		}
	}
	prog.finish()
	e.printf(co.quiet, "Image committed.\n")
	return nil
}

func parseCommit(e *env, args []string) (commitOpts, string, error) {
	opts, rest, err := getopt(args, ":f:ht:b:dpqr:", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts},
	})
	if err != nil {
		return commitOpts{}, "", err
	}
	co := commitOpts{o: openOpts{write: true, unmap: true}}
	for _, p := range opts {
		switch p.id {
		case 'h':
			return co, "", helpRequested(e)
		case 'f':
			co.o.fmt = p.arg
		case 't':
			co.o.cache = p.arg
		case 'b':
			// -b implies -d.
			co.base, co.hasBase, co.drop = p.arg, true, true
		case 'd':
			co.drop = true
		case 'p':
			co.progress = true
		case 'q':
			co.quiet = true
		case 'r':
			n, err := cvtnum("rate limit", p.arg, 0, math.MaxInt64)
			if err != nil {
				return co, "", err
			}
			co.rate = n
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return co, "", err
			}
		case optImageOpts:
			co.o.imageOpts = true
		}
	}
	if co.quiet {
		co.progress = false
	}
	if len(rest) != 1 {
		return co, "", usagef("Expecting one image file name")
	}
	if _, _, _, ok := cacheFlags(co.o.cache); !ok {
		return co, "", failf("Invalid cache option: %s", co.o.cache)
	}
	co.o.quiet = co.quiet
	return co, rest[0], nil
}

// commitBase finds the base: the image -b names in the backing chain, or
// the immediate backing file. It returns the backing edge that leads to it.
func commitBase(im *image, co commitOpts, file string) (*graph.Child, error) {
	if co.hasBase {
		if edge := findBackingImage(im.bds, co.base); edge != nil {
			return edge, nil
		}
		return nil, failf("Did not find '%s' in the backing chain of '%s'", co.base, file)
	}
	if edge := cowChild(im.bds); edge != nil {
		return edge, nil
	}
	return nil, failf("Image does not have a backing file")
}

// reopenForCommit opens the image again with every backing file down to
// the base named explicitly in its options (as they were opened), the base
// writable and the images above it read-only, and returns the reopened
// image and the edge to its base.
func reopenForCommit(e *env, im *image, edge *graph.Child, co commitOpts, file string) (*image, *graph.Child, error) {
	var layers []map[string]any
	for cur := im.bds; ; {
		c := cowChild(cur)
		if c == nil {
			return im, nil, failf("Image does not have a backing file")
		}
		layers = append(layers, layerTree(c.BDS().Options().Tree, im.kv))
		if c == edge {
			break
		}
		cur = c.BDS()
	}
	tree := copyTree(im.tree)
	cur := tree
	for i, l := range layers {
		ro := i < len(layers)-1
		l["read-only"] = bv(im.kv, ro)
		if !ro {
			if below, ok := l["backing"].(map[string]any); ok {
				setDefault(below, "read-only", bv(im.kv, true))
			}
		}
		cur["backing"] = l
		cur = l
	}
	im.close()
	nim, err := e.openTree(file, tree, im.kv, co.o)
	if err != nil {
		return nil, nil, err
	}
	c := cowChild(nim.bds)
	for range layers[1:] {
		c = cowChild(c.BDS())
	}
	return nim, c, nil
}

// layerTree is the options tree of a backing node as it was opened, for
// a tree of keyval strings when kv (the driver builds the trees of backing
// files named in a header as JSON).
func layerTree(t map[string]any, kv bool) map[string]any {
	out := copyTree(t)
	delete(out, "read-only")
	if kv {
		stringify(out)
	}
	return out
}

func copyTree(t map[string]any) map[string]any {
	out := make(map[string]any, len(t))
	for k, v := range t {
		if m, ok := v.(map[string]any); ok {
			v = copyTree(m)
		}
		out[k] = v
	}
	return out
}

// stringify turns JSON scalars into keyval strings.
func stringify(t map[string]any) {
	for k, v := range t {
		switch x := v.(type) {
		case map[string]any:
			stringify(x)
		case bool:
			t[k] = bv(true, x)
		case float64:
			t[k] = strconv.FormatFloat(x, 'f', -1, 64)
		case int64:
			t[k] = strconv.FormatInt(x, 10)
		case int:
			t[k] = strconv.Itoa(x)
		}
	}
}

// commitGranularity is the mirror job's: the base's cluster size within
// 4 KiB and 64 KiB (bdrv_get_default_bitmap_granularity).
func commitGranularity(base *graph.BDS) (gran, cluster int64) {
	cs := base.ImageInfo(false).ClusterSize
	if cs <= 0 {
		return 64 << 10, 64 << 10
	}
	return min(max(cs, 4<<10), 64<<10), cs
}

// commitCopy copies every range that an image above base holds into
// base, in granules of the mirror job's granularity: ranges that read as
// zeroes without data become zero writes that may unmap, the rest is
// read from the top and written to the base. The base grows to the top's
// size first.
func commitCopy(e *env, im *image, base *graph.BDS, co commitOpts, prog *progress) error {
	top := im.blk
	size := top.Size()
	bc, err := e.g.NewBackend(base.Name(), Prog, graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermAll)
	if err != nil {
		return failf("%v", err)
	}
	defer e.g.ReleaseBackend(bc)
	if bc.Size() < size {
		if err := bc.Truncate(e.ctx, size, graph.PreallocOff); err != nil {
			return failf("%s", truncateError(err))
		}
	}
	gran, cluster := commitGranularity(base)
	// The dirty bitmap: everything allocated above the base.
	type span struct{ off, end int64 }
	var dirty []span
	total := int64(0)
	for off := int64(0); off < size; {
		st, err := statusAbove(e.ctx, top, base, off, min(size-off, 1<<30))
		if err != nil {
			return failf("%s", errno(err))
		}
		if st.allocated {
			s, t := off&^(gran-1), min((off+st.length+gran-1)&^(gran-1), size)
			if n := len(dirty); n > 0 && dirty[n-1].end >= s {
				total += t - dirty[n-1].end
				dirty[n-1].end = max(dirty[n-1].end, t)
			} else {
				dirty = append(dirty, span{s, t})
				total += t - s
			}
		}
		off += st.length
	}
	if prog != nil {
		prog.bar.ChangeMax64(max(total, 1))
	}
	buf := make([]byte, 16<<20)
	lim := newRateLimit(co.rate)
	for _, d := range dirty {
		for off := d.off; off < d.end; {
			n := min(d.end-off, int64(len(buf)))
			st, err := statusAbove(e.ctx, top, nil, off, n)
			if err != nil {
				return failf("%s", errno(err))
			}
			l := st.length
			zero := st.zero && !st.data
			if l < gran {
				l, zero = min(gran, d.end-off), false
			} else if off+l < d.end {
				l &^= gran - 1
			}
			if zero && (off%cluster != 0 || (l%cluster != 0 && off+l != size)) {
				zero = false
			}
			if zero {
				err = bc.WriteZeroes(e.ctx, off, l, graph.MayUnmap)
			} else if err = top.ReadAt(e.ctx, buf[:l], off); err == nil {
				err = bc.WriteAt(e.ctx, buf[:l], off, im.writeFlags())
				lim.wait(l)
			}
			if err != nil {
				return failf("%s", errno(err))
			}
			off += l
			prog.add(l)
		}
	}
	if err := bc.Flush(e.ctx); err != nil {
		return failf("%s", errno(err))
	}
	return nil
}

// makeEmpty empties the top image after the commit (blk_make_empty);
// formats that cannot are left as they are, as qemu-img does.
func makeEmpty(e *env, im *image) error {
	me, ok := im.bds.Node().(graph.MakeEmptier)
	if !ok {
		return nil
	}
	if err := me.MakeEmpty(e.ctx); err != nil {
		if errors.Is(err, graph.ErrNotSupported) {
			return nil
		}
		return failf("Failed to make %s empty: %s", im.bds.Filename(), errno(err))
	}
	return nil
}

// rateLimit spaces copies so that they average at most rate bytes a
// second (the block job's speed).
type rateLimit struct {
	rate  int64
	start time.Time
	done  int64
}

func newRateLimit(rate int64) *rateLimit { return &rateLimit{rate: rate, start: time.Now()} }

// wait accounts n bytes and sleeps until they are due.
func (r *rateLimit) wait(n int64) {
	if r.rate <= 0 {
		return
	}
	r.done += n
	due := r.start.Add(time.Duration(float64(r.done) / float64(r.rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}
