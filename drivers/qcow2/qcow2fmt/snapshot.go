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
	ExtraData     []byte // all extra data, as stored
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
