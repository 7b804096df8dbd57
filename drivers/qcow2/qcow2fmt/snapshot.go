package qcow2fmt

import (
	"encoding/binary"
	"io"
)

// SnapshotHeaderLen is the fixed part of a snapshot table entry.
const SnapshotHeaderLen = 40

// Snapshot is one internal snapshot table entry.
type Snapshot struct {
	L1TableOffset uint64
	L1Size        uint32
	ID, Name      string
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64
	VMStateSize   uint64
	DiskSize      uint64 // from extra data, or the image size
	Icount        int64  // from extra data, or -1
	ExtraData     []byte // all extra data, as stored
}

// snapshotExtraLen is the extra data QEMU writes: the 64-bit VM state
// size, the disk size and the instruction count.
const snapshotExtraLen = 24

// MarshalSnapshots encodes a snapshot table (qcow2_write_snapshots): the
// known extra data is rewritten from the fields, extra data this code
// does not know is kept.
func MarshalSnapshots(snaps []Snapshot) []byte {
	var out []byte
	be := binary.BigEndian
	for _, s := range snaps {
		extra := make([]byte, max(len(s.ExtraData), snapshotExtraLen))
		copy(extra, s.ExtraData)
		be.PutUint64(extra[0:], s.VMStateSize)
		be.PutUint64(extra[8:], s.DiskSize)
		be.PutUint64(extra[16:], uint64(s.Icount))
		var b [SnapshotHeaderLen]byte
		be.PutUint64(b[0:], s.L1TableOffset)
		be.PutUint32(b[8:], s.L1Size)
		be.PutUint16(b[12:], uint16(len(s.ID)))
		be.PutUint16(b[14:], uint16(len(s.Name)))
		be.PutUint32(b[16:], s.DateSec)
		be.PutUint32(b[20:], s.DateNsec)
		be.PutUint64(b[24:], s.VMClockNsec)
		be.PutUint32(b[32:], uint32(s.VMStateSize))
		be.PutUint32(b[36:], uint32(len(extra)))
		out = append(out, b[:]...)
		out = append(out, extra...)
		out = append(out, s.ID...)
		out = append(out, s.Name...)
		for len(out)%8 != 0 {
			out = append(out, 0)
		}
	}
	return out
}

// Snapshots reads the snapshot table. It returns the entries and the
// table's size in bytes.
func Snapshots(r io.ReaderAt, h *Header) ([]Snapshot, int64, error) {
	if h.NbSnapshots == 0 {
		return nil, 0, nil
	}
	off := int64(h.SnapshotsOffset)
	var total int64
	out := make([]Snapshot, 0, min(h.NbSnapshots, 1024))
	be := binary.BigEndian
	for i := 0; i < int(h.NbSnapshots); i++ {
		off = (off + 7) &^ 7
		total = (total + 7) &^ 7
		var b [SnapshotHeaderLen]byte
		if err := readAt(r, b[:], off); err != nil {
			return nil, 0, errorf("Failed to read snapshot table: %v", err)
		}
		off += SnapshotHeaderLen
		s := Snapshot{
			L1TableOffset: be.Uint64(b[0:]),
			L1Size:        be.Uint32(b[8:]),
			DateSec:       be.Uint32(b[16:]),
			DateNsec:      be.Uint32(b[20:]),
			VMClockNsec:   be.Uint64(b[24:]),
			VMStateSize:   uint64(be.Uint32(b[32:])),
			DiskSize:      h.Size,
			Icount:        -1,
		}
		idLen := int64(be.Uint16(b[12:]))
		nameLen := int64(be.Uint16(b[14:]))
		extra := int64(be.Uint32(b[36:]))
		if extra > MaxSnapshotExtra {
			return nil, 0, errorf("Too much extra metadata in snapshot table entry %d", i)
		}
		rest := make([]byte, extra+idLen+nameLen)
		if err := readAt(r, rest, off); err != nil {
			return nil, 0, errorf("Failed to read snapshot table: %v", err)
		}
		off += int64(len(rest))
		s.ExtraData = rest[:extra]
		if extra >= 16 {
			s.DiskSize = be.Uint64(rest[8:16])
		}
		if extra >= 8 {
			s.VMStateSize = be.Uint64(rest[0:8])
		}
		if extra >= 24 {
			s.Icount = int64(be.Uint64(rest[16:24]))
		}
		s.ID = string(rest[extra : extra+idLen])
		s.Name = string(rest[extra+idLen:])
		total += SnapshotHeaderLen + extra + idLen + nameLen
		if total > MaxSnapshotsSize {
			return nil, 0, errorf("Snapshot table is too big")
		}
		if err := validateTable(h, s.L1TableOffset, uint64(s.L1Size), 8, MaxL1Size, "Snapshot L1 table"); err != nil {
			return nil, 0, err
		}
		out = append(out, s)
	}
	return out, off - int64(h.SnapshotsOffset), nil
}
