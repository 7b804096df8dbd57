package blockdimg

import (
	"blockd/graph"
)

func cmdResize(e *env, args []string) error {
	// The size is taken off first so that "-1G" is not an option.
	if len(args) < 2 {
		return usagef("Not enough arguments")
	}
	size := args[len(args)-1]
	args = args[:len(args)-1]
	opts, rest, err := getopt(args, ":f:hq", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts},
		{"preallocation", true, optPreallocation}, {"shrink", false, optShrink},
	})
	if err != nil {
		return err
	}
	o := openOpts{write: true, resize: true}
	quiet, shrink := false, false
	prealloc := graph.PreallocOff
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			o.fmt = p.arg
		case 'q':
			quiet = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			o.imageOpts = true
		case optPreallocation:
			switch graph.Prealloc(p.arg) {
			case graph.PreallocOff, graph.PreallocMetadata, graph.PreallocFalloc, graph.PreallocFull:
				prealloc = graph.Prealloc(p.arg)
			default:
				return failf("Invalid preallocation mode '%s'", p.arg)
			}
		case optShrink:
			shrink = true
		}
	}
	if len(rest) != 1 {
		return usagef("Expecting image file name and size")
	}
	relative := 0
	switch {
	case len(size) > 0 && size[0] == '+':
		relative, size = 1, size[1:]
	case len(size) > 0 && size[0] == '-':
		relative, size = -1, size[1:]
	}
	n, err := parseOptSize("size", size)
	if err != nil {
		return failf("%v", err)
	}
	o.quiet = quiet
	im, err := e.open(rest[0], o)
	if err != nil {
		return err
	}
	defer im.close()
	cur := im.size()
	total := int64(n)
	if relative != 0 {
		total = cur + int64(relative)*int64(n)
	}
	if total <= 0 {
		return failf("New image size must be positive")
	}
	if total <= cur && prealloc != graph.PreallocOff {
		return failf("Preallocation can only be used for growing images")
	}
	if total < cur && !shrink {
		return failf("Use the --shrink option to perform a shrink operation.\n%s: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.", Prog)
	}
	if err := im.blk.Truncate(e.ctx, total, prealloc); err != nil {
		return failf("%s", truncateError(err))
	}
	if err := im.blk.Flush(e.ctx); err != nil {
		return failf("%s", errno(err))
	}
	e.printf(quiet, "Image resized.\n")
	return nil
}

// parseOptSize parses a size the way a QemuOpts size option does.
func parseOptSize(name, value string) (uint64, error) {
	o := newOpts([]optDesc{{name: name, typ: optSizeT}})
	if err := o.set(name, value); err != nil {
		return 0, err
	}
	return o.vals[name].num, nil
}

// truncateError words a failed resize.
func truncateError(err error) string {
	var oe *graph.OpError
	if asOpError(err, &oe) && oe.Err != nil {
		return oe.Err.Error()
	}
	return err.Error()
}
