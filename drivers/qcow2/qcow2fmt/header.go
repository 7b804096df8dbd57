// Package qcow2fmt parses and writes the qcow2 on-disk format (QEMU's
// docs/interop/qcow2.rst, versions 2 and 3) through io.ReaderAt: the header
// and its extensions, L1/L2 entries (standard and extended), refcount
// tables and blocks of any width, compressed cluster descriptors, the
// snapshot table and the bitmap directory. It also computes the reference
// counts an image's metadata implies (Check), which the driver uses to
// repair dirty images and the tests use as an independent checker.
//
// Everything here validates hostile input: sizes are bounded before they
// are allocated, offsets are checked against the file, and errors say what
// is wrong. The package does no caching and holds no locks.
package qcow2fmt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Magic is "QFI\xfb".
const Magic = 0x514649fb

// Encryption methods (crypt_method).
const (
	CryptNone = 0
	CryptAES  = 1
	CryptLUKS = 2
)

// Incompatible feature bits.
const (
	IncompatDirty       = 1 << 0
	IncompatCorrupt     = 1 << 1
	IncompatDataFile    = 1 << 2
	IncompatCompression = 1 << 3
	IncompatExtL2       = 1 << 4
	// IncompatMask is every incompatible feature this package implements.
	IncompatMask = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtL2
)

// Compatible and autoclear feature bits.
const (
	CompatLazyRefcounts = 1 << 0

	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
	AutoclearMask        = AutoclearBitmaps | AutoclearDataFileRaw
)

// Compression types.
const (
	CompressionZlib = 0
	CompressionZstd = 1
)

// Header extension magics.
const (
	ExtEnd           = 0x00000000
	ExtBackingFormat = 0xe2792aca
	ExtFeatureTable  = 0x6803f857
	ExtBitmaps       = 0x23852875
	ExtCryptoHeader  = 0x0537be77
	ExtDataFile      = 0x44415441
)

// Limits QEMU enforces; images beyond them are refused.
const (
	MinClusterBits      = 9
	MaxClusterBits      = 21
	MaxL1Size           = 32 << 20 // bytes
	MaxReftableSize     = 8 << 20  // bytes
	MaxSnapshots        = 65536
	MaxSnapshotExtra    = 1024
	MaxSnapshotsSize    = 1024 * MaxSnapshots
	MaxBitmaps          = 65535
	MaxBitmapDirSize    = 1024 * MaxBitmaps
	MaxBackingFileName  = 1023
	SubclustersPerClust = 32

	// HeaderV2Len is the length of a version 2 header; HeaderV3MinLen the
	// minimum for version 3; HeaderLen what QEMU writes (with the
	// compression type byte and its padding).
	HeaderV2Len    = 72
	HeaderV3MinLen = 104
	HeaderLen      = 112
)

// ErrNotQcow2 is returned when the magic does not match.
var ErrNotQcow2 = errors.New("Image is not in qcow2 format")

// Feature is one entry of the feature name table.
type Feature struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

// Feature types.
const (
	FeatIncompatible = 0
	FeatCompatible   = 1
	FeatAutoclear    = 2
)

// DefaultFeatureTable is the table QEMU writes for clusters above 4 KiB.
var DefaultFeatureTable = []Feature{
	{FeatIncompatible, 0, "dirty bit"},
	{FeatIncompatible, 1, "corrupt bit"},
	{FeatIncompatible, 2, "external data file"},
	{FeatIncompatible, 3, "compression type"},
	{FeatIncompatible, 4, "extended L2 entries"},
	{FeatCompatible, 0, "lazy refcounts"},
	{FeatAutoclear, 0, "bitmaps"},
	{FeatAutoclear, 1, "raw external data"},
}

// CryptoHeader is the full disk encryption header pointer extension.
type CryptoHeader struct {
	Offset uint64
	Length uint64
}

// BitmapsExt is the bitmaps extension.
type BitmapsExt struct {
	NbBitmaps uint32
	Reserved  uint32
	DirSize   uint64
	DirOffset uint64
}

// Extension is a header extension this package does not interpret; it is
// kept so that rewriting the header preserves it.
type Extension struct {
	Magic uint32
	Data  []byte
}

// Header is a parsed qcow2 header with its extensions.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8
	// UnknownFields are header bytes past the fields this package knows
	// (header_length > 112), preserved on rewrite.
	UnknownFields []byte

	// BackingFile is the backing file name ("" for none).
	BackingFile string
	// BackingFormat is the backing format extension ("" when absent).
	BackingFormat string
	// FeatureTable is the feature name table extension (nil when absent).
	FeatureTable []Feature
	// DataFile is the external data file name extension; HasDataFileName
	// tells an empty name from an absent extension.
	DataFile        string
	HasDataFileName bool
	// Crypto is the full disk encryption header pointer, or nil.
	Crypto *CryptoHeader
	// Bitmaps is the bitmaps extension, or nil. BitmapsIgnored is set when
	// the extension is present but the autoclear bit says it is stale.
	Bitmaps        *BitmapsExt
	BitmapsIgnored bool
	// Unknown holds unknown extensions in file order.
	Unknown []Extension
}

// ClusterSize returns 1 << ClusterBits.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// RefcountBits returns the refcount width.
func (h *Header) RefcountBits() int { return 1 << h.RefcountOrder }

// ExtendedL2 reports the extended L2 entries feature.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtL2 != 0 }

// HasDataFile reports the external data file feature.
func (h *Header) HasDataFile() bool { return h.IncompatibleFeatures&IncompatDataFile != 0 }

// DataFileRaw reports the raw external data autoclear bit.
func (h *Header) DataFileRaw() bool { return h.AutoclearFeatures&AutoclearDataFileRaw != 0 }

// Geometry returns the derived sizes of the image.
func (h *Header) Geometry() Geometry {
	return NewGeometry(h.ClusterBits, h.ExtendedL2(), h.RefcountOrder, h.HasDataFile())
}

// Error is a format error; its message is QEMU's where QEMU has one.
type Error struct{ Msg string }

func (e *Error) Error() string { return e.Msg }

func errorf(format string, a ...any) error { return &Error{Msg: fmt.Sprintf(format, a...)} }

// UnsupportedFeatureError reports incompatible feature bits this package
// does not implement, named from the image's feature name table.
type UnsupportedFeatureError struct {
	// Mask is every unsupported bit; Names are those the table names.
	Mask    uint64
	Names   []string
	unnamed uint64
}

func (e *UnsupportedFeatureError) Error() string {
	parts := append([]string(nil), e.Names...)
	if e.unnamed != 0 {
		parts = append(parts, fmt.Sprintf("Unknown incompatible feature: %x", e.unnamed))
	}
	return "Unsupported qcow2 feature(s): " + strings.Join(parts, ", ")
}

func newUnsupported(table []Feature, mask uint64) *UnsupportedFeatureError {
	e := &UnsupportedFeatureError{Mask: mask}
	rest := mask
	for _, f := range table {
		if f.Name == "" {
			break
		}
		if f.Type == FeatIncompatible && f.Bit < 64 && rest&(1<<f.Bit) != 0 {
			n := f.Name
			if len(n) > 46 {
				n = n[:46]
			}
			e.Names = append(e.Names, n)
			rest &^= 1 << f.Bit
		}
	}
	e.unnamed = rest
	return e
}

// readAt reads exactly len(p) bytes at off.
func readAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// ParseOptions relax Parse for special opens.
type ParseOptions struct {
	// Check skips the checks that a repair tool must get past (a missing
	// refcount table, the snapshot table bounds), as QEMU's BDRV_O_CHECK.
	Check bool
	// TablesPastEnd accepts an active L1 table or a refcount table that
	// lies (partly) past the end of the file, as QEMU does (its part past
	// the end reads as zeroes): for a consistency check, which reports it,
	// and for read-only opens. Offsets are still validated for alignment
	// and overflow.
	TablesPastEnd bool
}

// Parse reads and validates the header and the header extensions of the
// image in r, whose size is fileSize bytes (-1 if unknown). It reads at
// most one cluster (2 MiB).
func Parse(r io.ReaderAt, fileSize int64) (*Header, error) {
	return ParseWith(r, fileSize, ParseOptions{})
}

// ParseWith is Parse with options.
func ParseWith(r io.ReaderAt, fileSize int64, po ParseOptions) (*Header, error) {
	var b [HeaderLen]byte
	if fileSize >= 0 && fileSize < HeaderV2Len {
		if fileSize >= 4 {
			var m [4]byte
			if err := readAt(r, m[:], 0); err == nil && binary.BigEndian.Uint32(m[:]) != Magic {
				return nil, ErrNotQcow2
			}
		}
		return nil, errorf("Could not read qcow2 header: file of %d bytes is too small", fileSize)
	}
	n, err := r.ReadAt(b[:], 0)
	if n < HeaderV2Len {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("Could not read qcow2 header: %w", err)
	}
	be := binary.BigEndian
	if be.Uint32(b[0:]) != Magic {
		return nil, ErrNotQcow2
	}
	h := &Header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
	}
	if h.Version < 2 || h.Version > 3 {
		return nil, errorf("Unsupported qcow2 version %d", h.Version)
	}
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, errorf("Unsupported cluster size: 2^%d", h.ClusterBits)
	}
	cs := uint64(1) << h.ClusterBits
	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = HeaderV2Len
	} else {
		if n < HeaderV3MinLen {
			return nil, errorf("qcow2 header too short")
		}
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
		if h.HeaderLength < HeaderV3MinLen {
			return nil, errorf("qcow2 header too short")
		}
	}
	if uint64(h.HeaderLength) > cs {
		return nil, errorf("qcow2 header exceeds cluster size")
	}
	// The first cluster holds everything else the header needs; read it
	// once (bounded by the 2 MiB cluster limit and the file size).
	first := make([]byte, cs)
	fn, ferr := r.ReadAt(first, 0)
	if fn < int(h.HeaderLength) {
		if ferr == nil || ferr == io.EOF {
			ferr = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("Could not read qcow2 header: %w", ferr)
	}
	// Bytes past the end of the file read as zeroes (QEMU's view of a
	// short first cluster).
	clear(first[fn:])
	if h.HeaderLength > HeaderV3MinLen {
		h.CompressionType = first[104]
	}
	if h.HeaderLength > HeaderLen {
		h.UnknownFields = append([]byte(nil), first[HeaderLen:h.HeaderLength]...)
	}
	if h.BackingFileOffset > cs {
		return nil, errorf("Invalid backing file offset")
	}
	extEnd := cs
	if h.BackingFileOffset != 0 {
		extEnd = h.BackingFileOffset
	}
	if err := h.validateCompression(); err != nil {
		return nil, err
	}
	if unk := h.IncompatibleFeatures &^ IncompatMask; unk != 0 {
		// Name the features from the image's own table, best effort.
		_ = h.parseExtensions(first, extEnd, true)
		return nil, newUnsupported(h.FeatureTable, unk)
	}
	g := h.Geometry()
	if g.SubclusterSize < 1<<MinClusterBits {
		return nil, errorf("Unsupported subcluster size: %d", g.SubclusterSize)
	}
	if h.RefcountOrder > 6 {
		return nil, errorf("Reference count entry width too large; may not exceed 64 bits")
	}
	if h.RefcountTableClusters == 0 && !po.Check {
		return nil, errorf("Image does not contain a reference count table")
	}
	if err := validateTable(h, h.RefcountTableOffset, uint64(h.RefcountTableClusters), cs, MaxReftableSize, "Reference count table"); err != nil {
		return nil, err
	}
	if !po.Check {
		if err := validateTable(h, h.SnapshotsOffset, uint64(h.NbSnapshots), SnapshotHeaderLen, SnapshotHeaderLen*MaxSnapshots, "Snapshot table"); err != nil {
			return nil, err
		}
	}
	if err := validateTable(h, h.L1TableOffset, uint64(h.L1Size), 8, MaxL1Size, "Active L1 table"); err != nil {
		return nil, err
	}
	need := g.L1EntriesFor(h.Size)
	if need > 1<<31-1 {
		return nil, errorf("Image is too big")
	}
	if uint64(h.L1Size) < need {
		return nil, errorf("L1 table is too small")
	}
	if fileSize >= 0 && !po.TablesPastEnd {
		if end := h.L1TableOffset + 8*uint64(h.L1Size); h.L1Size > 0 && end > uint64(fileSize) {
			return nil, errorf("Active L1 table (offset %#x, %d entries) extends beyond the end of the file (%d bytes)", h.L1TableOffset, h.L1Size, fileSize)
		}
		if end := h.RefcountTableOffset + cs*uint64(h.RefcountTableClusters); h.RefcountTableClusters > 0 && end > uint64(fileSize)+cs {
			// QEMU writes the table a cluster at a time; allow a short
			// last cluster but not a table outside the file.
			return nil, errorf("Reference count table (offset %#x, %d clusters) extends beyond the end of the file (%d bytes)", h.RefcountTableOffset, h.RefcountTableClusters, fileSize)
		}
	}
	if err := h.parseExtensions(first, extEnd, false); err != nil {
		return nil, err
	}
	if h.CryptMethod != CryptNone && h.CryptMethod != CryptAES && h.CryptMethod != CryptLUKS {
		return nil, errorf("Unsupported encryption method %d", h.CryptMethod)
	}
	if h.CryptMethod == CryptLUKS && h.Crypto == nil {
		return nil, errorf("Missing CRYPTO header for crypt method %d", h.CryptMethod)
	}
	if h.Crypto != nil && fileSize >= 0 && (h.Crypto.Offset > uint64(fileSize) || h.Crypto.Length > uint64(fileSize)-h.Crypto.Offset) {
		return nil, errorf("Encryption header (offset %#x, %d bytes) extends beyond the end of the file (%d bytes)", h.Crypto.Offset, h.Crypto.Length, fileSize)
	}
	if h.BackingFileOffset != 0 {
		l := uint64(h.BackingFileSize)
		if l > min(MaxBackingFileName, cs-h.BackingFileOffset) {
			return nil, errorf("Backing file name too long")
		}
		h.BackingFile = string(first[h.BackingFileOffset : h.BackingFileOffset+l])
	}
	return h, nil
}

func (h *Header) validateCompression() error {
	switch h.CompressionType {
	case CompressionZlib, CompressionZstd:
	default:
		return errorf("qcow2: unknown compression type: %d", h.CompressionType)
	}
	if h.CompressionType == CompressionZlib {
		if h.IncompatibleFeatures&IncompatCompression != 0 {
			return errorf("qcow2: Compression type incompatible feature bit must not be set")
		}
	} else if h.IncompatibleFeatures&IncompatCompression == 0 {
		return errorf("qcow2: Compression type incompatible feature bit must be set")
	}
	return nil
}

// validateTable is QEMU's qcow2_validate_table.
func validateTable(h *Header, offset, entries, entryLen, maxBytes uint64, name string) error {
	if entries > maxBytes/entryLen {
		return errorf("%s too large", name)
	}
	if 1<<63-1-entries*entryLen < offset || offset&(uint64(1)<<h.ClusterBits-1) != 0 {
		return errorf("%s offset invalid", name)
	}
	return nil
}

// parseExtensions walks the header extension area first[HeaderLength:end).
// With loose set (naming unsupported features) it stops quietly at the
// first problem.
func (h *Header) parseExtensions(first []byte, end uint64, loose bool) error {
	be := binary.BigEndian
	off := uint64(h.HeaderLength)
	for off < end {
		if off+8 > uint64(len(first)) || off+8 > end {
			if loose {
				return nil
			}
			return errorf("Header extension too large")
		}
		magic := be.Uint32(first[off:])
		l := uint64(be.Uint32(first[off+4:]))
		off += 8
		if l > end-off {
			if loose {
				return nil
			}
			return errorf("Header extension too large")
		}
		data := first[off : off+l]
		switch magic {
		case ExtEnd:
			return nil
		case ExtBackingFormat:
			if l >= 16 {
				if loose {
					return nil
				}
				return errorf("ERROR: ext_backing_format: len=%d too large (>=16)", l)
			}
			h.BackingFormat = string(data)
		case ExtFeatureTable:
			h.FeatureTable = h.FeatureTable[:0]
			for i := 0; i+48 <= len(data); i += 48 {
				name := data[i+2 : i+48]
				if k := indexZero(name); k >= 0 {
					name = name[:k]
				}
				h.FeatureTable = append(h.FeatureTable, Feature{Type: data[i], Bit: data[i+1], Name: string(name)})
			}
		case ExtCryptoHeader:
			if loose {
				break
			}
			if h.CryptMethod != CryptLUKS {
				return errorf("CRYPTO header extension only expected with LUKS encryption method")
			}
			if l != 16 {
				return errorf("CRYPTO header extension size %d, but expected size 16", l)
			}
			c := &CryptoHeader{Offset: be.Uint64(data), Length: be.Uint64(data[8:])}
			if c.Offset%uint64(h.ClusterSize()) != 0 {
				return errorf("Encryption header offset '%d' is not a multiple of cluster size '%d'", c.Offset, h.ClusterSize())
			}
			h.Crypto = c
		case ExtBitmaps:
			if loose {
				break
			}
			if l != 24 {
				return errorf("bitmaps_ext: Invalid extension length")
			}
			if h.AutoclearFeatures&AutoclearBitmaps == 0 {
				// Stale: a program without bitmap support wrote the
				// image. QEMU drops the extension on its next header
				// update; the bitmap clusters then leak.
				h.BitmapsIgnored = true
				h.Unknown = append(h.Unknown, Extension{Magic: magic, Data: append([]byte(nil), data...)})
				break
			}
			bm := &BitmapsExt{NbBitmaps: be.Uint32(data), Reserved: be.Uint32(data[4:]), DirSize: be.Uint64(data[8:]), DirOffset: be.Uint64(data[16:])}
			if bm.Reserved != 0 {
				return errorf("bitmaps_ext: Reserved field is not zero")
			}
			if bm.NbBitmaps > MaxBitmaps {
				return errorf("bitmaps_ext: Image has %d bitmaps, exceeding the QEMU supported maximum of %d", bm.NbBitmaps, MaxBitmaps)
			}
			if bm.NbBitmaps == 0 {
				return errorf("found bitmaps extension with zero bitmaps")
			}
			if bm.DirOffset&uint64(h.ClusterSize()-1) != 0 {
				return errorf("bitmaps_ext: invalid bitmap directory offset")
			}
			if bm.DirSize > MaxBitmapDirSize {
				return errorf("bitmaps_ext: bitmap directory size (%d) exceeds the maximum supported size (%d)", bm.DirSize, MaxBitmapDirSize)
			}
			h.Bitmaps = bm
		case ExtDataFile:
			h.DataFile = string(data)
			h.HasDataFileName = true
		default:
			h.Unknown = append(h.Unknown, Extension{Magic: magic, Data: append([]byte(nil), data...)})
		}
		off += (l + 7) &^ 7
	}
	return nil
}

func indexZero(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// Marshal encodes the header and its extensions into one cluster, in the
// layout QEMU's qcow2_update_header writes: the fixed header (72 bytes for
// version 2, 112 for version 3 plus any unknown fields), then the backing
// format, external data file, encryption header, feature table (version 3
// with clusters above 4 KiB, when withFeatureTable), bitmaps and unknown
// extensions, the end marker, and the backing file name. It sets
// HeaderLength, BackingFileOffset and BackingFileSize.
func (h *Header) Marshal(withFeatureTable bool) ([]byte, error) {
	cs := h.ClusterSize()
	buf := make([]byte, cs)
	be := binary.BigEndian
	var fixed int
	switch h.Version {
	case 2:
		fixed = HeaderV2Len
		h.HeaderLength = HeaderV2Len
	case 3:
		fixed = HeaderLen + len(h.UnknownFields)
		h.HeaderLength = uint32(fixed)
	default:
		return nil, errorf("Unsupported qcow2 version %d", h.Version)
	}
	if err := h.validateCompression(); err != nil {
		return nil, err
	}
	if int64(fixed) > cs {
		return nil, errorf("qcow2 header exceeds cluster size")
	}
	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint32(buf[20:], h.ClusterBits)
	be.PutUint64(buf[24:], h.Size)
	be.PutUint32(buf[32:], h.CryptMethod)
	be.PutUint32(buf[36:], h.L1Size)
	be.PutUint64(buf[40:], h.L1TableOffset)
	be.PutUint64(buf[48:], h.RefcountTableOffset)
	be.PutUint32(buf[56:], h.RefcountTableClusters)
	be.PutUint32(buf[60:], h.NbSnapshots)
	be.PutUint64(buf[64:], h.SnapshotsOffset)
	if h.Version >= 3 {
		be.PutUint64(buf[72:], h.IncompatibleFeatures)
		be.PutUint64(buf[80:], h.CompatibleFeatures)
		be.PutUint64(buf[88:], h.AutoclearFeatures)
		be.PutUint32(buf[96:], h.RefcountOrder)
		be.PutUint32(buf[100:], h.HeaderLength)
		buf[104] = h.CompressionType
		copy(buf[HeaderLen:], h.UnknownFields)
	}
	off := fixed
	add := func(magic uint32, data []byte) error {
		l := 8 + (len(data)+7)&^7
		if off+l > len(buf) {
			return errorf("qcow2 header extensions do not fit in one cluster")
		}
		be.PutUint32(buf[off:], magic)
		be.PutUint32(buf[off+4:], uint32(len(data)))
		copy(buf[off+8:], data)
		off += l
		return nil
	}
	if h.BackingFormat != "" {
		if err := add(ExtBackingFormat, []byte(h.BackingFormat)); err != nil {
			return nil, err
		}
	}
	if h.HasDataFile() && h.HasDataFileName {
		if err := add(ExtDataFile, []byte(h.DataFile)); err != nil {
			return nil, err
		}
	}
	if h.Crypto != nil && h.Crypto.Offset != 0 {
		var d [16]byte
		be.PutUint64(d[:], h.Crypto.Offset)
		be.PutUint64(d[8:], h.Crypto.Length)
		if err := add(ExtCryptoHeader, d[:]); err != nil {
			return nil, err
		}
	}
	if withFeatureTable && h.Version >= 3 && cs > 4096 {
		d := make([]byte, 48*len(DefaultFeatureTable))
		for i, f := range DefaultFeatureTable {
			d[48*i] = f.Type
			d[48*i+1] = f.Bit
			copy(d[48*i+2:48*i+48], f.Name)
		}
		if err := add(ExtFeatureTable, d); err != nil {
			return nil, err
		}
	}
	if h.Bitmaps != nil && h.Bitmaps.NbBitmaps > 0 {
		var d [24]byte
		be.PutUint32(d[0:], h.Bitmaps.NbBitmaps)
		be.PutUint64(d[8:], h.Bitmaps.DirSize)
		be.PutUint64(d[16:], h.Bitmaps.DirOffset)
		if err := add(ExtBitmaps, d[:]); err != nil {
			return nil, err
		}
	}
	for _, u := range h.Unknown {
		if u.Magic == ExtBitmaps && h.BitmapsIgnored {
			// QEMU drops a stale bitmaps extension when it rewrites the
			// header.
			continue
		}
		if err := add(u.Magic, u.Data); err != nil {
			return nil, err
		}
	}
	if err := add(ExtEnd, nil); err != nil {
		return nil, err
	}
	h.BackingFileOffset, h.BackingFileSize = 0, 0
	if h.BackingFile != "" {
		if len(h.BackingFile) > MaxBackingFileName {
			return nil, errorf("Backing file name too long")
		}
		if off+len(h.BackingFile) > len(buf) {
			return nil, errorf("qcow2 header extensions and backing file name do not fit in one cluster")
		}
		copy(buf[off:], h.BackingFile)
		h.BackingFileOffset = uint64(off)
		h.BackingFileSize = uint32(len(h.BackingFile))
		be.PutUint64(buf[8:], h.BackingFileOffset)
		be.PutUint32(buf[16:], h.BackingFileSize)
	}
	return buf, nil
}

// Clone returns a deep copy.
func (h *Header) Clone() *Header {
	c := *h
	c.UnknownFields = append([]byte(nil), h.UnknownFields...)
	c.FeatureTable = append([]Feature(nil), h.FeatureTable...)
	if h.Crypto != nil {
		x := *h.Crypto
		c.Crypto = &x
	}
	if h.Bitmaps != nil {
		x := *h.Bitmaps
		c.Bitmaps = &x
	}
	c.Unknown = nil
	for _, u := range h.Unknown {
		c.Unknown = append(c.Unknown, Extension{Magic: u.Magic, Data: append([]byte(nil), u.Data...)})
	}
	return &c
}

// IncompatibleNames names the set incompatible feature bits (for
// messages), using the image's table and then the default one.
func (h *Header) IncompatibleNames(mask uint64) string {
	e := newUnsupported(append(append([]Feature(nil), h.FeatureTable...), DefaultFeatureTable...), mask)
	parts := e.Names
	if e.unnamed != 0 {
		parts = append(parts, fmt.Sprintf("bits %#x", e.unnamed))
	}
	return strings.Join(parts, ", ")
}
