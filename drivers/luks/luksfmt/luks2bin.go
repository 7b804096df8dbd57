package luksfmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// LUKS2 binary header (4096 bytes, big-endian integers) followed by the JSON
// area; the secondary copy follows the primary at offset hdr_size.
const (
	luks2BinLen = 4096
	// luks2MinHdr and luks2MaxHdr bound hdr_size (binary header plus JSON
	// area): 16 KiB to 4 MiB, powers of two.
	luks2MinHdr = 0x4000
	luks2MaxHdr = 0x400000
	// luks2MaxKeyslotsSize is cryptsetup's limit on the keyslots area.
	luks2MaxKeyslotsSize = 0x8000000

	off2Version   = 6
	off2HdrSize   = 8
	off2Seqid     = 16
	off2Label     = 24
	off2CsumAlg   = 72
	off2Salt      = 104
	off2UUID      = 168
	off2Subsystem = 208
	off2HdrOffset = 256
	off2Csum      = 448
	luks2LabelLen = 48
	luks2AlgLen   = 32
	luks2SaltLen  = 64
	luks2UUIDLen  = 40
	luks2CsumLen  = 64
)

var luks2Magic2 = []byte{'S', 'K', 'U', 'L', 0xba, 0xbe}

// luks2Offsets are the places a secondary header may start, scanned when the
// primary is unreadable (cryptsetup's LUKS2_HDR2_OFFSETS).
var luks2Offsets = []int64{0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000}

func validHdrSize(n uint64) bool {
	for _, o := range luks2Offsets {
		if uint64(o) == n {
			return true
		}
	}
	return false
}

// CopyState describes one of the two LUKS2 header copies as found by Open.
type CopyState int

const (
	// CopyOK is a valid copy with the newest sequence id.
	CopyOK CopyState = iota
	// CopyObsolete is a valid copy with an older sequence id (an update was
	// interrupted) or JSON that fails validation.
	CopyObsolete
	// CopyCorrupt has a bad magic, size, offset or checksum.
	CopyCorrupt
	// CopyUnreadable could not be read (I/O error or beyond the device).
	CopyUnreadable
)

func (s CopyState) String() string {
	switch s {
	case CopyOK:
		return "ok"
	case CopyObsolete:
		return "obsolete"
	case CopyCorrupt:
		return "corrupt"
	default:
		return "unreadable"
	}
}

// luks2Bin is a decoded binary header.
type luks2Bin struct {
	hdrSize   uint64
	seqid     uint64
	label     string
	csumAlg   string
	salt      [luks2SaltLen]byte
	uuid      string
	subsystem string
	hdrOffset uint64
}

// encode returns the binary header with a zero checksum.
func (b *luks2Bin) encode(secondary bool) []byte {
	buf := make([]byte, luks2BinLen)
	if secondary {
		copy(buf, luks2Magic2)
	} else {
		copy(buf, luksMagic)
	}
	binary.BigEndian.PutUint16(buf[off2Version:], 2)
	binary.BigEndian.PutUint64(buf[off2HdrSize:], b.hdrSize)
	binary.BigEndian.PutUint64(buf[off2Seqid:], b.seqid)
	putCString(buf[off2Label:off2Label+luks2LabelLen], b.label)
	putCString(buf[off2CsumAlg:off2CsumAlg+luks2AlgLen], b.csumAlg)
	copy(buf[off2Salt:off2Salt+luks2SaltLen], b.salt[:])
	putCString(buf[off2UUID:off2UUID+luks2UUIDLen], b.uuid)
	putCString(buf[off2Subsystem:off2Subsystem+luks2LabelLen], b.subsystem)
	binary.BigEndian.PutUint64(buf[off2HdrOffset:], b.hdrOffset)
	return buf
}

// checksum computes the header checksum over the binary header (checksum
// field zeroed) and the whole JSON area.
func luks2Checksum(alg string, bin, jsonArea []byte) ([]byte, error) {
	hf, err := lookupHash(alg)
	if err != nil {
		return nil, err
	}
	h := hf()
	if h.Size() > luks2CsumLen {
		return nil, fmt.Errorf("%w: checksum %q is too long", ErrUnsupported, alg)
	}
	var zero [luks2CsumLen]byte
	h.Write(bin[:off2Csum])
	h.Write(zero[:])
	h.Write(bin[off2Csum+luks2CsumLen:])
	h.Write(jsonArea)
	return h.Sum(nil), nil
}

// errCopyIO marks a copy that could not be read.
var errCopyIO = errors.New("unreadable")

// readLUKS2Copy reads and checks one header copy at off (cryptsetup's
// hdr_read_disk): magic, version, offset, size and checksum. It returns the
// decoded binary header and the JSON area.
func readLUKS2Copy(r io.ReaderAt, devSize, off int64, secondary bool) (*luks2Bin, []byte, error) {
	if devSize >= 0 && off+luks2BinLen > devSize {
		return nil, nil, fmt.Errorf("%w: header copy at %d is beyond the device end", errCopyIO, off)
	}
	buf := make([]byte, luks2BinLen)
	if err := readFull(r, buf, off); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errCopyIO, err)
	}
	magic := luksMagic
	if secondary {
		magic = luks2Magic2
	}
	if !bytes.Equal(buf[:6], magic) {
		return nil, nil, errors.New("bad magic")
	}
	if v := binary.BigEndian.Uint16(buf[off2Version:]); v != 2 {
		return nil, nil, fmt.Errorf("version %d is not 2", v)
	}
	b := &luks2Bin{
		hdrSize:   binary.BigEndian.Uint64(buf[off2HdrSize:]),
		seqid:     binary.BigEndian.Uint64(buf[off2Seqid:]),
		label:     cString(buf[off2Label : off2Label+luks2LabelLen-1]),
		csumAlg:   cString(buf[off2CsumAlg : off2CsumAlg+luks2AlgLen-1]),
		uuid:      cString(buf[off2UUID : off2UUID+luks2UUIDLen-1]),
		subsystem: cString(buf[off2Subsystem : off2Subsystem+luks2LabelLen-1]),
		hdrOffset: binary.BigEndian.Uint64(buf[off2HdrOffset:]),
	}
	copy(b.salt[:], buf[off2Salt:])
	if b.hdrOffset != uint64(off) {
		return nil, nil, fmt.Errorf("header offset field %d does not match its position %d", b.hdrOffset, off)
	}
	if b.hdrSize < luks2MinHdr || b.hdrSize > luks2MaxHdr {
		return nil, nil, fmt.Errorf("bogus header size %d", b.hdrSize)
	}
	if secondary && uint64(off) != b.hdrSize {
		return nil, nil, fmt.Errorf("secondary header at %d does not match its size %d", off, b.hdrSize)
	}
	jsonLen := int64(b.hdrSize) - luks2BinLen
	if devSize >= 0 && off+int64(b.hdrSize) > devSize {
		return nil, nil, fmt.Errorf("%w: json area at %d is beyond the device end", errCopyIO, off)
	}
	area := make([]byte, jsonLen)
	if err := readFull(r, area, off+luks2BinLen); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errCopyIO, err)
	}
	sum, err := luks2Checksum(b.csumAlg, buf, area)
	if err != nil {
		return nil, nil, err
	}
	if !bytes.Equal(sum, buf[off2Csum:off2Csum+len(sum)]) {
		return nil, nil, errors.New("checksum mismatch")
	}
	return b, area, nil
}

// writeLUKS2Copy writes one copy the way cryptsetup's hdr_write_disk does:
// the binary header with a zero checksum first (invalidating the copy), then
// the JSON area, then the binary header with its checksum.
func writeLUKS2Copy(w io.WriterAt, b *luks2Bin, jsonArea []byte, secondary bool) error {
	off := int64(0)
	if secondary {
		off = int64(b.hdrSize)
	}
	bb := *b
	bb.hdrOffset = uint64(off)
	bin := bb.encode(secondary)
	if err := writeAll(w, bin, off); err != nil {
		return err
	}
	if err := writeAll(w, jsonArea, off+luks2BinLen); err != nil {
		return err
	}
	sum, err := luks2Checksum(bb.csumAlg, bin, jsonArea)
	if err != nil {
		return err
	}
	copy(bin[off2Csum:], sum)
	if err := writeAll(w, bin, off); err != nil {
		return err
	}
	return syncWriter(w)
}
