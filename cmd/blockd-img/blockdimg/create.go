package blockdimg

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"

	"blockd/internal/qapi"
)

// cvtnum parses a size argument as qemu-img's cvtnum_full does.
func cvtnum(name, value string, minv, maxv int64) (int64, error) {
	n, err := qapi.ParseSize(value)
	if err != nil && err.Error() != "size too large" {
		return 0, failf("Invalid %s specified. You may use k, M, G, T, P or E suffixes for\n%s: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.", name, Prog)
	}
	if err != nil || n > uint64(maxv) || int64(n) < minv {
		return 0, failf("Invalid %s specified. Must be between %d and %d.", name, minv, maxv)
	}
	return int64(n), nil
}

func cmdCreate(e *env, args []string) error {
	opts, rest, err := getopt(args, ":F:b:f:ho:qu", []longOpt{{"help", false, 'h'}, {"object", true, optObject}})
	if err != nil {
		return err
	}
	format, baseFmt, base, options := "raw", "", "", ""
	hasBase, hasBaseFmt, quiet, noBacking := false, false, false, false
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'F':
			baseFmt, hasBaseFmt = p.arg, true
		case 'b':
			base, hasBase = p.arg, true
		case 'f':
			format = p.arg
		case 'o':
			if options, err = accumulateOptions(options, p.arg); err != nil {
				return err
			}
		case 'q':
			quiet = true
		case 'u':
			noBacking = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		}
	}
	filename := ""
	if len(rest) > 0 {
		filename = rest[0]
	}
	if options != "" && hasHelpOption(options) {
		return e.printCreateHelp(filename, format)
	}
	if len(rest) < 1 {
		return usagef("Expecting image file name")
	}
	size := int64(-1)
	if len(rest) >= 2 {
		if size, err = cvtnum("image size", rest[1], 0, math.MaxInt64); err != nil {
			return err
		}
	}
	if len(rest) > 2 {
		return usagef("Unexpected argument: %s", rest[2])
	}
	req := &createRequest{filename: filename, format: format, options: options, size: size, quiet: quiet, noBacking: noBacking}
	if hasBase {
		req.backing = &base
	}
	if hasBaseFmt {
		req.backingFmt = &baseFmt
	}
	if err := e.imgCreate(req); err != nil {
		return failf("%s: %s", filename, err.Error())
	}
	return nil
}

// accumulateOptions joins repeated -o arguments (qemu-img's
// accumulate_options).
func accumulateOptions(all, arg string) (string, error) {
	if !validOptionList(arg) {
		return "", failf("Invalid option list: %s", arg)
	}
	if all == "" {
		return arg, nil
	}
	return all + "," + arg, nil
}

func validOptionList(s string) bool {
	if s == "" || s[0] == ',' {
		return false
	}
	n := 0
	for i := len(s); i > 0 && s[i-1] == ','; i-- {
		n++
	}
	return n%2 == 0
}

// createRequest is bdrv_img_create's arguments.
type createRequest struct {
	filename, format, options string
	size                      int64 // -1: not given
	backing, backingFmt       *string
	quiet, noBacking          bool
}

// formatOpts returns the create options of a format plus the protocol's,
// with QEMU's errors for formats that cannot create images.
func (e *env) formatOpts(format string) (*qemuOpts, error) {
	list := createOptsFor(format)
	if e.g.Driver(format) == nil {
		return nil, fmt.Errorf("Unknown file format '%s'", format)
	}
	if list == nil || e.g.Driver(format).Create == nil && format != "raw" {
		return nil, fmt.Errorf("Format driver '%s' does not support image creation", format)
	}
	return newOpts(list, fileCreateOpts), nil
}

func (e *env) printCreateHelp(filename, format string) error {
	list := createOptsFor(format)
	if e.g.Driver(format) == nil {
		return failf("Unknown file format '%s'", format)
	}
	if list == nil {
		return failf("Format driver '%s' does not support image creation", format)
	}
	if filename != "" {
		fmt.Fprintf(e.stdout, "Supported options:\n")
		newOpts(list, fileCreateOpts).printHelp(e.stdout)
		return nil
	}
	fmt.Fprintf(e.stdout, "Supported %s options:\n", format)
	newOpts(list).printHelp(e.stdout)
	fmt.Fprintf(e.stdout, "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n")
	return nil
}

// imgCreate is QEMU's bdrv_img_create.
func (e *env) imgCreate(r *createRequest) error {
	opts, err := e.formatOpts(r.format)
	if err != nil {
		return err
	}
	if r.options != "" {
		if err := opts.parse(r.options); err != nil {
			return err
		}
	}
	if !opts.has("size") {
		if r.size >= 0 {
			opts.setNumber("size", uint64(r.size))
		}
	} else if r.size != -1 {
		return errors.New("The image size must be specified only once")
	}
	if r.backing != nil {
		if opts.set("backing_file", *r.backing) != nil {
			return fmt.Errorf("Backing file not supported for file format '%s'", r.format)
		}
	}
	if r.backingFmt != nil {
		if opts.set("backing_fmt", *r.backingFmt) != nil {
			return fmt.Errorf("Backing file format not supported for file format '%s'", r.format)
		}
	}
	backing, hasBacking := opts.get("backing_file")
	if hasBacking {
		if backing == r.filename {
			return errors.New("Error: Trying to create an image with the same filename as the backing file")
		}
		if backing == "" {
			return errors.New("Expected backing file name, got empty string")
		}
	}
	backingFmt, hasBackingFmt := opts.get("backing_fmt")
	if hasBacking && !r.noBacking {
		full := fullBackingName(r.filename, backing)
		bim, err := e.open(full, openOpts{fmt: backingFmt, noIO: true, forceShare: true, noBacking: true, quiet: true})
		if err != nil {
			var ee *exitError
			msg := err.Error()
			if errors.As(err, &ee) {
				msg = ee.msg
			}
			return fmt.Errorf("%s\nCould not open backing image.", msg)
		}
		detected, bsize := bim.format, bim.size()
		bim.close()
		if !hasBackingFmt {
			return fmt.Errorf("Backing file specified without backing format\nDetected format of %s.%s", detected, noNewline)
		}
		if !opts.has("size") {
			opts.setNumber("size", uint64(bsize))
		}
	} else if hasBacking && !hasBackingFmt {
		return errors.New("Backing file specified without backing format")
	}
	if !opts.has("size") {
		if r.format == "luks" && opts.getBool("detached-header", false) {
			opts.setNumber("size", 0)
		} else {
			return errors.New("Image creation needs a size parameter")
		}
	}
	if !r.quiet {
		fmt.Fprintf(e.stdout, "Formatting '%s', fmt=%s ", r.filename, r.format)
		opts.print(e.stdout)
		fmt.Fprintln(e.stdout)
	}
	return e.createImage(r.filename, r.format, opts)
}

// createImage creates an image with parsed create options: the protocol
// file through the file driver's blockdev-create, then the format through
// its driver's blockdev-create on a node of that file.
func (e *env) createImage(filename, format string, opts *qemuOpts) error {
	if p, ok := opts.get("preallocation"); ok {
		valid := map[string]bool{"off": true, "metadata": true, "falloc": true, "full": true}
		if !valid[p] {
			return fmt.Errorf("invalid parameter value: %s", p)
		}
	}
	size := opts.vals["size"].num
	switch format {
	case "file", "raw":
		// QEMU rounds the size of a raw image up to whole sectors.
		opts.setNumber("size", (size+511)&^511)
		return e.createProtocol(filename, opts, true)
	}
	if err := e.createProtocol(filename, opts, false); err != nil {
		return err
	}
	nn := e.nodeName("create")
	if _, err := e.g.Add(e.ctx, map[string]any{"driver": "file", "node-name": nn, "filename": filename}, false); err != nil {
		return err
	}
	defer func() { _ = e.g.Del(nn) }()
	tree := map[string]any{"driver": format}
	if err := opts.qapiTree(tree); err != nil {
		return err
	}
	switch format {
	case "luks":
		if opts.getBool("detached-header", false) {
			tree["header"] = nn
			delete(tree, "preallocation")
		} else {
			tree["file"] = nn
		}
	case "qcow2":
		tree["file"] = nn
		if v, ok := opts.get("compat"); ok {
			switch v {
			case "0.10", "v2":
				tree["version"] = "v2"
			case "1.1", "v3":
				tree["version"] = "v3"
			default:
				return fmt.Errorf("Invalid compatibility level: '%s'", v)
			}
		}
		if opts.getBool("encryption", false) {
			if f, ok := opts.get("encrypt.format"); ok && f != "aes" {
				return fmt.Errorf("Encryption option 'encryption=on' conflicts with 'encrypt.format=%s'", f)
			}
			setDefault(tree, "encrypt.format", "qcow")
		}
		// qemu-img calls the legacy encryption "aes", blockdev-create "qcow".
		if enc, ok := tree["encrypt"].(map[string]any); ok && enc["format"] == "aes" {
			enc["format"] = "qcow"
		}
		if df, ok := opts.get("data_file"); ok {
			dopts := newOpts(fileCreateOpts)
			dopts.setNumber("size", 0)
			if err := e.createProtocol(df, dopts, false); err != nil {
				return err
			}
			dn := e.nodeName("create")
			if _, err := e.g.Add(e.ctx, map[string]any{"driver": "file", "node-name": dn, "filename": df}, false); err != nil {
				return err
			}
			defer func() { _ = e.g.Del(dn) }()
			tree["data-file"] = dn
		}
	}
	return e.runCreate(tree)
}

// createProtocol creates the file under an image; withSize gives it the
// image's size and preallocation (raw), else it is created empty.
func (e *env) createProtocol(filename string, opts *qemuOpts, withSize bool) error {
	tree := map[string]any{"driver": "file", "filename": filename, "size": json.Number("0")}
	if withSize {
		tree["size"] = json.Number(strconv.FormatUint(opts.vals["size"].num, 10))
		if p, ok := opts.get("preallocation"); ok {
			if p == "metadata" {
				return errors.New("Unsupported preallocation mode 'metadata'")
			}
			tree["preallocation"] = p
		}
	}
	if v, ok := opts.vals["nocow"]; ok {
		tree["nocow"] = v.b
	}
	if v, ok := opts.vals["extent_size_hint"]; ok {
		tree["extent-size-hint"] = json.Number(strconv.FormatUint(v.num, 10))
	}
	return e.runCreate(tree)
}

// runCreate runs blockdev-create in-process (as cmd/blockd's demo does).
func (e *env) runCreate(tree map[string]any) error {
	drv, opts, err := e.g.DecodeCreateOptions(tree)
	if err != nil {
		return err
	}
	cc := e.g.NewCreateContext()
	defer cc.Release()
	return drv.Create(e.ctx, cc, opts)
}
