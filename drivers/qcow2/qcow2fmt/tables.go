package qcow2fmt

import (
	"encoding/binary"
	"fmt"
	"io"
)

// L1, L2 and refcount table entry bits.
const (
	OflagCopied     = uint64(1) << 63
	OflagCompressed = uint64(1) << 62
	OflagZero       = uint64(1)

	L1OffsetMask      = uint64(0x00fffffffffffe00)
	L1ReservedMask    = uint64(0x7f000000000001ff)
	L2OffsetMask      = uint64(0x00fffffffffffe00)
	L2StdReservedMask = uint64(0x3f000000000001fe)
	ReftOffsetMask    = uint64(0xfffffffffffffe00)
	ReftReservedMask  = uint64(0x1ff)

	// L2BitmapAllAlloc and L2BitmapAllZero are the extended L2 bitmap
	// halves.
	L2BitmapAllAlloc = uint64(0xffffffff)
	L2BitmapAllZero  = uint64(0xffffffff) << 32

	// MaxClusterOffset is the highest host offset an L2 entry can hold.
	MaxClusterOffset = int64(1)<<56 - 1
)

// Geometry holds the sizes derived from the header.
type Geometry struct {
	ClusterBits    uint32
	ClusterSize    int64
	Extended       bool
	DataFile       bool
	L2EntrySize    int    // 8 or 16 bytes
	L2Bits         uint32 // log2 of entries per L2 table
	L2Entries      int64
	Subclusters    int // 1 or 32
	SubclusterBits uint32
	SubclusterSize int64
	RefcountOrder  uint32
	RefcountBits   int
	RefblockBits   uint32 // log2 of entries per refcount block
	RefblockSize   int64  // entries per refcount block
	RefcountMax    uint64
	CsizeShift     uint32
	CsizeMask      uint64
	CoffsetMask    uint64
}

// NewGeometry derives a Geometry.
func NewGeometry(clusterBits uint32, extended bool, refcountOrder uint32, dataFile bool) Geometry {
	g := Geometry{ClusterBits: clusterBits, ClusterSize: 1 << clusterBits, Extended: extended, DataFile: dataFile, RefcountOrder: refcountOrder}
	g.L2EntrySize = 8
	g.Subclusters = 1
	if extended {
		g.L2EntrySize = 16
		g.Subclusters = SubclustersPerClust
	}
	esBits := uint32(3)
	if extended {
		esBits = 4
	}
	g.L2Bits = clusterBits - esBits
	g.L2Entries = 1 << g.L2Bits
	g.SubclusterSize = g.ClusterSize / int64(g.Subclusters)
	for s := g.SubclusterSize; s > 1; s >>= 1 {
		g.SubclusterBits++
	}
	g.RefcountBits = 1 << refcountOrder
	if refcountOrder <= 6 {
		g.RefblockBits = clusterBits + 3 - refcountOrder
		g.RefblockSize = 1 << g.RefblockBits
		g.RefcountMax = uint64(1)<<(g.RefcountBits-1) + (uint64(1)<<(g.RefcountBits-1) - 1)
	}
	g.CsizeShift = 62 - (clusterBits - 8)
	g.CsizeMask = uint64(1)<<(clusterBits-8) - 1
	g.CoffsetMask = uint64(1)<<g.CsizeShift - 1
	return g
}

// L1EntriesFor is the number of L1 entries needed for a virtual size.
func (g Geometry) L1EntriesFor(size uint64) uint64 {
	shift := uint64(g.ClusterBits) + uint64(g.L2Bits)
	if shift >= 64 {
		return 1
	}
	return (size + (uint64(1)<<shift - 1)) >> shift
}

// L1Index and L2Index locate a guest offset.
func (g Geometry) L1Index(off int64) int64 { return off >> (g.ClusterBits + g.L2Bits) }

// L2Index is the index of off's entry in its L2 table.
func (g Geometry) L2Index(off int64) int64 { return (off >> g.ClusterBits) & (g.L2Entries - 1) }

// SubclusterType classifies one subcluster of an L2 entry.
type SubclusterType uint8

const (
	SubUnallocatedPlain SubclusterType = iota // no host cluster; backing or zeroes
	SubUnallocatedAlloc                       // host cluster preallocated, subcluster not written
	SubZeroPlain                              // reads as zeroes, no host cluster
	SubZeroAlloc                              // reads as zeroes, host cluster kept
	SubNormal                                 // data at the host offset
	SubCompressed                             // compressed cluster
	SubInvalid
)

var subNames = [...]string{"unallocated", "unallocated (preallocated)", "zero", "zero (preallocated)", "normal", "compressed", "invalid"}

func (t SubclusterType) String() string {
	if int(t) < len(subNames) {
		return subNames[t]
	}
	return fmt.Sprintf("type %d", t)
}

// ClusterType classifies a whole L2 entry (QEMU's QCow2ClusterType).
type ClusterType uint8

const (
	ClusterUnallocated ClusterType = iota
	ClusterZeroPlain
	ClusterZeroAlloc
	ClusterNormal
	ClusterCompressed
)

// ClusterType classifies an L2 entry.
func (g Geometry) ClusterType(entry uint64) ClusterType {
	switch {
	case entry&OflagCompressed != 0:
		return ClusterCompressed
	case entry&OflagZero != 0 && !g.Extended:
		if entry&L2OffsetMask != 0 {
			return ClusterZeroAlloc
		}
		return ClusterZeroPlain
	case entry&L2OffsetMask == 0:
		// With an external data file, offset 0 is valid; COPIED tells.
		if g.DataFile && entry&OflagCopied != 0 {
			return ClusterNormal
		}
		return ClusterUnallocated
	default:
		return ClusterNormal
	}
}

// Subcluster classifies subcluster sc of an entry (QEMU's
// qcow2_get_subcluster_type). Without extended L2 sc must be 0 and bitmap
// is ignored. SubInvalid reports an inconsistent bitmap.
func (g Geometry) Subcluster(entry, bitmap uint64, sc int) SubclusterType {
	t := g.ClusterType(entry)
	if g.Extended {
		switch t {
		case ClusterCompressed:
			return SubCompressed
		case ClusterNormal:
			switch {
			case (bitmap>>32)&bitmap != 0:
				return SubInvalid
			case bitmap&(uint64(1)<<(32+sc)) != 0:
				return SubZeroAlloc
			case bitmap&(uint64(1)<<sc) != 0:
				return SubNormal
			default:
				return SubUnallocatedAlloc
			}
		default:
			switch {
			case bitmap&L2BitmapAllAlloc != 0:
				return SubInvalid
			case bitmap&(uint64(1)<<(32+sc)) != 0:
				return SubZeroPlain
			default:
				return SubUnallocatedPlain
			}
		}
	}
	switch t {
	case ClusterCompressed:
		return SubCompressed
	case ClusterZeroPlain:
		return SubZeroPlain
	case ClusterZeroAlloc:
		return SubZeroAlloc
	case ClusterNormal:
		return SubNormal
	default:
		return SubUnallocatedPlain
	}
}

// HostOffset returns the host cluster offset of a standard entry.
func HostOffset(entry uint64) int64 { return int64(entry & L2OffsetMask) }

// Compressed decodes a compressed cluster descriptor: the host offset of
// the compressed data and the number of bytes that may hold it (to the end
// of its last 512-byte sector).
func (g Geometry) Compressed(entry uint64) (off, size int64) {
	coff := entry & g.CoffsetMask
	nb := ((entry >> g.CsizeShift) & g.CsizeMask) + 1
	return int64(coff), int64(nb)*512 - int64(coff&511)
}

// CompressedEntry encodes a compressed cluster descriptor for size bytes of
// compressed data at off.
func (g Geometry) CompressedEntry(off, size int64) (uint64, error) {
	if off < 0 || uint64(off)&^g.CoffsetMask != 0 || off > MaxClusterOffset {
		return 0, fmt.Errorf("compressed cluster offset %#x out of range", off)
	}
	nb := (off+size-1)/512 - off/512 // additional sectors
	if size <= 0 || uint64(nb) > g.CsizeMask {
		return 0, fmt.Errorf("compressed size %d out of range", size)
	}
	return OflagCompressed | uint64(nb)<<g.CsizeShift | uint64(off), nil
}

// ReadTable reads n big-endian 64-bit entries at off.
func ReadTable(r io.ReaderAt, off int64, n int64) ([]uint64, error) {
	if n < 0 || n > 1<<28 {
		return nil, fmt.Errorf("table of %d entries is too large", n)
	}
	buf := make([]byte, 8*n)
	if err := readAt(r, buf, off); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[8*i:])
	}
	return t, nil
}

// EncodeTable encodes entries big-endian.
func EncodeTable(t []uint64) []byte {
	buf := make([]byte, 8*len(t))
	for i, v := range t {
		binary.BigEndian.PutUint64(buf[8*i:], v)
	}
	return buf
}

// L2Entry returns entry i (and its bitmap for extended L2) from a raw L2
// table.
func (g Geometry) L2Entry(table []byte, i int64) (entry, bitmap uint64) {
	if g.Extended {
		p := table[16*i:]
		return binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])
	}
	return binary.BigEndian.Uint64(table[8*i:]), 0
}

// SetL2Entry stores entry i (and its bitmap for extended L2).
func (g Geometry) SetL2Entry(table []byte, i int64, entry, bitmap uint64) {
	if g.Extended {
		p := table[16*i:]
		binary.BigEndian.PutUint64(p, entry)
		binary.BigEndian.PutUint64(p[8:], bitmap)
		return
	}
	binary.BigEndian.PutUint64(table[8*i:], entry)
}

// Refcount reads entry i of a refcount block of the given order.
func Refcount(block []byte, i int64, order uint32) uint64 {
	switch order {
	case 0:
		return uint64(block[i/8]>>(i%8)) & 1
	case 1:
		return uint64(block[i/4]>>(2*(i%4))) & 3
	case 2:
		return uint64(block[i/2]>>(4*(i%2))) & 15
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(block[2*i:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(block[4*i:]))
	default:
		return binary.BigEndian.Uint64(block[8*i:])
	}
}

// SetRefcount stores entry i of a refcount block; v must fit the width.
func SetRefcount(block []byte, i int64, order uint32, v uint64) {
	switch order {
	case 0, 1, 2:
		bits := uint(1) << order
		shift := uint(i%(8/int64(bits))) * bits
		mask := byte((1<<bits)-1) << shift
		p := &block[i*int64(bits)/8]
		*p = *p&^mask | byte(v<<shift)&mask
	case 3:
		block[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(block[2*i:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(block[4*i:], uint32(v))
	default:
		binary.BigEndian.PutUint64(block[8*i:], v)
	}
}

// CheckL1Entry reports what is wrong with an active L1 entry, or nil.
func (g Geometry) CheckL1Entry(e uint64) error {
	if e&L1ReservedMask != 0 {
		return fmt.Errorf("L1 entry %#x has reserved bits set", e)
	}
	if off := e & L1OffsetMask; off&uint64(g.ClusterSize-1) != 0 {
		return fmt.Errorf("L2 table offset %#x unaligned", off)
	}
	return nil
}

// CheckL2Entry reports what is wrong with an L2 entry, or nil: reserved
// bits, an unaligned host offset, an inconsistent subcluster bitmap, a
// compressed cluster where none may be.
func (g Geometry) CheckL2Entry(e, bitmap uint64) error {
	switch g.ClusterType(e) {
	case ClusterCompressed:
		if g.DataFile {
			return fmt.Errorf("compressed cluster entry %#x in an image with an external data file", e)
		}
		if g.Extended && bitmap != 0 {
			return fmt.Errorf("compressed cluster entry %#x has a subcluster bitmap %#x", e, bitmap)
		}
		return nil
	case ClusterNormal, ClusterZeroAlloc:
		if off := e & L2OffsetMask; off&uint64(g.ClusterSize-1) != 0 {
			return fmt.Errorf("cluster allocation offset %#x unaligned", off)
		}
	}
	if e&L2StdReservedMask != 0 {
		return fmt.Errorf("L2 entry %#x has reserved bits set", e)
	}
	if g.Extended {
		if e&OflagZero != 0 {
			return fmt.Errorf("L2 entry %#x has the zero flag in an image with subclusters", e)
		}
		if g.Subcluster(e, bitmap, 0) == SubInvalid {
			return fmt.Errorf("invalid subcluster bitmap %#x for L2 entry %#x", bitmap, e)
		}
	}
	return nil
}
