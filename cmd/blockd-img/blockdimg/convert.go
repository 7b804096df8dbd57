package blockdimg

import (
	"math"
	"strings"
)

// convertArgs are img_convert's options.
type convertArgs struct {
	srcOpts      openOpts
	outFmt       string
	hasOutFmt    bool
	options      string
	compressed   bool
	copyRange    bool
	progress     bool
	quiet        bool
	skipCreate   bool
	tgtImageOpts bool
	targetIsZero bool
	minSparse    int64 // bytes; 0 disables sparse detection
	explicitS    bool
	workers      int
	inOrder      bool
	cache        string
	rateLimit    int64
	salvage      bool
	backing      string
	backingFmt   string
	snapshot     snapshotSpec
	bitmaps      bool
	skipBroken   bool
}

const maxBufSize = 32768 * 512

func cmdConvert(e *env, args []string) error {
	opts, rest, err := getopt(args, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts},
		{"force-share", false, 'U'}, {"target-image-opts", false, optTargetImageOpts},
		{"salvage", false, optSalvage}, {"target-is-zero", false, optTargetIsZero},
		{"bitmaps", false, optBitmaps}, {"skip-broken-bitmaps", false, optSkipBroken},
	})
	if err != nil {
		return err
	}
	a := convertArgs{minSparse: 4096, workers: 8, inOrder: true, cache: "unsafe", srcOpts: openOpts{noShare: true}}
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			a.srcOpts.fmt = p.arg
		case 'O':
			a.outFmt, a.hasOutFmt = p.arg, true
		case 'B':
			a.backing = p.arg
		case 'C':
			a.copyRange = true
		case 'c':
			a.compressed = true
		case 'F':
			a.backingFmt = p.arg
		case 'o':
			if a.options, err = accumulateOptions(a.options, p.arg); err != nil {
				return err
			}
		case 'l':
			if a.snapshot, err = parseSnapshotSpec(p.arg); err != nil {
				return err
			}
		case 'S':
			v, err := cvtnum("buffer size for sparse output", p.arg, 0, math.MaxInt64)
			if err != nil {
				return err
			}
			if v%512 != 0 || v > maxBufSize {
				return failf("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to %d. Select 0 to disable sparse detection (fully allocates output).", maxBufSize)
			}
			a.minSparse, a.explicitS = v, true
		case 'p':
			a.progress = true
		case 't':
			a.cache = p.arg
		case 'T':
			a.srcOpts.cache = p.arg
		case 'q':
			a.quiet = true
		case 'n':
			a.skipCreate = true
		case 'm':
			n, err := parseCLong(p.arg)
			if err != nil || n < 1 || n > 16 {
				return failf("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
			}
			a.workers = int(n)
		case 'W':
			a.inOrder = false
		case 'U':
			a.srcOpts.forceShare = true
		case 'r':
			if a.rateLimit, err = cvtnum("rate limit", p.arg, 0, math.MaxInt64); err != nil {
				return err
			}
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			a.srcOpts.imageOpts = true
		case optSalvage:
			a.salvage = true
		case optTargetImageOpts:
			a.tgtImageOpts = true
		case optTargetIsZero:
			a.targetIsZero = true
		case optBitmaps:
			a.bitmaps = true
		case optSkipBroken:
			a.skipBroken = true
		}
	}
	if !a.hasOutFmt && !a.tgtImageOpts {
		a.outFmt = "raw"
	}
	switch {
	case a.skipBroken && !a.bitmaps:
		return failf("Use of --skip-broken-bitmaps requires --bitmaps")
	case a.compressed && a.copyRange:
		return failf("Cannot enable copy offloading when -c is used")
	case a.explicitS && a.copyRange:
		return failf("Cannot enable copy offloading when -S is used")
	case a.copyRange && a.salvage:
		return failf("Cannot use copy offloading in salvaging mode")
	case a.tgtImageOpts && !a.skipCreate:
		return failf("--target-image-opts requires use of -n flag")
	case a.skipCreate && a.options != "":
		return failf("-o has no effect when skipping image creation")
	case a.targetIsZero && !a.skipCreate:
		return failf("--target-is-zero requires use of -n flag")
	}
	out := ""
	if len(rest) >= 1 {
		out = rest[len(rest)-1]
	}
	if a.options != "" && hasHelpOption(a.options) {
		if a.outFmt == "" {
			return failf("Option help requires a format be specified")
		}
		return e.printCreateHelp(out, a.outFmt)
	}
	if len(rest) < 2 {
		return failf("Must specify image file name")
	}
	if _, _, _, ok := cacheFlags(a.srcOpts.cache); !ok {
		return failf("Invalid source cache option: %s", a.srcOpts.cache)
	}
	if a.quiet {
		a.progress = false
	}
	return e.convert(&a, rest[:len(rest)-1], out)
}

// parseCLong parses an integer as strtol with base 0.
func parseCLong(s string) (int64, error) {
	n, err := parseInt0(strings.TrimSpace(s))
	return n, err
}

// zeroInitFormats are the formats whose new images read as zeroes.
var zeroInitFormats = map[string]bool{"raw": true, "file": true, "qcow2": true}

// fixedLayout are the formats where the order of writes does not change
// the image's layout, so convert need not keep writes in order.
var fixedLayout = map[string]bool{"raw": true, "file": true, "host_device": true, "luks": true, "null-co": true, "null-aio": true}

func (e *env) convert(a *convertArgs, srcNames []string, out string) error {
	bar := (*progress)(nil)
	srcs := make([]*image, 0, len(srcNames))
	defer func() {
		for _, s := range srcs {
			s.close()
		}
	}()
	a.srcOpts.quiet = a.quiet
	var total int64
	for _, n := range srcNames {
		im, err := e.open(n, a.srcOpts)
		if err != nil {
			return err
		}
		srcs = append(srcs, im)
		total += (im.size() + 511) &^ 511
	}
	if a.snapshot.set {
		if !a.snapshot.opts && len(srcs) > 1 {
			return failf("No support for concatenating multiple snapshot")
		}
		if err := a.snapshot.load(e, srcs[0]); err != nil {
			return err
		}
	}
	if a.bitmaps {
		return failf("Copying bitmaps is not supported by %s", Prog)
	}
	var cOpts *qemuOpts
	if !a.skipCreate {
		var err error
		if cOpts, err = e.formatOpts(a.outFmt); err != nil {
			return failf("%v", err)
		}
		if a.options != "" {
			if err := cOpts.parse(a.options); err != nil {
				return failf("%v", err)
			}
		}
		cOpts.setNumber("size", uint64(total))
		if a.backing != "" {
			if cOpts.set("backing_file", a.backing) != nil {
				return failf("Backing file not supported for file format '%s'", a.outFmt)
			}
		}
		if a.backingFmt != "" {
			if cOpts.set("backing_fmt", a.backingFmt) != nil {
				return failf("Backing file format not supported for file format '%s'", a.outFmt)
			}
		}
		if b, ok := cOpts.get("backing_file"); ok {
			a.backing = b
		}
	}
	if a.targetIsZero && a.backing != "" {
		return failf("Cannot use --target-is-zero when the destination image has a backing file")
	}
	if len(srcs) > 1 && a.backing != "" {
		return failf("Having a backing file for the target makes no sense when concatenating multiple input images")
	}
	if a.backing != "" {
		if _, ok := cOpts.get("backing_fmt"); !ok {
			return failf("Use of backing file requires explicit backing format")
		}
		return failf("Converting to an image with a backing file (-B) is not supported by %s", Prog)
	}
	if a.compressed {
		if cOpts != nil {
			if cOpts.getBool("encryption", false) || cOpts.has("encrypt.format") {
				return failf("Compression and encryption not supported at the same time")
			}
			if p, ok := cOpts.get("preallocation"); ok && p != "off" {
				return failf("Compression and preallocation not supported at the same time")
			}
		}
		if !canCompress(a.outFmt) {
			return failf("Compression not supported for this file format")
		}
	}
	tgtOpen := openOpts{imageOpts: a.tgtImageOpts, fmt: a.outFmt, write: true, unmap: a.minSparse > 0, cache: a.cache, quiet: a.quiet}
	if _, _, _, ok := cacheFlags(a.cache); !ok {
		return failf("Invalid cache option: %s", a.cache)
	}
	if !a.skipCreate {
		if a.outFmt == "luks" && cOpts.getBool("detached-header", false) {
			return failf("%s: error while converting luks: a detached header has no room for data; create the header and a data file, then convert with -n --target-image-opts", out)
		}
		tgtOpen.extra = map[string]string{}
		for _, d := range cOpts.desc {
			if v, ok := cOpts.get(d.name); ok && strings.HasSuffix(d.name, "key-secret") {
				tgtOpen.extra[d.name] = v
			}
		}
		if err := e.createImage(out, a.outFmt, cOpts); err != nil {
			return failf("%s: error while converting %s: %v", out, a.outFmt, err)
		}
	}
	dst, err := e.open(out, tgtOpen)
	if err != nil {
		return err
	}
	defer dst.close()
	if a.compressed && compressedWriter(dst) == nil {
		return failf("Compression not supported for this file format")
	}
	if a.skipCreate && dst.size() < total {
		return failf("output file is smaller than input file")
	}
	j := &convertJob{
		e: e, srcs: srcs, dst: dst, total: total, minSparse: a.minSparse,
		workers: a.workers, salvage: a.salvage, quiet: a.quiet, rate: a.rateLimit,
		zeroInit: a.targetIsZero,
	}
	if !a.skipCreate && a.minSparse > 0 && zeroInitFormats[dst.format] {
		j.zeroInit = true
	}
	j.inOrder = a.inOrder && !fixedLayout[dst.format]
	if a.compressed {
		j.compress = compressedWriter(dst)
		j.cluster = clusterSize(dst)
		j.inOrder = true
	}
	if a.progress {
		alloc, err := j.allocatedBytes()
		if err != nil {
			return err
		}
		bar = newProgress(e, true, alloc, "convert")
		j.bar = bar
	}
	if err := j.run(); err != nil {
		bar.abort()
		return err
	}
	if err := dst.blk.Flush(e.ctx); err != nil {
		bar.abort()
		return failf("error while flushing %s: %s", out, errno(err))
	}
	bar.finish()
	return nil
}

// canCompress reports whether a format can hold compressed data.
func canCompress(format string) bool { return format == "qcow2" }
