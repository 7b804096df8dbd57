// Package luks is the luks block driver: a LUKS1 or LUKS2 volume whose
// metadata lives on the "file" child (embedded header) or on a separate
// "header" child (detached header, possibly shared by several luks nodes),
// with the ciphertext in "file" from the header's payload offset. The
// on-disk format is in the luksfmt sub-package; this file is the graph
// glue and the data path.
package luks

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
	"blockd/internal/blockcrypto"
	"blockd/internal/qapi"
)

// Options is BlockdevOptionsLUKS (QEMU 9.0, with header).
type Options struct {
	File      graph.Ref  `json:"file"`
	KeySecret *string    `json:"key-secret,omitempty"`
	Header    *graph.Ref `json:"header,omitempty"`
}

// Driver returns the luks driver.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:          "luks",
		Options:       func() any { return new(Options) },
		Open:          open,
		CreateOptions: func() any { return new(CreateOptions) },
		Create:        create,
		AmendOptions:  func() any { return new(AmendOptions) },
	}
}

// AmendOptions are the luks driver's x-blockdev-amend options.
type AmendOptions = qcrypto.AmendOptions

type node struct {
	file, header *graph.Child
	fileSpec     graph.ChildSpec // how the file edge is used outside keyslot updates
	hdr          *luksfmt.Header
	kdfLimits    luksfmt.KDFLimits // the graph's, for amending keyslots
	cipher       *blockcrypto.Cipher
	offset       int64 // payload offset in file
	fixedSize    int64 // LUKS2 segment size, -1 when dynamic
	sectorSize   int64
	ivTweak      uint64
	keySecret    string
	detached     bool
	g            *graph.Graph
	name         string
	readOnly     bool
	amendMu      sync.Mutex // serialises keyslot updates

	pool sync.Pool // *[]byte ciphertext buffers of bufSize
}

// The optional capabilities of graph/node.go. Left out on purpose: Zeroer (zeroes must be stored as ciphertext, so the graph writes encrypted zero buffers), Discarder (discarded ciphertext would read back as garbage, not zeroes), BlockStatuser (it cannot tell zeroes from ciphertext), Cacher and PermSetter (left to the file node), Resizer (PreallocResizer covers it), ExplicitBackinger (no backing file).
var (
	_ graph.Limiter         = (*node)(nil)
	_ graph.PreallocResizer = (*node)(nil)
	_ graph.Infoer          = (*node)(nil)
	_ graph.StrongOptioner  = (*node)(nil)
	_ graph.Amender         = (*node)(nil)
)

// bufSize is the largest piece of a request encrypted at once; larger
// writes are processed in pieces of this size.
const bufSize = 1 << 20

func open(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
	opts := v.(*Options)
	n := &node{g: o.Graph(), readOnly: o.ReadOnly()}
	fileRole := graph.RoleData | graph.RoleMetadata | graph.RolePrimary
	if opts.Header != nil {
		fileRole = graph.RoleData | graph.RolePrimary
	}
	// QEMU's block_crypto_child_perms: the file takes write and resize
	// only when the luks node's users do, and shares what they share.
	n.fileSpec = graph.ChildSpec{Role: fileRole, OnlyWhenNeeded: true, ShareAsParent: true}
	file, err := o.Child(ctx, "file", &opts.File, n.fileSpec)
	n.name = o.NodeName()
	if err != nil {
		return nil, err
	}
	n.file = file
	meta := file
	if opts.Header != nil {
		hc, err := o.Child(ctx, "header", opts.Header, graph.ChildSpec{Role: graph.RoleMetadata, ReadOnly: true})
		if err != nil {
			return nil, err
		}
		n.header, meta = hc, hc
		n.detached = true
	}
	if opts.KeySecret == nil {
		return nil, errors.New("Parameter 'key-secret' is required for cipher")
	}
	n.keySecret = *opts.KeySecret
	hdr, err := luksfmt.Open(graph.NewSectionIO(ctx, meta, 0, -1), meta.Size())
	if err != nil {
		return nil, fmt.Errorf("luks: %w", qcrypto.GraphError(err))
	}
	// A LUKS2 header with one damaged copy opens from the valid one; the
	// next metadata update (x-blockdev-amend) rewrites both.
	n.hdr = hdr
	// The passphrase copy (from the secret store) and the volume key
	// (from luksfmt) are internal/keymem memory; luksfmt.Wipe wipes and
	// unmaps them as soon as they are used. The cipher keeps its own copy,
	// which Close wipes.
	pass, err := o.Secret(n.keySecret)
	if err != nil {
		return nil, err
	}
	// The derivation is bounded by the graph's KDF limits and stops when
	// ctx is done (the daemon shutting down, the QMP client gone).
	n.kdfLimits = luksfmt.KDFLimits(o.Graph().KDFLimits)
	key, _, err := hdr.Unlock(ctx, pass, luksfmt.AnySlot, n.kdfLimits)
	luksfmt.Wipe(pass)
	if err != nil {
		return nil, qcrypto.GraphError(err)
	}
	n.cipher, err = blockcrypto.New(hdr.CipherSpec(), key)
	luksfmt.Wipe(key)
	if err != nil {
		return nil, fmt.Errorf("luks: %w", err)
	}
	n.offset = hdr.PayloadOffset()
	n.sectorSize = int64(hdr.SectorSize())
	n.ivTweak = hdr.IVTweak()
	n.fixedSize = -1
	if sz, dyn := hdr.PayloadSize(); !dyn {
		n.fixedSize = sz
	}
	if !n.detached && n.offset < hdr.HeaderSize() && n.offset != 0 {
		n.cipher.Wipe()
		return nil, fmt.Errorf("LUKS payload is overlapping with the header")
	}
	if n.offset > file.Size() {
		n.cipher.Wipe()
		return nil, fmt.Errorf("luks: payload offset %d is beyond the end of the data device (%d bytes)", n.offset, file.Size())
	}
	n.pool.New = func() any { b := make([]byte, bufSize); return &b }
	return n, nil
}

func (n *node) Size() int64 {
	if n.fixedSize >= 0 {
		return n.fixedSize
	}
	s := n.file.Size() - n.offset
	s -= s % n.sectorSize
	return max(s, 0)
}

func (n *node) Limits() graph.Limits {
	l := n.file.Limits()
	return graph.Limits{Align: max(n.sectorSize, l.Align), MaxTransfer: l.MaxTransfer, MemAlign: l.MemAlign}
}

// sector is the IV sector number of payload byte offset off (dm-crypt
// counts IVs in 512-byte units plus the iv_tweak).
func (n *node) sector(off int64) uint64 { return uint64(off)/512 + n.ivTweak }

func (n *node) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := n.file.ReadAt(ctx, p, off+n.offset); err != nil {
		return err
	}
	return n.decrypt(p, off)
}

// decrypt decrypts p, the payload at off, in place: one batch for the
// whole request. IVs count 512-byte units whatever the sector size, as in
// dm-crypt without iv_large_sectors (LUKS2 with 4 KiB sectors: the IV
// advances by 8 per sector).
func (n *node) decrypt(p []byte, off int64) error {
	return n.cipher.DecryptUnits(p, p, n.sector(off), int(n.sectorSize), 512)
}

// encrypt encrypts src, the payload at off, into dst.
func (n *node) encrypt(dst, src []byte, off int64) error {
	return n.cipher.EncryptUnits(dst, src, n.sector(off), int(n.sectorSize), 512)
}

func (n *node) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	bp := n.pool.Get().(*[]byte)
	defer n.pool.Put(bp)
	buf := *bp
	for len(p) > 0 {
		l := min(len(p), bufSize)
		if err := n.encrypt(buf[:l], p[:l], off); err != nil {
			return err
		}
		if err := n.file.WriteAt(ctx, buf[:l], off+n.offset, f); err != nil {
			return err
		}
		p, off = p[l:], off+int64(l)
	}
	return nil
}

func (n *node) Flush(ctx context.Context) error {
	if err := n.file.Flush(ctx); err != nil {
		return err
	}
	if n.header != nil {
		return n.header.Flush(ctx)
	}
	return nil
}

// TruncatePrealloc implements block_resize: the payload grows with the data
// device.
func (n *node) TruncatePrealloc(ctx context.Context, size int64, mode graph.Prealloc) error {
	if n.fixedSize >= 0 {
		return fmt.Errorf("luks: the LUKS2 segment has a fixed size: %w", graph.ErrNotSupported)
	}
	if size%n.sectorSize != 0 {
		return fmt.Errorf("The new size must be a multiple of the encryption sector size (%d)", n.sectorSize)
	}
	return n.file.Truncate(ctx, size+n.offset, mode)
}

// Close wipes the cipher's key material (its volume key copy and round
// keys).
func (n *node) Close() error {
	n.cipher.Wipe()
	return nil
}

func (n *node) Info() graph.ImageInfo {
	dirty := false
	return graph.ImageInfo{ActualSize: -1, Encrypted: true, DirtyFlag: &dirty, FormatSpecific: graph.ImageInfoSpecific{Type: "luks", Data: qcrypto.NodeInfo(n.hdr.Info())}}
}

// StrongOptions reports key-secret: the node's contents depend on it, so
// QEMU puts it in json: filenames.
func (n *node) StrongOptions() qapi.Object {
	return qapi.Object{{Name: "key-secret", Value: n.keySecret}}
}
