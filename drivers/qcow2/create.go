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

// validateClusterSize checks a cluster size as QEMU's validate_cluster_size.
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
	s, err := checkCreateOptions(o)
	if err != nil {
		return err
	}
	fo, pass, err := createEncryption(cc, o.Encrypt)
	if err != nil {
		return err
	}
	defer luksfmt.Wipe(pass)
	file, data, err := openCreateChildren(cc, o)
	if err != nil {
		return err
	}
	if err := s.writeInitialMetadata(ctx, file, data != nil); err != nil {
		return err
	}
	// Open it and make it consistent, then grow it. QEMU opens a
	// temporary node here and another at the end, each taking an
	// automatic node name; later names count on from there.
	m, err := openNewImage(ctx, cc, file, data)
	if err != nil {
		return err
	}
	defer m.closeQuiet()
	if err := m.claimInitialClusters(ctx, data); err != nil {
		return err
	}
	// Growing to the virtual size preallocates as asked.
	if err := m.truncate(ctx, int64(s.size), s.prealloc); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	if o.BackingFile != nil {
		if err := m.writeBackingFile(ctx, *o.BackingFile, o.BackingFmt); err != nil {
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

// createSpec is what Create takes from its options once they are checked.
type createSpec struct {
	size         uint64
	version      uint32
	cs           uint64 // cluster size
	extL2        bool
	prealloc     graph.Prealloc
	lazy         bool
	refcountBits int64
	raw          bool // data-file-raw
	compression  uint8
}

// checkCreateOptions checks o in qcow2_co_create's order and resolves its
// defaults.
func checkCreateOptions(o *CreateOptions) (*createSpec, error) {
	s := new(createSpec)
	for _, check := range []func(*CreateOptions) error{
		s.checkLayout, s.checkPrealloc, s.checkRefcounts, s.checkDataFile, s.checkCompression,
	} {
		if err := check(o); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// checkLayout resolves the virtual size, version, cluster size and
// extended L2 entries.
func (s *createSpec) checkLayout(o *CreateOptions) error {
	s.size = uint64(o.Size)
	if s.size%512 != 0 {
		return fmt.Errorf("Image size must be a multiple of %d bytes", 512)
	}
	s.version = 3
	if o.Version != nil && *o.Version == "v2" {
		s.version = 2
	}
	s.cs = 65536
	if o.ClusterSize != nil {
		s.cs = uint64(*o.ClusterSize)
	}
	s.extL2 = o.ExtendedL2 != nil && *o.ExtendedL2
	if s.extL2 && s.version < 3 {
		return errors.New("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	return validateClusterSize(s.cs, s.extL2)
}

// checkPrealloc resolves the preallocation mode and checks it and the
// backing format against the backing file.
func (s *createSpec) checkPrealloc(o *CreateOptions) error {
	s.prealloc = graph.PreallocOff
	if o.Preallocation != nil {
		s.prealloc = graph.Prealloc(*o.Preallocation)
	}
	if o.BackingFile != nil && s.prealloc != graph.PreallocOff && !s.extL2 {
		return errors.New("Backing file and preallocation can only be used at the same time if extended_l2 is on")
	}
	if o.BackingFmt != nil && o.BackingFile == nil {
		return errors.New("Backing format cannot be used without backing file")
	}
	return nil
}

// checkRefcounts resolves lazy refcounts and the refcount width.
func (s *createSpec) checkRefcounts(o *CreateOptions) error {
	s.lazy = o.LazyRefcounts != nil && *o.LazyRefcounts
	if s.version < 3 && s.lazy {
		return errors.New("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	rb := int64(16)
	if o.RefcountBits != nil {
		rb = *o.RefcountBits
	}
	if rb > 64 || rb <= 0 || rb&(rb-1) != 0 {
		return errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if s.version < 3 && rb != 16 {
		return errors.New("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
	}
	s.refcountBits = rb
	return nil
}

// checkDataFile checks the external data file options; a raw data file
// implies metadata preallocation.
func (s *createSpec) checkDataFile(o *CreateOptions) error {
	s.raw = o.DataFileRaw != nil && *o.DataFileRaw
	if s.raw && o.DataFile == nil {
		return errors.New("data-file-raw requires data-file")
	}
	if s.raw && o.BackingFile != nil {
		return errors.New("Backing file and data-file-raw cannot be used at the same time")
	}
	if s.raw && s.prealloc == graph.PreallocOff {
		s.prealloc = graph.PreallocMetadata
	}
	if o.DataFile != nil && s.version < 3 {
		return errors.New("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
	}
	return nil
}

// checkCompression resolves the compression type.
func (s *createSpec) checkCompression(o *CreateOptions) error {
	s.compression = qcow2fmt.CompressionZlib
	if o.CompressionType != nil && *o.CompressionType != "zlib" {
		if s.version < 3 {
			return errors.New("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		}
		s.compression = qcow2fmt.CompressionZstd
	}
	return nil
}

// createEncryption checks the encrypt options (LUKS1 only) and reads the
// passphrase, which the caller wipes.
func createEncryption(cc *graph.CreateContext, e *EncryptCreate) (luksfmt.CreateOptions, []byte, error) {
	var fo luksfmt.CreateOptions
	if e == nil {
		return fo, nil, nil
	}
	if e.Format == "qcow" {
		return fo, nil, errors.New("qcow2: creating images with the legacy AES encryption is not supported; use encrypt.format=luks")
	}
	fo, err := e.LUKS.FormatOptions()
	if err != nil {
		return fo, nil, err
	}
	if fo.Version == 2 || (fo.SectorSize != 0 && fo.SectorSize != 512) {
		return fo, nil, errors.New("qcow2: native encryption supports LUKS1 with 512-byte sectors only (as QEMU)")
	}
	if e.LUKS.KeySecret == nil {
		return fo, nil, errors.New("Parameter 'encrypt.key-secret' is required for cipher")
	}
	pass, err := cc.Secret(*e.LUKS.KeySecret)
	if err != nil {
		return fo, nil, err
	}
	return fo, pass, nil
}

// openCreateChildren opens the file to format and the data file, if any.
func openCreateChildren(cc *graph.CreateContext, o *CreateOptions) (file, data *graph.Child, err error) {
	if file, err = cc.Open(&o.File, "file"); err != nil {
		return nil, nil, err
	}
	if o.DataFile != nil {
		if data, err = cc.Open(o.DataFile, "data-file"); err != nil {
			return nil, nil, err
		}
	}
	return file, data, nil
}

// initialHeader is a minimal header whose refcount table, in cluster 1,
// has one empty block.
func (s *createSpec) initialHeader(hasData bool) *qcow2fmt.Header {
	h := &qcow2fmt.Header{
		Version:               s.version,
		ClusterBits:           uint32(bits.TrailingZeros64(s.cs)),
		RefcountTableOffset:   s.cs,
		RefcountTableClusters: 1,
		RefcountOrder:         uint32(bits.TrailingZeros64(uint64(s.refcountBits))),
		CompressionType:       s.compression,
	}
	if s.lazy {
		h.CompatibleFeatures |= qcow2fmt.CompatLazyRefcounts
	}
	if hasData {
		h.IncompatibleFeatures |= qcow2fmt.IncompatDataFile
	}
	if s.raw {
		h.AutoclearFeatures |= qcow2fmt.AutoclearDataFileRaw
	}
	if s.compression != qcow2fmt.CompressionZlib {
		h.IncompatibleFeatures |= qcow2fmt.IncompatCompression
	}
	if s.extL2 {
		h.IncompatibleFeatures |= qcow2fmt.IncompatExtL2
	}
	return h
}

// writeInitialMetadata writes the initial header into cluster 0 and the
// refcount table and its block into clusters 1 and 2.
func (s *createSpec) writeInitialMetadata(ctx context.Context, file *graph.Child, hasData bool) error {
	h := s.initialHeader(hasData)
	first, err := h.Marshal(false)
	if err != nil {
		return err
	}
	// QEMU's first header is just the fixed part, without extensions.
	clear(first[h.HeaderLength:])
	if s.version >= 3 {
		binary.BigEndian.PutUint32(first[100:], qcow2fmt.HeaderLen)
	}
	cs := s.cs
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
	return nil
}

// openNewImage opens the image just written, as QEMU's temporary node
// (which takes an automatic node name), with small caches and no repair.
func openNewImage(ctx context.Context, cc *graph.CreateContext, file, data *graph.Child) (*image, error) {
	cc.Graph().SkipAutoNames(1)
	h, err := qcow2fmt.ParseWith(graph.NewSectionIO(ctx, file, 0, -1), file.Size(), qcow2fmt.ParseOptions{})
	if err != nil {
		return nil, err
	}
	return newImage(ctx, h, imageParams{file: file, data: data, l2Tables: 16, rcBlocks: 4, lazy: false, overlap: olCached, noRepair: true})
}

// claimInitialClusters counts the header and refcount clusters in the
// refcounts and names the data file, if any, in the header.
func (m *image) claimInitialClusters(ctx context.Context, data *graph.Child) error {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	off, err := m.allocClusters(ctx, 3)
	if err == nil && off != 0 {
		err = errors.New("qcow2: the first cluster of a new image is in use")
	}
	if err == nil && data != nil {
		m.h.DataFile = data.BDS().Filename()
		m.h.HasDataFileName = true
	}
	if err == nil {
		err = m.writeHeader(ctx)
	}
	if err != nil {
		return fmt.Errorf("Could not update qcow2 header: %w", err)
	}
	return nil
}

// writeBackingFile records the backing file name and format in the header.
func (m *image) writeBackingFile(ctx context.Context, name string, format *BlockdevDriver) error {
	if len(name) > qcow2fmt.MaxBackingFileName {
		return fmt.Errorf("Could not assign backing file '%s': File name too long", name)
	}
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	m.h.BackingFile = name
	if format != nil {
		m.h.BackingFormat = string(*format)
	}
	return m.writeHeader(ctx)
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
