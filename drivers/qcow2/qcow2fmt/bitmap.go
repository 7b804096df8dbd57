package qcow2fmt

import (
	"encoding/binary"
	"io"
)

// Bitmap directory entry flags.
const (
	BitmapInUse     = 1 << 0
	BitmapAuto      = 1 << 1
	BitmapExtraData = 1 << 2
)

// BitmapDirEntryLen is the fixed part of a bitmap directory entry.
const BitmapDirEntryLen = 24

// Bitmap is one bitmap directory entry.
type Bitmap struct {
	TableOffset     uint64
	TableSize       uint32
	Flags           uint32
	Type            uint8
	GranularityBits uint8
	Name            string
	ExtraData       []byte
	// DirOffset is the entry's offset inside the directory (to rewrite
	// its flags in place).
	DirOffset int64
}

// Bitmaps reads the bitmap directory named by the bitmaps extension of an
// image file of fileSize bytes.
func Bitmaps(r io.ReaderAt, h *Header, fileSize int64) ([]Bitmap, error) {
	if h.Bitmaps == nil {
		return nil, nil
	}
	ext := h.Bitmaps
	if ext.DirOffset > uint64(fileSize) || ext.DirSize > uint64(fileSize)-ext.DirOffset {
		return nil, errorf("Bitmap directory (offset %#x, %d bytes) extends beyond the end of the file", ext.DirOffset, ext.DirSize)
	}
	dir := make([]byte, ext.DirSize)
	if err := readAt(r, dir, int64(ext.DirOffset)); err != nil {
		return nil, errorf("Failed to read bitmap directory: %v", err)
	}
	be := binary.BigEndian
	var out []Bitmap
	var p int64
	for i := uint32(0); i < ext.NbBitmaps; i++ {
		if p+BitmapDirEntryLen > int64(len(dir)) {
			return nil, errorf("Bitmap directory is incomplete")
		}
		e := dir[p:]
		b := Bitmap{
			TableOffset:     be.Uint64(e[0:]),
			TableSize:       be.Uint32(e[8:]),
			Flags:           be.Uint32(e[12:]),
			Type:            e[16],
			GranularityBits: e[17],
			DirOffset:       p,
		}
		nameLen := int64(be.Uint16(e[18:]))
		extra := int64(be.Uint32(e[20:]))
		size := (BitmapDirEntryLen + extra + nameLen + 7) &^ 7
		if p+BitmapDirEntryLen+extra+nameLen > int64(len(dir)) {
			return nil, errorf("Bitmap directory is incomplete")
		}
		b.ExtraData = append([]byte(nil), e[BitmapDirEntryLen:BitmapDirEntryLen+extra]...)
		b.Name = string(e[BitmapDirEntryLen+extra : BitmapDirEntryLen+extra+nameLen])
		if b.TableOffset&uint64(h.ClusterSize()-1) != 0 {
			return nil, errorf("Bitmap '%s' table offset %#x is not cluster aligned", b.Name, b.TableOffset)
		}
		if uint64(b.TableSize) > MaxL1Size/8 {
			return nil, errorf("Bitmap '%s' table is too large", b.Name)
		}
		out = append(out, b)
		p += size
	}
	return out, nil
}
