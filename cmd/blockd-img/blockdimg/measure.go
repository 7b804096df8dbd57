package blockdimg

import (
	"errors"
	"fmt"
	"math"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/internal/qapi"
)

// BlockMeasureInfo is QEMU's BlockMeasureInfo.
type BlockMeasureInfo struct {
	Required       int64  `json:"required"`
	FullyAllocated int64  `json:"fully-allocated"`
	Bitmaps        *int64 `json:"bitmaps,omitempty"`
}

func cmdMeasure(e *env, args []string) error {
	opts, rest, err := getopt(args, "hf:O:o:l:U", []longOpt{
		{"help", false, 'h'}, {"image-opts", false, optImageOpts}, {"object", true, optObject},
		{"output", true, optOutput}, {"size", true, optSize}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	var o openOpts
	outFmt, options := "raw", ""
	var snapshot snapshotSpec
	json := false
	size := int64(-1)
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			o.fmt = p.arg
		case 'O':
			outFmt = p.arg
		case 'o':
			if options, err = accumulateOptions(options, p.arg); err != nil {
				return err
			}
		case 'l':
			if snapshot, err = parseSnapshotSpec(p.arg); err != nil {
				return err
			}
		case 'U':
			o.forceShare = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			o.imageOpts = true
		case optOutput:
			switch p.arg {
			case "json":
				json = true
			case "human":
				json = false
			default:
				return failf("--output must be used with human or json as argument.")
			}
		case optSize:
			if size, err = cvtnum("image size", p.arg, 0, math.MaxInt64); err != nil {
				return err
			}
		}
	}
	filename := ""
	switch {
	case len(rest) > 1:
		return failf("At most one filename argument is allowed.")
	case len(rest) == 1:
		filename = rest[0]
	}
	if filename == "" && (o.imageOpts || o.fmt != "" || snapshot.set) {
		return failf("--image-opts, -f, and -l require a filename argument.")
	}
	if filename != "" && size >= 0 {
		return failf("--size N cannot be used together with a filename.")
	}
	if filename == "" && size < 0 {
		return failf("Either --size N or one filename must be specified.")
	}
	var in *image
	if filename != "" {
		in, err = e.open(filename, o)
		if err != nil {
			return err
		}
		defer in.close()
		if snapshot.set {
			if err := snapshot.load(e, in); err != nil {
				return err
			}
		}
	}
	cOpts, err := e.formatOpts(outFmt)
	if err != nil {
		return failf("%v", err)
	}
	if options != "" {
		if err := cOpts.parse(options); err != nil {
			return failf("%v\n%s: Invalid options for file format '%s'", err, Prog, outFmt)
		}
	}
	if size >= 0 {
		cOpts.setNumber("size", uint64(size))
	}
	info, err := e.measure(outFmt, cOpts, in)
	if err != nil {
		return failf("%v", err)
	}
	if json {
		fmt.Fprintf(e.stdout, "%s\n", qapi.MarshalPretty(info))
		return nil
	}
	fmt.Fprintf(e.stdout, "required size: %d\nfully allocated size: %d\n", info.Required, info.FullyAllocated)
	if info.Bitmaps != nil {
		fmt.Fprintf(e.stdout, "bitmaps size: %d\n", *info.Bitmaps)
	}
	return nil
}

// measure is bdrv_measure for the formats blockd-img creates.
func (e *env) measure(format string, opts *qemuOpts, in *image) (*BlockMeasureInfo, error) {
	size := int64(opts.vals["size"].num+511) &^ 511
	if in != nil {
		size = in.size()
	}
	switch format {
	case "raw", "file":
		return &BlockMeasureInfo{Required: size, FullyAllocated: size}, nil
	case "luks":
		off, err := e.luksPayloadOffset(opts)
		if err != nil {
			return nil, err
		}
		return &BlockMeasureInfo{Required: off + size, FullyAllocated: off + size}, nil
	}
	if m := formatMeasurer(format); m != nil {
		return m(e, opts, in, size)
	}
	return nil, fmt.Errorf("Block driver '%s' does not support size measurement", format)
}

// luksPayloadOffset is the size of the LUKS header the options describe
// (QEMU's qcrypto_block_calculate_payload_offset): a header is made in
// memory, with a fixed-cost KDF so that nothing is benchmarked.
func (e *env) luksPayloadOffset(opts *qemuOpts) (int64, error) {
	tree := map[string]any{}
	if err := opts.qapiTree(tree); err != nil {
		return 0, err
	}
	delete(tree, "size")
	delete(tree, "preallocation")
	delete(tree, "nocow")
	delete(tree, "extent-size-hint")
	var f qcrypto.CreateFields
	if err := qapi.Decode(tree, false, &f); err != nil {
		return 0, err
	}
	if f.KeySecret == nil {
		return 0, errors.New("Parameter 'key-secret' is required for cipher")
	}
	pass, err := e.secrets.Get(*f.KeySecret)
	if err != nil {
		return 0, err
	}
	defer luksfmt.Wipe(pass)
	fo, err := f.FormatOptions()
	if err != nil {
		return 0, err
	}
	fo.Passphrase = pass
	fo.Detached = opts.getBool("detached-header", false)
	fo.KDF.Iterations = 1000
	if fo.KDF.Type != "" && fo.KDF.Type != luksfmt.KDFPBKDF2 || fo.Version == 2 && fo.KDF.Type == "" {
		fo.KDF.Iterations, fo.KDF.MemoryKiB, fo.KDF.Parallel = 4, 32, 1
	}
	mem := &memFile{}
	hdr, key, err := luksfmt.Create(mem, fo)
	if err != nil {
		return 0, err
	}
	luksfmt.Wipe(key)
	if fo.Detached {
		return 0, nil
	}
	return hdr.PayloadOffset(), nil
}

// memFile is an in-memory io.ReaderAt and io.WriterAt.
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, errors.New("EOF")
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		clear(p[n:])
	}
	return len(p), nil
}
