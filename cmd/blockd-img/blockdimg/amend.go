package blockdimg

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"blockd/drivers/qcow2"
	"blockd/graph"
	"blockd/internal/qapi"
)

func cmdAmend(e *env, args []string) error {
	opts, rest, err := getopt(args, ":ho:f:t:pq", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force", false, optForce},
	})
	if err != nil {
		return err
	}
	o := openOpts{write: true}
	options, quiet, progress, force := "", false, false, false
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'o':
			if options, err = accumulateOptions(options, p.arg); err != nil {
				return err
			}
		case 'f':
			o.fmt = p.arg
		case 't':
			o.cache = p.arg
		case 'p':
			progress = true
		case 'q':
			quiet = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			o.imageOpts = true
		case optForce:
			force = true
		}
	}
	if options == "" {
		return usagef("Must specify options (-o)")
	}
	if quiet {
		progress = false
	}
	if o.fmt != "" && hasHelpOption(options) {
		return e.printAmendHelp(o.fmt)
	}
	if len(rest) != 1 {
		return failf("Expecting one image file name")
	}
	if _, _, _, ok := cacheFlags(o.cache); !ok {
		return failf("Invalid cache option: %s", o.cache)
	}
	o.quiet = quiet
	im, err := e.open(rest[0], o)
	if err != nil {
		return err
	}
	defer im.close()
	format := im.format
	if hasHelpOption(options) {
		return e.printAmendHelp(format)
	}
	drv := im.bds.Driver()
	list := amendOptsFor(format)
	amender, ok := im.bds.Node().(graph.Amender)
	if drv.AmendOptions == nil || list == nil || !ok {
		return failf("Format driver '%s' does not support option amendment", format)
	}
	aOpts := newOpts(list)
	if err := aOpts.parse(options); err != nil {
		if cOpts, cerr := e.formatOpts(format); cerr == nil && cOpts.parse(options) == nil {
			return failf("%v\nThis option is only supported for image creation", err)
		}
		return failf("%v", err)
	}
	var run func() error
	if ia, ok := im.bds.Node().(qcow2Amender); ok {
		// qemu-img's qcow2 options, plus the LUKS keyslots of an
		// encrypted image through x-blockdev-amend's encrypt member.
		a, encrypt, err := qcow2Amend(im, list, aOpts)
		if err != nil {
			return err
		}
		var v any
		if encrypt {
			if v, err = amendQAPI(drv, aOpts, "encrypt"); err != nil {
				return failf("%v", err)
			}
		}
		run = func() error {
			if v != nil {
				if err := amender.Amend(e.ctx, v, force); err != nil {
					return err
				}
			}
			return ia.AmendImage(e.ctx, a, force)
		}
	} else {
		v, err := amendQAPI(drv, aOpts)
		if err != nil {
			return failf("%v", err)
		}
		run = func() error { return amender.Amend(e.ctx, v, force) }
	}
	bar := newProgress(e, progress, 100, "amend")
	err = run()
	if err == nil {
		bar.set(100)
	}
	bar.finish()
	if err != nil {
		return failf("%v", err)
	}
	if err := im.blk.Flush(e.ctx); err != nil {
		return failf("%s", errno(err))
	}
	return nil
}

// amendQAPI decodes amend options into the driver's x-blockdev-amend
// options; with only, just those top-level members go there.
func amendQAPI(drv *graph.Driver, aOpts *qemuOpts, only ...string) (any, error) {
	tree := map[string]any{}
	if err := aOpts.qapiTree(tree); err != nil {
		return nil, err
	}
	if only != nil {
		for k := range tree {
			if !slices.Contains(only, k) {
				delete(tree, k)
			}
		}
	}
	if enc, ok := tree["encrypt"].(map[string]any); ok {
		setDefault(enc, "format", "luks")
	}
	v := drv.AmendOptions()
	return v, qapi.Decode(tree, false, v)
}

func (e *env) printAmendHelp(format string) error {
	if e.g.Driver(format) == nil {
		return failf("Unknown file format '%s'", format)
	}
	list := amendOptsFor(format)
	if list == nil || e.g.Driver(format).AmendOptions == nil {
		return failf("Format driver '%s' does not support option amendment", format)
	}
	fmt.Fprintf(e.stdout, "Amend options for '%s':\n", format)
	newOpts(list).printHelp(e.stdout)
	return nil
}

// qcow2Amender is a qcow2 node: qemu-img amend changes its header options
// (qcow2_amend_options), which QMP's x-blockdev-amend cannot.
type qcow2Amender interface {
	AmendImage(ctx context.Context, a *qcow2.ImageAmend, force bool) error
}

// qcow2Amend reads qemu-img's qcow2 amend options (qcow2_amend_options)
// and reports whether LUKS keyslot options are among them.
func qcow2Amend(im *image, list []optDesc, aOpts *qemuOpts) (*qcow2.ImageAmend, bool, error) {
	var a qcow2.ImageAmend
	encrypt := false
	// In the order of the option list, as QEMU checks them.
	for _, d := range list {
		v, ok := aOpts.vals[d.name]
		if !ok {
			continue
		}
		switch {
		case d.name == "compat":
			switch v.str {
			case "0.10", "v2":
				a.Version = 2
			case "1.1", "v3":
				a.Version = 3
			default:
				return nil, false, failf("Unknown compatibility level %s", v.str)
			}
		case d.name == "size":
			a.Size = int64(v.num)
		case d.name == "backing_file":
			a.BackingFile = &v.str
		case d.name == "backing_fmt":
			a.BackingFormat = &v.str
		case strings.HasPrefix(d.name, "encrypt."):
			if !im.bds.ImageInfo(false).Encrypted {
				return nil, false, failf("Can't amend encryption options - encryption not present")
			}
			encrypt = true
		case d.name == "lazy_refcounts":
			a.LazyRefcounts = &v.b
		case d.name == "refcount_bits":
			a.RefcountBits = int(v.num)
			if v.num == 0 || v.num > 64 || v.num&(v.num-1) != 0 {
				return nil, false, failf("Refcount width must be a power of two and may not exceed 64 bits")
			}
		case d.name == "data_file":
			a.DataFile = &v.str
		case d.name == "data_file_raw":
			a.DataFileRaw = &v.b
		}
	}
	return &a, encrypt, nil
}
