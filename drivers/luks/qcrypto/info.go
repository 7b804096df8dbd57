package qcrypto

import "blockd/drivers/luks/luksfmt"

// Slot is QCryptoBlockInfoLUKSSlot.
type Slot struct {
	Active    bool   `json:"active"`
	Iters     uint32 `json:"iters,omitempty"`
	Stripes   uint32 `json:"stripes,omitempty"`
	KeyOffset int64  `json:"key-offset"`
}

// Info is QCryptoBlockInfoLUKS, members in QAPI order (the order decides
// where colliding members fall in QEMU's QDict order, see qapi.Marshal). S
// is the keyslot shape: Slot, or luksfmt.SlotInfo with blockd's details
// (LUKS2 luks nodes).
type Info[S Slot | luksfmt.SlotInfo] struct {
	CipherAlg    string `json:"cipher-alg"`
	CipherMode   string `json:"cipher-mode"`
	IVGenAlg     string `json:"ivgen-alg"`
	IVGenHashAlg string `json:"ivgen-hash-alg,omitempty"`
	HashAlg      string `json:"hash-alg"`
	// DetachedHeader is QEMU 9.0's member, which luks nodes report; nil
	// in QEMU 7.2's shape (encrypted qcow2 images).
	DetachedHeader *bool  `json:"detached-header,omitempty"`
	PayloadOffset  int64  `json:"payload-offset"`
	MasterKeyIters uint32 `json:"master-key-iters"`
	UUID           string `json:"uuid"`
	Slots          []S    `json:"slots"`
}

// InfoLUKS2 is what a luks node reports for a LUKS2 volume: QEMU 9.0's
// members, each keyslot with blockd's details, and the LUKS2 members (see
// docs/qmp.md).
type InfoLUKS2 struct {
	Info[luksfmt.SlotInfo]
	Version    int    `json:"version"`
	SectorSize int    `json:"sector-size"`
	Label      string `json:"label,omitempty"`
	Subsystem  string `json:"subsystem,omitempty"`
}

func newInfo[S Slot | luksfmt.SlotInfo](in luksfmt.Info, slots []S) Info[S] {
	return Info[S]{CipherAlg: in.CipherAlg, CipherMode: in.CipherMode, IVGenAlg: in.IVGenAlg,
		IVGenHashAlg: in.IVGenHashAlg, HashAlg: in.HashAlg, PayloadOffset: in.PayloadOffset,
		MasterKeyIters: in.MasterKeyIters, UUID: in.UUID, Slots: slots}
}

// NewInfo returns QEMU 7.2's summary of a header (no detached-header), with
// iterations and stripes only for active keyslots, as
// qcrypto_block_luks_get_info reports them.
func NewInfo(in luksfmt.Info) Info[Slot] {
	slots := make([]Slot, 0, len(in.Slots))
	for _, s := range in.Slots {
		si := Slot{Active: s.Active, KeyOffset: s.KeyOffset}
		if s.Active {
			si.Iters, si.Stripes = s.Iters, s.Stripes
		}
		slots = append(slots, si)
	}
	return newInfo(in, slots)
}

// NodeInfo returns the format-specific data of a luks node: QEMU 9.0's
// Info for LUKS1, InfoLUKS2 for LUKS2. A header whose payload offset is 0
// is a detached one.
func NodeInfo(in luksfmt.Info) any {
	detached := in.PayloadOffset == 0
	if in.Version == 1 {
		q := NewInfo(in)
		q.DetachedHeader = &detached
		return q
	}
	q := InfoLUKS2{Info: newInfo(in, in.Slots), Version: in.Version, SectorSize: in.SectorSize,
		Label: in.Label, Subsystem: in.Subsystem}
	q.DetachedHeader = &detached
	return q
}
