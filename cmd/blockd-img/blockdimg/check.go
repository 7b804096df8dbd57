package blockdimg

import (
	"context"
	"fmt"

	"blockd/internal/qapi"
)

// ImageCheck is QEMU's ImageCheck (the JSON of check --output=json).
type ImageCheck struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	Leaks              int64  `json:"leaks,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
}

// CheckResult is QEMU's BdrvCheckResult.
type CheckResult struct {
	CorruptionsFixed, LeaksFixed                                             int64
	CheckErrors, Corruptions, Leaks                                          int64
	ImageEndOffset                                                           int64
	TotalClusters, AllocatedClusters, FragmentedClusters, CompressedClusters int64
	// Messages name the problems found, printed on stderr as qemu-img
	// does.
	Messages []string
}

// Fix modes of check -r.
const (
	FixLeaks  = 1
	FixErrors = 2
)

// checkFunc checks (and with fix repairs) an image.
type checkFunc func(ctx context.Context, fix int) (CheckResult, error)

// checkerFor returns the check capability of the image's format, or nil
// when the format has none (then qemu-img exits with 63).
func (im *image) checkerFor() checkFunc {
	if im.bds == nil {
		return nil
	}
	return formatChecker(im.bds.Node())
}

func cmdCheck(e *env, args []string) error {
	opts, rest, err := getopt(args, ":hf:r:T:qU", []longOpt{
		{"help", false, 'h'}, {"format", true, 'f'}, {"repair", true, 'r'}, {"output", true, optOutput},
		{"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	var o openOpts
	output, quiet, fix := "", false, 0
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			o.fmt = p.arg
		case 'r':
			o.write = true
			switch p.arg {
			case "leaks":
				fix = FixLeaks
			case "all":
				fix = FixLeaks | FixErrors
			default:
				return usagef("Unknown option value for -r (expecting 'leaks' or 'all'): %s", p.arg)
			}
		case optOutput:
			output = p.arg
		case 'T':
			o.cache = p.arg
		case 'q':
			quiet = true
		case 'U':
			o.forceShare = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			o.imageOpts = true
		}
	}
	if len(rest) != 1 {
		return usagef("Expecting one image file name")
	}
	filename := rest[0]
	json, err := outputFormat(output)
	if err != nil {
		return err
	}
	if _, _, _, ok := cacheFlags(o.cache); !ok {
		return failf("Invalid source cache option: %s", o.cache)
	}
	o.quiet, o.check = quiet, true
	im, err := e.open(filename, o)
	if err != nil {
		return err
	}
	defer im.close()
	check := im.checkerFor()
	if check == nil {
		return &exitError{code: 63, msg: "This image format does not support checks"}
	}
	res, cerr := check(e.ctx, fix)
	for _, m := range res.Messages {
		fmt.Fprintln(e.stderr, m)
	}
	ic := imageCheck(filename, im.format, res)
	if cerr == nil && (res.CorruptionsFixed != 0 || res.LeaksFixed != 0) {
		if !json {
			e.printf(quiet, "The following inconsistencies were found and repaired:\n\n"+
				"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
				res.LeaksFixed, res.CorruptionsFixed)
		}
		res2, err2 := check(e.ctx, 0)
		cerr = err2
		ic = imageCheck(filename, im.format, res2)
		ic.LeaksFixed, ic.CorruptionsFixed = res.LeaksFixed, res.CorruptionsFixed
	}
	if cerr == nil {
		if json {
			e.printf(quiet, "%s\n", qapi.MarshalPretty(ic))
		} else {
			dumpHumanCheck(e, ic, quiet)
		}
	}
	if cerr != nil {
		return failf("Check failed: %s", errno(cerr))
	}
	if ic.CheckErrors != 0 {
		return failf("Check failed")
	}
	switch {
	case ic.Corruptions != 0:
		return exitCode(2)
	case ic.Leaks != 0:
		return exitCode(3)
	}
	return nil
}

func imageCheck(filename, format string, r CheckResult) *ImageCheck {
	return &ImageCheck{
		Filename: filename, Format: format,
		CheckErrors: r.CheckErrors, Corruptions: r.Corruptions, Leaks: r.Leaks,
		CorruptionsFixed: r.CorruptionsFixed, LeaksFixed: r.LeaksFixed,
		ImageEndOffset: r.ImageEndOffset, TotalClusters: r.TotalClusters,
		AllocatedClusters: r.AllocatedClusters, FragmentedClusters: r.FragmentedClusters,
		CompressedClusters: r.CompressedClusters,
	}
}

// dumpHumanCheck is qemu-img's dump_human_image_check.
func dumpHumanCheck(e *env, c *ImageCheck, quiet bool) {
	if c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0 {
		e.printf(quiet, "No errors were found on the image.\n")
	} else {
		if c.Corruptions != 0 {
			e.printf(quiet, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", c.Corruptions)
		}
		if c.Leaks != 0 {
			e.printf(quiet, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", c.Leaks)
		}
		if c.CheckErrors != 0 {
			e.printf(quiet, "\n%d internal errors have occurred during the check.\n", c.CheckErrors)
		}
	}
	if c.TotalClusters != 0 && c.AllocatedClusters != 0 {
		e.printf(quiet, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			c.AllocatedClusters, c.TotalClusters,
			float64(c.AllocatedClusters)*100/float64(c.TotalClusters),
			float64(c.FragmentedClusters)*100/float64(c.AllocatedClusters),
			float64(c.CompressedClusters)*100/float64(c.AllocatedClusters))
	}
	if c.ImageEndOffset != 0 {
		e.printf(quiet, "Image end offset: %d\n", c.ImageEndOffset)
	}
}
