package blockdimg

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"
)

// benchArgs are img_bench's options.
type benchArgs struct {
	count, depth  int
	offset        int64
	bufSize, step int64
	pattern       byte
	flushInterval int
	drain         bool
	write         bool
}

func cmdBench(e *env, args []string) error {
	opts, rest, err := getopt(args, ":hc:d:f:ni:o:qs:S:t:wU", []longOpt{
		{"help", false, 'h'}, {"flush-interval", true, optFlushInterval}, {"image-opts", false, optImageOpts},
		{"pattern", true, optPattern}, {"no-drain", false, optNoDrain}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	a := benchArgs{count: 75000, depth: 64, bufSize: 4096, drain: true}
	var o openOpts
	aio := ""
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'c':
			n, err := parseUint0(p.arg)
			if err != nil || n > math.MaxInt32 {
				return failf("Invalid request count specified")
			}
			a.count = int(n)
		case 'd':
			n, err := parseUint0(p.arg)
			if err != nil || n > math.MaxInt32 {
				return failf("Invalid queue depth specified")
			}
			a.depth = int(n)
		case 'f':
			o.fmt = p.arg
		case 'n':
			aio = "native"
		case 'i':
			switch p.arg {
			case "threads", "native", "io_uring":
				aio = p.arg
			default:
				return failf("Invalid aio option: %s", p.arg)
			}
		case 'o':
			if a.offset, err = cvtnum("offset", p.arg, 0, math.MaxInt64); err != nil {
				return err
			}
		case 'q':
			o.quiet = true
		case 's':
			if a.bufSize, err = cvtnum("buffer size", p.arg, 0, math.MaxInt32); err != nil {
				return err
			}
		case 'S':
			if a.step, err = cvtnum("step_size", p.arg, 0, math.MaxInt32); err != nil {
				return err
			}
		case 't':
			if _, _, _, ok := cacheFlags(p.arg); !ok {
				return failf("Invalid cache mode")
			}
			o.cache = p.arg
		case 'w':
			o.write, a.write = true, true
		case 'U':
			o.forceShare = true
		case optPattern:
			n, err := parseUint0(p.arg)
			if err != nil || n > 0xff {
				return failf("Invalid pattern byte specified")
			}
			a.pattern = byte(n)
		case optFlushInterval:
			n, err := parseUint0(p.arg)
			if err != nil || n > math.MaxInt32 {
				return failf("Invalid flush interval specified")
			}
			a.flushInterval = int(n)
		case optNoDrain:
			a.drain = false
		case optImageOpts:
			o.imageOpts = true
		}
	}
	if len(rest) != 1 {
		return usagef("Expecting one image file name")
	}
	if !a.write && a.flushInterval != 0 {
		return failf("--flush-interval is only available in write tests")
	}
	if a.flushInterval != 0 && a.flushInterval < a.depth {
		return failf("Flush interval can't be smaller than depth")
	}
	if aio != "" && !o.imageOpts {
		o.extra = map[string]string{"file.aio": aio}
	}
	im, err := e.open(rest[0], o)
	if err != nil {
		return err
	}
	defer im.close()
	if a.step == 0 {
		a.step = a.bufSize
	}
	kind := "read"
	if a.write {
		kind = "write"
	}
	fmt.Fprintf(e.stdout, "Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %d, step size %d)\n",
		a.count, kind, a.bufSize, a.depth, a.offset, a.step)
	if a.flushInterval != 0 {
		fmt.Fprintf(e.stdout, "Sending flush every %d requests\n", a.flushInterval)
	}
	start := time.Now()
	if err := runBench(e.ctx, im, &a); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "Run completed in %3.3f seconds.\n", time.Since(start).Seconds())
	return nil
}

// runBench keeps depth requests in flight until count are done, flushing
// every flushInterval requests (after draining the queue unless
// --no-drain), as qemu-img bench's callback loop does.
func runBench(ctx context.Context, im *image, a *benchArgs) error {
	size := im.size()
	if size <= 0 {
		return failf("Failed request: image is empty")
	}
	var (
		mu      sync.Mutex // protects next, issued, done and err
		next    = a.offset % size
		issued  int
		err     error
		flushWG sync.WaitGroup
	)
	// batch runs n requests at queue depth.
	batch := func(n int) {
		var wg sync.WaitGroup
		limit := issued + n
		for w := 0; w < max(a.depth, 1); w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, a.bufSize)
				if a.pattern != 0 {
					for i := range buf {
						buf[i] = a.pattern
					}
				}
				for {
					mu.Lock()
					if issued >= limit || err != nil {
						mu.Unlock()
						return
					}
					issued++
					off := next
					next = (next + a.step) % size
					mu.Unlock()
					var rerr error
					if a.write {
						rerr = im.blk.WriteAt(ctx, buf, off, im.writeFlags())
					} else {
						rerr = im.blk.ReadAt(ctx, buf, off)
					}
					if rerr != nil {
						mu.Lock()
						if err == nil {
							err = failf("Failed request: %s", errno(rerr))
						}
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	flush := func() {
		if ferr := im.blk.Flush(ctx); ferr != nil {
			mu.Lock()
			if err == nil {
				err = failf("Failed flush request: %s", errno(ferr))
			}
			mu.Unlock()
		}
	}
	if a.flushInterval == 0 {
		batch(a.count)
		return err
	}
	for remaining := a.count; remaining > 0 && err == nil; {
		n := min(remaining, a.flushInterval)
		batch(n)
		remaining -= n
		if n == a.flushInterval {
			if a.drain {
				flush()
			} else {
				flushWG.Add(1)
				go func() { defer flushWG.Done(); flush() }()
			}
		}
	}
	flushWG.Wait()
	return err
}

func parseUint0(s string) (uint64, error) {
	n, err := parseInt0(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid number")
	}
	return uint64(n), nil
}
