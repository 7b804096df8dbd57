package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
	"blockd/internal/qapi"
)

// Version is BlockdevQcow2Version.
type Version string

// EnumValues implements qapi.Enum.
func (Version) EnumValues() []string { return []string{"v2", "v3"} }

// CompressionType is Qcow2CompressionType.
type CompressionType string

// EnumValues implements qapi.Enum.
func (CompressionType) EnumValues() []string { return []string{"zlib", "zstd"} }

// PreallocMode is PreallocMode.
type PreallocMode string

// EnumValues implements qapi.Enum.
func (PreallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// BlockdevDriver is QEMU 7.2's BlockdevDriver enum (backing-fmt).
type BlockdevDriver string

// EnumValues implements qapi.Enum.
func (BlockdevDriver) EnumValues() []string {
	return []string{"blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
		"copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster",
		"host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co",
		"nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "ssh",
		"throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"}
}

// CryptoFormat is QCryptoBlockFormat.
type CryptoFormat string

// EnumValues implements qapi.Enum.
func (CryptoFormat) EnumValues() []string { return []string{"qcow", "luks"} }

// EncryptCreate is QCryptoBlockCreateOptions: format qcow (legacy AES,
// key-secret only) or luks with the LUKS fields.
type EncryptCreate struct {
	Format CryptoFormat
	LUKS   qcrypto.CreateFields
}

// UnmarshalQAPI implements qapi.Unmarshaler (a flat union on format).
func (e *EncryptCreate) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	obj, ok := v.(map[string]any)
	if !ok {
		return &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: object", path)}
	}
	var base struct {
		Format CryptoFormat `json:"format"`
	}
	fv, ok := obj["format"]
	if !ok {
		return &qapi.Error{Msg: fmt.Sprintf("Parameter '%s.format' is missing", path)}
	}
	if err := d.DecodeValue(fv, path+".format", &base.Format); err != nil {
		return err
	}
	e.Format = base.Format
	if base.Format == "qcow" {
		var q struct {
			Format    CryptoFormat `json:"format"`
			KeySecret *string      `json:"key-secret,omitempty"`
		}
		return d.DecodeValue(v, path, &q)
	}
	var l struct {
		Format CryptoFormat `json:"format"`
		qcrypto.CreateFields
	}
	if err := d.DecodeValue(v, path, &l); err != nil {
		return err
	}
	e.LUKS = l.CreateFields
	return nil
}

// CreateOptions is BlockdevCreateOptionsQcow2.
type CreateOptions struct {
	File            graph.Ref        `json:"file"`
	DataFile        *graph.Ref       `json:"data-file,omitempty"`
	DataFileRaw     *bool            `json:"data-file-raw,omitempty"`
	ExtendedL2      *bool            `json:"extended-l2,omitempty"`
	Size            qapi.Size        `json:"size"`
	Version         *Version         `json:"version,omitempty"`
	BackingFile     *string          `json:"backing-file,omitempty"`
	BackingFmt      *BlockdevDriver  `json:"backing-fmt,omitempty"`
	Encrypt         *EncryptCreate   `json:"encrypt,omitempty"`
	ClusterSize     *qapi.Size       `json:"cluster-size,omitempty"`
	Preallocation   *PreallocMode    `json:"preallocation,omitempty"`
	LazyRefcounts   *bool            `json:"lazy-refcounts,omitempty"`
	RefcountBits    *int64           `json:"refcount-bits,omitempty"`
	CompressionType *CompressionType `json:"compression-type,omitempty"`
}

func validateClusterSize(cs uint64, extL2 bool) error {
	if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
		return fmt.Errorf("Cluster size must be a power of two between %d and %dk", 512, 2048)
	}
	if extL2 && cs < 512*qcow2fmt.SubclustersPerClust {
		return fmt.Errorf("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 512*qcow2fmt.SubclustersPerClust)
	}
	return nil
}

func create(ctx context.Context, cc *graph.CreateContext, v any) error {
	o := v.(*CreateOptions)
	return Create(ctx, cc, o)
}

// Create formats the file node o.File as a qcow2 image the way QEMU's
// qcow2_co_create does, so that the result has the same layout as
// qemu-img's: header in cluster 0, refcount table and block in clusters 1
// and 2, the L1 table next, then the encryption header.
func Create(ctx context.Context, cc *graph.CreateContext, o *CreateOptions) error {
	size := uint64(o.Size)
	if size%512 != 0 {
		return fmt.Errorf("Image size must be a multiple of %d bytes", 512)
	}
	version := uint32(3)
	if o.Version != nil && *o.Version == "v2" {
		version = 2
	}
	cs := uint64(65536)
	if o.ClusterSize != nil {
		cs = uint64(*o.ClusterSize)
	}
	extL2 := o.ExtendedL2 != nil && *o.ExtendedL2
	if extL2 && version < 3 {
		return errors.New("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	if err := validateClusterSize(cs, extL2); err != nil {
		return err
	}
	prealloc := graph.PreallocOff
	if o.Preallocation != nil {
		prealloc = graph.Prealloc(*o.Preallocation)
	}
	if o.BackingFile != nil && prealloc != graph.PreallocOff && !extL2 {
		return errors.New("Backing file and preallocation can only be used at the same time if extended_l2 is on")
	}
	if o.BackingFmt != nil && o.BackingFile == nil {
		return errors.New("Backing format cannot be used without backing file")
	}
	lazy := o.LazyRefcounts != nil && *o.LazyRefcounts
	if version < 3 && lazy {
		return errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	rb := int64(16)
	if o.RefcountBits != nil {
		rb = *o.RefcountBits
	}
	if rb > 64 || rb <= 0 || rb&(rb-1) != 0 {
		return errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if version < 3 && rb != 16 {
		return errors.New("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
	}
	raw := o.DataFileRaw != nil && *o.DataFileRaw
	if raw && o.DataFile == nil {
		return errors.New("data-file-raw requires data-file")
	}
	if raw && o.BackingFile != nil {
		return errors.New("Backing file and data-file-raw cannot be used at the same time")
	}
	if raw && prealloc == graph.PreallocOff {
		prealloc = graph.PreallocMetadata
	}
	if o.DataFile != nil && version < 3 {
		return errors.New("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	compression := uint8(qcow2fmt.CompressionZlib)
	if o.CompressionType != nil && *o.CompressionType != "zlib" {
		if version < 3 {
			return errors.New("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		}
		compression = qcow2fmt.CompressionZstd
	}
	var fo luksfmt.CreateOptions
	var pass []byte
	if o.Encrypt != nil {
		if o.Encrypt.Format == "qcow" {
			return errors.New("qcow2: creating images with the legacy AES encryption is not supported; use encrypt.format=luks")
		}
		var err error
		if fo, err = o.Encrypt.LUKS.FormatOptions(); err != nil {
			return err
		}
		if fo.Version == 2 || (fo.SectorSize != 0 && fo.SectorSize != 512) {
			return errors.New("qcow2: native encryption supports LUKS1 with 512-byte sectors only (as QEMU)")
		}
		if o.Encrypt.LUKS.KeySecret == nil {
			return errors.New("Parameter 'encrypt.key-secret' is required for cipher")
		}
		if pass, err = cc.Secret(*o.Encrypt.LUKS.KeySecret); err != nil {
			return err
		}
		defer luksfmt.Wipe(pass)
	}
	file, err := cc.Open(&o.File, "file")
	if err != nil {
		return err
	}
	var data *graph.Child
	if o.DataFile != nil {
		if data, err = cc.Open(o.DataFile, "data-file"); err != nil {
			return err
		}
	}
	// A minimal header and a refcount table with one empty block.
	h := &qcow2fmt.Header{
		Version:               version,
		ClusterBits:           uint32(bits.TrailingZeros64(cs)),
		RefcountTableOffset:   cs,
		RefcountTableClusters: 1,
		RefcountOrder:         uint32(bits.TrailingZeros64(uint64(rb))),
		CompressionType:       compression,
	}
	if lazy {
		h.CompatibleFeatures |= qcow2fmt.CompatLazyRefcounts
	}
	if data != nil {
		h.IncompatibleFeatures |= qcow2fmt.IncompatDataFile
	}
	if raw {
		h.AutoclearFeatures |= qcow2fmt.AutoclearDataFileRaw
	}
	if compression != qcow2fmt.CompressionZlib {
		h.IncompatibleFeatures |= qcow2fmt.IncompatCompression
	}
	if extL2 {
		h.IncompatibleFeatures |= qcow2fmt.IncompatExtL2
	}
	first, err := h.Marshal(false)
	if err != nil {
		return err
	}
	// QEMU's first header is just the fixed part, without extensions.
	clear(first[h.HeaderLength:])
	if version >= 3 {
		binary.BigEndian.PutUint32(first[100:], qcow2fmt.HeaderLen)
	}
	tables := make([]byte, 2*cs)
	binary.BigEndian.PutUint64(tables, 2*cs)
	if file.Size() < int64(3*cs) {
		if err := file.Truncate(ctx, int64(3*cs), graph.PreallocOff); err != nil {
			return err
		}
	}
	if err := file.WriteAt(ctx, first, 0, 0); err != nil {
		return fmt.Errorf("Could not write qcow2 header: %w", err)
	}
	if err := file.WriteAt(ctx, tables, int64(cs), 0); err != nil {
		return fmt.Errorf("Could not write refcount table: %w", err)
	}
	// Open it and make it consistent, then grow it. QEMU opens a
	// temporary node here and another at the end, each taking an
	// automatic node name; later names count on from there.
	cc.Graph().SkipAutoNames(1)
	h, err = qcow2fmt.ParseWith(graph.NewSectionIO(ctx, file, 0, -1), file.Size(), qcow2fmt.ParseOptions{})
	if err != nil {
		return err
	}
	m, err := newImage(ctx, h, imageParams{file: file, data: data, l2Tables: 16, rcBlocks: 4, lazy: false, overlap: olCached, noRepair: true})
	if err != nil {
		return err
	}
	defer m.closeQuiet()
	m.metaMu.Lock()
	off, err := m.allocClusters(ctx, 3)
	if err == nil && off != 0 {
		err = fmt.Errorf("qcow2: the first cluster of a new image is in use")
	}
	if err == nil && data != nil {
		m.h.DataFile = data.BDS().Filename()
		m.h.HasDataFileName = true
	}
	if err == nil {
		err = m.writeHeader(ctx)
	}
	m.metaMu.Unlock()
	if err != nil {
		return fmt.Errorf("Could not update qcow2 header: %w", err)
	}
	if err := m.truncate(ctx, int64(size), prealloc); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	if o.BackingFile != nil {
		if len(*o.BackingFile) > qcow2fmt.MaxBackingFileName {
			return fmt.Errorf("Could not assign backing file '%s': File name too long", *o.BackingFile)
		}
		m.metaMu.Lock()
		m.h.BackingFile = *o.BackingFile
		if o.BackingFmt != nil {
			m.h.BackingFormat = string(*o.BackingFmt)
		}
		err := m.writeHeader(ctx)
		m.metaMu.Unlock()
		if err != nil {
			return err
		}
	}
	if o.Encrypt != nil {
		if err := m.setUpEncryption(ctx, fo, pass); err != nil {
			return err
		}
	}
	cc.Graph().SkipAutoNames(1)
	return m.close(ctx)
}

// memWA is an in-memory io.WriterAt and io.ReaderAt.
type memWA struct{ b []byte }

func (w *memWA) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(w.b)) {
		w.b = append(w.b, make([]byte, end-int64(len(w.b)))...)
	}
	copy(w.b[off:], p)
	return len(p), nil
}

func (w *memWA) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(w.b)) {
		return 0, errors.New("read past the end")
	}
	n := copy(p, w.b[off:])
	if n < len(p) {
		return n, errors.New("read past the end")
	}
	return n, nil
}

// setUpEncryption writes a LUKS header into newly allocated clusters and
// records it in the header (QEMU's qcow2_set_up_encryption).
func (m *image) setUpEncryption(ctx context.Context, fo luksfmt.CreateOptions, pass []byte) error {
	fo.Passphrase = pass
	var buf memWA
	hdr, key, err := luksfmt.Create(&buf, fo)
	if err != nil {
		return qcrypto.GraphError(err)
	}
	luksfmt.Wipe(key)
	length := hdr.PayloadOffset()
	if length < int64(len(buf.b)) {
		length = int64(len(buf.b))
	}
	cs := m.cs()
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	off, err := m.allocClusters(ctx, (length+cs-1)/cs)
	if err != nil {
		return fmt.Errorf("Cannot allocate cluster for LUKS header size %d: %w", length, err)
	}
	area := make([]byte, (length+cs-1)/cs*cs)
	copy(area, buf.b)
	luksfmt.Wipe(buf.b)
	if err := m.writeMeta(ctx, area, off); err != nil {
		return fmt.Errorf("Could not write encryption header: %w", err)
	}
	m.h.CryptMethod = qcow2fmt.CryptLUKS
	m.h.Crypto = &qcow2fmt.CryptoHeader{Offset: uint64(off), Length: uint64(length)}
	if err := m.writeHeader(ctx); err != nil {
		return fmt.Errorf("Could not write encryption header: %w", err)
	}
	return nil
}
