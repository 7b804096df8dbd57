// Package qcow2 is the qcow2 format driver: versions 2 and 3, backing
// chains, compressed clusters (zlib and zstd), extended L2 entries, an
// external data file, native LUKS encryption, zero clusters, discard,
// growth and blockdev-create. The on-disk format is in the qcow2fmt
// sub-package; this package is the graph glue, the metadata caches and the
// data path.
//
// Requests to different guest clusters run in parallel: a request locks
// only its own clusters (striped locks), L2 tables are locked briefly per
// table, and cluster allocation and metadata writeback are serialised
// under one metadata mutex that is never held across guest data I/O.
// Metadata is cached and written back in crash-safe order: data and
// refcount increments are stable before the L2 entries that reference
// them, and references are dropped from L2 tables before the clusters they
// held are freed.
package qcow2

import (
	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"context"
	"errors"
	"fmt"
	"sync"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/qapi"
)

// OverlapMode is Qcow2OverlapCheckMode.
type OverlapMode string

// EnumValues implements qapi.Enum.
func (OverlapMode) EnumValues() []string { return []string{"none", "constant", "cached", "all"} }

// OverlapFlags is Qcow2OverlapCheckFlags.
type OverlapFlags struct {
	Template        *OverlapMode `json:"template,omitempty"`
	MainHeader      *bool        `json:"main-header,omitempty"`
	ActiveL1        *bool        `json:"active-l1,omitempty"`
	ActiveL2        *bool        `json:"active-l2,omitempty"`
	RefcountTable   *bool        `json:"refcount-table,omitempty"`
	RefcountBlock   *bool        `json:"refcount-block,omitempty"`
	SnapshotTable   *bool        `json:"snapshot-table,omitempty"`
	InactiveL1      *bool        `json:"inactive-l1,omitempty"`
	InactiveL2      *bool        `json:"inactive-l2,omitempty"`
	BitmapDirectory *bool        `json:"bitmap-directory,omitempty"`
}

// OverlapChecks is the Qcow2OverlapChecks alternate: a mode or flags.
type OverlapChecks struct {
	Mode  OverlapMode
	Flags *OverlapFlags
}

// UnmarshalQAPI implements qapi.Unmarshaler.
func (o *OverlapChecks) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	switch v.(type) {
	case string:
		return d.DecodeValue(v, path, &o.Mode)
	case map[string]any:
		o.Flags = new(OverlapFlags)
		return d.DecodeValue(v, path, o.Flags)
	}
	return &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: Qcow2OverlapChecks", path)}
}

func (o *OverlapChecks) flags() olFlags {
	if o == nil {
		return olCached
	}
	tmpl := func(m OverlapMode) olFlags {
		switch m {
		case "none":
			return 0
		case "constant":
			return olConstant
		case "all":
			return olAll
		}
		return olCached
	}
	if o.Flags == nil {
		return tmpl(o.Mode)
	}
	f := olCached
	if o.Flags.Template != nil {
		f = tmpl(*o.Flags.Template)
	}
	set := func(p *bool, bit olFlags) {
		if p != nil {
			if *p {
				f |= bit
			} else {
				f &^= bit
			}
		}
	}
	set(o.Flags.MainHeader, olMainHeader)
	set(o.Flags.ActiveL1, olActiveL1)
	set(o.Flags.ActiveL2, olActiveL2)
	set(o.Flags.RefcountTable, olRefcountTable)
	set(o.Flags.RefcountBlock, olRefcountBlock)
	set(o.Flags.SnapshotTable, olSnapshotTable)
	set(o.Flags.InactiveL1, olInactiveL1)
	set(o.Flags.InactiveL2, olInactiveL2)
	set(o.Flags.BitmapDirectory, olBitmapDirectory)
	return f
}

// EncryptFormat is BlockdevQcow2EncryptionFormat.
type EncryptFormat string

// EnumValues implements qapi.Enum.
func (EncryptFormat) EnumValues() []string { return []string{"aes", "luks"} }

// EncryptOptions is BlockdevQcow2Encryption (both variants carry only
// key-secret).
type EncryptOptions struct {
	Format    EncryptFormat `json:"format"`
	KeySecret *string       `json:"key-secret,omitempty"`
}

// Options is BlockdevOptionsQcow2.
type Options struct {
	File               graph.Ref        `json:"file"`
	Backing            *graph.RefOrNull `json:"backing,omitempty"`
	LazyRefcounts      *bool            `json:"lazy-refcounts,omitempty"`
	PassDiscardRequest *bool            `json:"pass-discard-request,omitempty"`
	PassDiscardSnap    *bool            `json:"pass-discard-snapshot,omitempty"`
	PassDiscardOther   *bool            `json:"pass-discard-other,omitempty"`
	OverlapCheck       *OverlapChecks   `json:"overlap-check,omitempty"`
	CacheSize          *int64           `json:"cache-size,omitempty"`
	L2CacheSize        *int64           `json:"l2-cache-size,omitempty"`
	L2CacheEntrySize   *int64           `json:"l2-cache-entry-size,omitempty"`
	RefcountCacheSize  *int64           `json:"refcount-cache-size,omitempty"`
	CacheCleanInterval *int64           `json:"cache-clean-interval,omitempty"`
	Encrypt            *EncryptOptions  `json:"encrypt,omitempty"`
	DataFile           *graph.Ref       `json:"data-file,omitempty"`
}

// Driver returns the qcow2 driver.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:          "qcow2",
		Options:       func() any { return new(Options) },
		Open:          open,
		CreateOptions: func() any { return new(CreateOptions) },
		Create:        create,
		AmendOptions:  func() any { return new(AmendOptions) },
	}
}

// DefaultL2CacheMax is QEMU's default L2 cache limit on Linux.
const DefaultL2CacheMax = 32 << 20

// cacheSizes is QEMU's read_cache_sizes: the L2 cache (in tables) and the
// refcount cache (in blocks).
func cacheSizes(o *Options, g qcow2fmt.Geometry, virtualSize int64) (l2, rc int, err error) {
	cs := g.ClusterSize
	for _, p := range []struct {
		v    *int64
		name string
	}{{o.CacheSize, "cache-size"}, {o.L2CacheSize, "l2-cache-size"}, {o.RefcountCacheSize, "refcount-cache-size"}, {o.L2CacheEntrySize, "l2-cache-entry-size"}} {
		if p.v != nil && *p.v < 0 {
			return 0, 0, fmt.Errorf("Parameter '%s' expects a non-negative size", p.name)
		}
	}
	minRC := int64(4) * cs
	maxL2Entries := (virtualSize + cs - 1) / cs
	maxL2 := (maxL2Entries*int64(g.L2EntrySize) + cs - 1) / cs * cs
	l2Max := int64(DefaultL2CacheMax)
	if o.L2CacheSize != nil {
		l2Max = *o.L2CacheSize
	}
	var rcBytes int64
	if o.RefcountCacheSize != nil {
		rcBytes = *o.RefcountCacheSize
	}
	l2Bytes := min(maxL2, l2Max)
	if o.CacheSize != nil {
		combined := *o.CacheSize
		switch {
		case o.L2CacheSize != nil && o.RefcountCacheSize != nil:
			return 0, 0, errors.New("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
		case o.L2CacheSize != nil && l2Max > combined:
			return 0, 0, errors.New("l2-cache-size may not exceed cache-size")
		case rcBytes > combined:
			return 0, 0, errors.New("refcount-cache-size may not exceed cache-size")
		}
		switch {
		case o.L2CacheSize != nil:
			rcBytes = combined - l2Bytes
		case o.RefcountCacheSize != nil:
			l2Bytes = combined - rcBytes
		case combined >= maxL2+minRC:
			l2Bytes = maxL2
			rcBytes = combined - l2Bytes
		default:
			rcBytes = min(combined, minRC)
			l2Bytes = combined - rcBytes
		}
	}
	if o.L2CacheEntrySize != nil {
		es := *o.L2CacheEntrySize
		if es < 512 || es > cs || es&(es-1) != 0 {
			return 0, 0, fmt.Errorf("L2 cache entry size must be a power of two between %d and the cluster size (%d)", 512, cs)
		}
	}
	l2n := max((l2Bytes+cs-1)/cs, 2)
	if l2n > 1<<31-1 {
		return 0, 0, errors.New("L2 cache size too big")
	}
	rcn := max(rcBytes/cs, 4)
	if rcn > 1<<31-1 {
		return 0, 0, errors.New("Refcount cache size too big")
	}
	if o.CacheCleanInterval != nil && (*o.CacheCleanInterval < 0 || *o.CacheCleanInterval > 1<<32-1) {
		return 0, 0, errors.New("Cache clean interval too big")
	}
	return int(l2n), int(rcn), nil
}

// node is an open qcow2 node.
type node struct {
	*image
	keySecret string
	// kdfLimits are the graph's, for amending keyslots.
	kdfLimits luksfmt.KDFLimits
	noBacking bool // backing: null for an image with a backing file
	// explicitBacking: the backing child was named in the options, not
	// taken from headerBacking, the header's backing file name.
	explicitBacking bool
	headerBacking   string
	fmtName         string // backing-filename-format
	backName        string // full backing filename
	dataName        string
	// noIO: opened for metadata only (an encrypted image without its key,
	// an external data file not opened); I/O fails with this error.
	noIO    error
	amendMu sync.Mutex // one keyslot change at a time
	secrets func(id string) ([]byte, error)
}

// The optional capabilities of graph/node.go. Left out on purpose: Cacher (a cache request is advisory and does nothing here), PermSetter (the file node takes the locks), Resizer (PreallocResizer covers plain truncation).
var (
	_ graph.Zeroer            = (*node)(nil)
	_ graph.Discarder         = (*node)(nil)
	_ graph.BlockStatuser     = (*node)(nil)
	_ graph.Limiter           = (*node)(nil)
	_ graph.PreallocResizer   = (*node)(nil)
	_ graph.Infoer            = (*node)(nil)
	_ graph.StrongOptioner    = (*node)(nil)
	_ graph.Amender           = (*node)(nil)
	_ graph.ExplicitBackinger = (*node)(nil)
)

// open opens a qcow2 node as QEMU's qcow2_open does, and checks in the same
// order: the header, the runtime options, encryption, the external data
// file, the metadata tables, the backing file.
func open(ctx context.Context, o *graph.Opener, v any) (_ graph.Node, err error) {
	opts := v.(*Options)
	ro := o.ReadOnly()
	file, h, err := openHeader(ctx, o, opts, ro)
	if err != nil {
		return nil, err
	}
	p, err := openParams(o, opts, h, ro)
	if err != nil {
		return nil, err
	}
	// Until the node is returned, an error wipes the unlocked key.
	defer func() {
		if err != nil && p.cipher != nil {
			p.cipher.Wipe()
		}
	}()
	n := &node{secrets: o.Secret}
	if err = n.openEncryption(ctx, o, opts, file, h, &p); err != nil {
		return nil, err
	}
	p.file = file
	if p.data, err = n.openDataFile(ctx, o, opts, file, h, ro); err != nil {
		return nil, err
	}
	if n.image, err = newImage(ctx, h, p); err != nil {
		return nil, err
	}
	if err = n.openBacking(ctx, o, opts, h); err != nil {
		return nil, err
	}
	return n, nil
}

// openHeader opens the file child and parses the header; a corrupt image
// opens read-only only.
func openHeader(ctx context.Context, o *graph.Opener, opts *Options, ro bool) (*graph.Child, *qcow2fmt.Header, error) {
	file, err := o.Child(ctx, "file", &opts.File, graph.ChildSpec{Role: graph.RoleData | graph.RoleMetadata | graph.RolePrimary})
	if err != nil {
		return nil, nil, err
	}
	if file == nil {
		return nil, nil, errors.New("A block device must be specified for \"file\"")
	}
	// Tables past the end of the file read as zeroes (as in QEMU) for
	// read-only opens and checks; writes through them would grow the
	// file to wherever they point.
	h, err := qcow2fmt.ParseWith(graph.NewSectionIO(ctx, file, 0, -1), file.Size(), qcow2fmt.ParseOptions{TablesPastEnd: ro || o.Graph().CheckOpen})
	if err != nil {
		return nil, nil, err
	}
	if h.IncompatibleFeatures&qcow2fmt.IncompatCorrupt != 0 && !ro {
		return nil, nil, errors.New("qcow2: Image is corrupt; cannot be opened read/write")
	}
	return file, h, nil
}

// openParams takes the cache sizes, lazy refcounts, overlap checks and
// discard passing from the options.
func openParams(o *graph.Opener, opts *Options, h *qcow2fmt.Header, ro bool) (imageParams, error) {
	p := imageParams{ro: ro, name: o.NodeName(), emit: o.Graph().Emit, noRepair: o.Graph().CheckOpen}
	var err error
	if p.l2Tables, p.rcBlocks, err = cacheSizes(opts, h.Geometry(), int64(h.Size)); err != nil {
		return p, err
	}
	p.lazy = h.CompatibleFeatures&qcow2fmt.CompatLazyRefcounts != 0
	if opts.LazyRefcounts != nil {
		p.lazy = *opts.LazyRefcounts
	}
	if p.lazy && h.Version < 3 {
		return p, errors.New("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
	}
	p.overlap = opts.OverlapCheck.flags()
	p.passRequest = o.Common().Discard == "unmap"
	if opts.PassDiscardRequest != nil {
		p.passRequest = *opts.PassDiscardRequest
	}
	if opts.PassDiscardOther != nil {
		p.passOther = *opts.PassDiscardOther
	}
	p.passSnap = true
	if opts.PassDiscardSnap != nil {
		p.passSnap = *opts.PassDiscardSnap
	}
	return p, nil
}

// openEncryption checks the encrypt options against the header's crypt
// method and sets up LUKS encryption in p.
func (n *node) openEncryption(ctx context.Context, o *graph.Opener, opts *Options, file *graph.Child, h *qcow2fmt.Header, p *imageParams) error {
	var encFmt string
	if opts.Encrypt != nil {
		encFmt = string(opts.Encrypt.Format)
	}
	switch h.CryptMethod {
	case qcow2fmt.CryptNone:
		if encFmt != "" {
			return fmt.Errorf("No encryption in image header, but options specified format '%s'", encFmt)
		}
	case qcow2fmt.CryptAES:
		if encFmt != "" && encFmt != "aes" {
			return fmt.Errorf("Header reported 'aes' encryption format but options specify '%s'", encFmt)
		}
		return errors.New("qcow2: images with the legacy AES encryption (crypt_method 1) are not supported; convert them with qemu-img, e.g. to a LUKS-encrypted qcow2")
	case qcow2fmt.CryptLUKS:
		if encFmt != "" && encFmt != "luks" {
			return fmt.Errorf("Header reported 'luks' encryption format but options specify '%s'", encFmt)
		}
		return n.unlockLUKS(ctx, o, opts, file, h, p)
	}
	return nil
}

// unlockLUKS unlocks the volume key with encrypt.key-secret into p or,
// for a read-only metadata-only open without a key, reads the LUKS header
// alone and makes the node refuse I/O.
func (n *node) unlockLUKS(ctx context.Context, o *graph.Opener, opts *Options, file *graph.Child, h *qcow2fmt.Header, p *imageParams) error {
	noKey := opts.Encrypt == nil || opts.Encrypt.KeySecret == nil
	if noKey && p.ro && o.Graph().MetadataOnly {
		hdr, err := luksfmt.Open(cryptoRegion(ctx, file, h), int64(h.Crypto.Length))
		if err != nil {
			return qcrypto.GraphError(err)
		}
		p.luks, n.noIO = hdr, errNoKey
		return nil
	}
	if noKey {
		return errors.New("Parameter 'encrypt.key-secret' is required for cipher")
	}
	n.keySecret = *opts.Encrypt.KeySecret
	pass, err := o.Secret(n.keySecret)
	if err != nil {
		return err
	}
	n.kdfLimits = luksfmt.KDFLimits(o.Graph().KDFLimits)
	c, info, err := openLUKS(ctx, file, h, pass, n.kdfLimits)
	if err != nil {
		return err
	}
	p.cipher, p.luks = c, info
	return nil
}

// openDataFile returns the child that holds guest data: file itself, the
// external data file (from data-file or the name in the header), or nil
// when a metadata-only open leaves the data file closed.
func (n *node) openDataFile(ctx context.Context, o *graph.Opener, opts *Options, file *graph.Child, h *qcow2fmt.Header, ro bool) (*graph.Child, error) {
	if opts.DataFile != nil && !h.HasDataFile() {
		return nil, errors.New("'data-file' can only be set for images with an external data file")
	}
	if !h.HasDataFile() {
		if h.DataFileRaw() {
			return nil, errors.New("data-file-raw requires a data file")
		}
		return file, nil
	}
	n.dataName = h.DataFile
	ref := opts.DataFile
	switch {
	case ref == nil && ro && o.Graph().MetadataOnly:
		// Metadata only: the data file named in the header is not
		// opened (QEMU's BDRV_O_NO_IO), and the node refuses I/O.
		n.noIO = errNoDataFile
		return nil, nil
	case ref == nil && h.HasDataFileName:
		name, err := resolveDataFile(file, h.DataFile)
		if err == nil {
			ref, err = fileRef(o.Graph(), name, false)
		}
		if err != nil {
			return nil, err
		}
	case ref == nil:
		return nil, errors.New("'data-file' is required for this image")
	}
	return o.Child(ctx, "data-file", ref, graph.ChildSpec{Role: graph.RoleData})
}

func (n *node) closeQuiet() {
	if n.cipher != nil {
		n.cipher.Wipe()
	}
}

// Size returns the virtual size.
func (n *node) Size() int64 { return n.size.Load() }

// Limits: encrypted images work in 512-byte sectors.
func (n *node) Limits() graph.Limits {
	l := graph.Limits{Align: 1}
	if n.cipher != nil {
		l.Align = 512
	}
	if fl := n.data.Limits(); fl.Align > l.Align {
		l.Align = fl.Align
		l.MemAlign = fl.MemAlign
	}
	return l
}

func (n *node) check() error {
	if n.broken.Load() {
		return errBroken
	}
	if n.noIO != nil {
		return n.noIO
	}
	return nil
}

// errNoKey is the answer to I/O on an encrypted image opened without its
// key (metadata only).
var errNoKey = fmt.Errorf("qcow2: the image was opened for its metadata only, without its encryption key: %w", graph.ErrNotSupported)

// errNoDataFile is the answer to I/O on an image with an external data
// file opened for its metadata only: the data file is not opened.
var errNoDataFile = fmt.Errorf("qcow2: the image was opened for its metadata only, without its external data file: %w", graph.ErrNotSupported)

// ReadAt implements graph.Node.
func (n *node) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := n.check(); err != nil {
		return err
	}
	st := n.lockStripes(off, int64(len(p)), false)
	defer n.unlockStripes(st)
	return n.read(ctx, p, off)
}

// WriteAt implements graph.Node.
func (n *node) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.ro.Load() {
		return graph.ErrReadOnly
	}
	st := n.lockStripes(off, int64(len(p)), true)
	err := n.write(ctx, p, off)
	n.unlockStripes(st)
	if err == nil && f&graph.FUA != 0 {
		err = n.flush(ctx)
	}
	return err
}

// WriteZeroes implements graph.Zeroer (version 3 images; version 2 has no
// zero clusters and the graph writes zero buffers).
func (n *node) WriteZeroes(ctx context.Context, off, l int64, f graph.ReqFlags) error {
	if err := n.check(); err != nil {
		return err
	}
	if n.version < 3 && !n.dataFileRaw {
		return graph.ErrNotSupported
	}
	st := n.lockStripes(off, l, true)
	err := n.zeroes(ctx, off, l, f)
	n.unlockStripes(st)
	if err == nil && f&graph.FUA != 0 {
		err = n.flush(ctx)
	}
	return err
}

// Discard implements graph.Discarder.
func (n *node) Discard(ctx context.Context, off, l int64) error {
	if err := n.check(); err != nil {
		return err
	}
	st := n.lockStripes(off, l, true)
	defer n.unlockStripes(st)
	return n.discard(ctx, off, l)
}

// BlockStatus implements graph.BlockStatuser.
func (n *node) BlockStatus(ctx context.Context, off, l int64) ([]graph.Extent, error) {
	if err := n.check(); err != nil {
		return nil, err
	}
	st := n.lockStripes(off, min(l, 64<<20), false)
	defer n.unlockStripes(st)
	return n.blockStatus(ctx, off, min(l, 64<<20))
}

// Flush implements graph.Node.
func (n *node) Flush(ctx context.Context) error {
	if n.noIO != nil {
		return nil // read-only, nothing to write
	}
	if err := n.check(); err != nil {
		return err
	}
	return n.flush(ctx)
}

// TruncatePrealloc implements graph.PreallocResizer (block_resize).
func (n *node) TruncatePrealloc(ctx context.Context, size int64, mode graph.Prealloc) error {
	if err := n.check(); err != nil {
		return err
	}
	return n.truncate(ctx, size, mode)
}

// Close implements graph.Node.
func (n *node) Close() error {
	err := n.image.close(context.Background())
	n.closeQuiet()
	n.l2.drop()
	return err
}

// StrongOptions reports the options the contents depend on, which QEMU
// shows in json: filenames: encrypt.key-secret, and backing: null when
// the image's backing file is not used (opened with backing: null, or
// detached since by blockdev-reopen: no backing child while the header
// names a backing file, as bdrv_refresh_filename sees it).
func (n *node) StrongOptions() qapi.Object {
	n.metaMu.Lock()
	detached := n.backing == nil && n.h.BackingFile != ""
	n.metaMu.Unlock()
	var o qapi.Object
	if n.noBacking || detached {
		o = append(o, qapi.Member{Name: "backing", Value: nil})
	}
	if n.keySecret != "" {
		o = append(o, qapi.Member{Name: "encrypt.key-secret", Value: n.keySecret})
	}
	return o
}
