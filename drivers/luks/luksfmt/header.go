package luksfmt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"

	"blockd/internal/blockcrypto"
)

// AnySlot asks Unlock to try every keyslot.
const AnySlot = -1

// DefaultHash is the hash of new headers and keyslots unless chosen
// otherwise (cryptsetup's and QEMU's default).
const DefaultHash = "sha256"

// Header is an opened LUKS1 or LUKS2 header. It holds no key material, only
// the public metadata (salts and digests).
//
// Query methods and Unlock may run concurrently with each other. Methods
// that write (AddKey, KillSlot, RemoveKey, ChangeKey, Erase, Repair) take
// the header exclusively; they leave the in-memory header unchanged when
// they fail before the final header write. After any write error, reopen
// the header from the device before trying again.
type Header struct {
	r       io.ReaderAt // metadata device, for reading keyslot areas
	version int         // 1 or 2, fixed at Open or Create

	mu sync.RWMutex // protects v1 and v2 (their contents change on writes)
	v1 *luks1Header // LUKS1, or nil
	v2 *luks2Header // LUKS2, or nil
}

// Open reads and validates the LUKS header on the metadata device r of size
// bytes (negative if unknown). The header may be embedded in the volume or
// detached; the payload's place on its device is PayloadOffset. r is kept
// for reading keyslots in Unlock.
//
// For LUKS2, Open uses the valid copy with the higher sequence id and
// reports a damaged or outdated other copy through Damage (Repair rewrites
// it). It refuses headers that need features this package does not
// implement (ErrUnsupported) and damaged ones (ErrCorrupt); ErrNotLUKS means
// there is no LUKS header at all.
func Open(r io.ReaderAt, size int64) (*Header, error) {
	buf := make([]byte, luks1HdrLen)
	if size >= 0 && size < luks1HdrLen {
		return nil, fmt.Errorf("%w: device of %d bytes is too small", ErrNotLUKS, size)
	}
	if err := readFull(r, buf, 0); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: device is too small", ErrNotLUKS)
		}
		return nil, fmt.Errorf("reading luks header: %w", err)
	}
	magic := string(buf[:6]) == string(luksMagic)
	version := binary.BigEndian.Uint16(buf[6:8])
	if magic && version == 1 {
		v1, err := parseLUKS1(buf, size)
		if err != nil {
			return nil, err
		}
		return &Header{r: r, version: 1, v1: v1}, nil
	}
	v2, err := openLUKS2(r, size)
	if err != nil {
		if errors.Is(err, ErrNotLUKS) && magic {
			return nil, fmt.Errorf("%w: luks version %d", ErrUnsupported, version)
		}
		return nil, err
	}
	return &Header{r: r, version: 2, v2: v2}, nil
}

// Version returns 1 or 2.
func (h *Header) Version() int { return h.version }

// UUID returns the header's UUID.
func (h *Header) UUID() string {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return h.v1.uuid
	}
	return h.v2.bin.uuid
}

// Label returns the LUKS2 label and subsystem (empty for LUKS1).
func (h *Header) Label() (label, subsystem string) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return "", ""
	}
	return h.v2.bin.label, h.v2.bin.subsystem
}

// PayloadOffset returns the offset in bytes of the encrypted payload on the
// data device. It is 0 for detached headers made by cryptsetup --header or
// QEMU.
func (h *Header) PayloadOffset() int64 {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return int64(h.v1.payloadOffset) * sectorSize
	}
	return int64(h.v2.meta.seg.offset)
}

// PayloadSize returns the payload size in bytes fixed by the header, or
// dynamic=true when the payload extends to the end of the data device
// (always for LUKS1; LUKS2 "dynamic" segments).
func (h *Header) PayloadSize() (size int64, dynamic bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil || h.v2.meta.seg.dynamic {
		return 0, true
	}
	return int64(h.v2.meta.seg.size), false
}

// SectorSize returns the encryption sector size in bytes: 512 for LUKS1,
// 512 to 4096 for LUKS2. Payload I/O must be aligned to it.
func (h *Header) SectorSize() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return sectorSize
	}
	return h.v2.meta.seg.sectorSize
}

// IVTweak returns the LUKS2 segment's iv_tweak (0 for LUKS1), in 512-byte
// units. As in dm-crypt (which cryptsetup configures without
// iv_large_sectors), the IV of the encryption sector at byte offset off of
// the payload is off/512 + IVTweak, also when SectorSize is larger than 512:
// a 4096-byte sector's IV advances by 8 from one sector to the next.
func (h *Header) IVTweak() uint64 {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return 0
	}
	return h.v2.meta.seg.ivTweak
}

// CipherSpec returns the payload cipher, e.g. {"aes", "xts-plain64"}.
func (h *Header) CipherSpec() blockcrypto.Spec {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return h.v1.spec()
	}
	spec, _ := parseSpec(h.v2.meta.seg.encryption) // validated by Open
	return spec
}

// KeySize returns the volume key size in bytes. For a LUKS2 header without
// keyslots it is 0 (the size is only recorded in keyslots).
func (h *Header) KeySize() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return int(h.v1.keyBytes)
	}
	return h.v2.meta.keySize()
}

// HeaderSize returns the size of the metadata region at the start of the
// header device: for LUKS1 the phdr and keyslots up to the end of the last
// keyslot, rounded up to 4096 bytes (2068480 for QEMU's default layout);
// for LUKS2 both header copies and the keyslots area. A detached header
// device must be at least this large; an embedded header's payload may
// start later (PayloadOffset).
func (h *Header) HeaderSize() int64 {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return (h.v1.deviceSize() + 4095) / 4096 * 4096
	}
	return int64(h.v2.meta.hdrAndAreasSize())
}

// MaxSlots returns the number of keyslot ids: 8 for LUKS1, 32 for LUKS2.
func (h *Header) MaxSlots() int {
	if h.version == 1 {
		return luks1Slots
	}
	return luks2MaxKeyslots
}

// ActiveSlots returns the ids of the keyslots holding the volume key, in
// ascending order.
func (h *Header) ActiveSlots() []int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var ids []int
	if h.v1 != nil {
		for i, s := range h.v1.slots {
			if s.active == luks1Enabled {
				ids = append(ids, i)
			}
		}
		return ids
	}
	for _, id := range h.v2.slotIDs() {
		if h.v2.meta.boundToSegment(h.v2.meta.slot(id)) {
			ids = append(ids, id)
		}
	}
	return ids
}

// CopyStates returns the state of the two LUKS2 header copies as found by
// Open or left by the last write. LUKS1 has a single copy: (CopyOK, CopyOK).
func (h *Header) CopyStates() (primary, secondary CopyState) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return CopyOK, CopyOK
	}
	return h.v2.states[0], h.v2.states[1]
}

// Damage returns nil if both LUKS2 header copies are valid and current, or
// an error (matching ErrCorrupt) describing what is wrong with the other
// copy. The header is usable either way; Repair fixes the damage.
func (h *Header) Damage() error {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return nil
	}
	var msgs []string
	for i, name := range []string{"primary", "secondary"} {
		if h.v2.states[i] != CopyOK {
			msgs = append(msgs, fmt.Sprintf("%s luks2 header copy is %s: %v", name, h.v2.states[i], h.v2.problems[i]))
		}
	}
	if msgs == nil {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrCorrupt, strings.Join(msgs, "; "))
}

// Repair rewrites a damaged or outdated LUKS2 header copy from the valid
// one (the copy in use is not modified). It does nothing for LUKS1 or when
// there is no damage.
func (h *Header) Repair(w io.WriterAt) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.v1 != nil {
		return nil
	}
	return h.v2.repair(w)
}

// VerifyKey checks that key is the volume key (ErrWrongKey otherwise).
func (h *Header) VerifyKey(key []byte) error {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.v1 != nil {
		return h.v1.verifyKey(key)
	}
	return h.v2.verifyKey(key)
}

// Unlock derives the volume key from a passphrase. slot is a keyslot id or
// AnySlot; with AnySlot, keyslots are tried one after the other (LUKS2:
// "prefer" priority first, "ignore" priority skipped). It returns the key
// and the keyslot that opened; the key is in key memory (internal/keymem),
// and the caller owns it and must release it with Wipe.
// A passphrase that opens no keyslot gives ErrWrongPassphrase; a requested
// keyslot that is empty gives ErrSlotInactive.
//
// Keyslots whose key derivation costs more than lim allows (the zero
// KDFLimits: the defaults) are not tried; when no other keyslot opens, the
// error is the first of them, an ErrKDFLimit naming the keyslot and the
// limit. When ctx is done Unlock returns ctx's error within milliseconds
// (an argon2 derivation under way finishes in the background, bounded by
// lim, and its result is wiped).
func (h *Header) Unlock(ctx context.Context, passphrase []byte, slot int, lim KDFLimits) ([]byte, int, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if slot != AnySlot && (slot < 0 || slot >= h.MaxSlots()) {
		return nil, -1, fmt.Errorf("%w: keyslot %d is out of range (0-%d)", ErrInvalidArgument, slot, h.MaxSlots()-1)
	}
	var overLimit error // the first keyslot skipped for its cost
	// try reports whether the attempt ended the search.
	try := func(open func() ([]byte, error)) ([]byte, bool, error) {
		if err := ctx.Err(); err != nil {
			return nil, true, err
		}
		key, err := open()
		switch {
		case errors.Is(err, errMismatch):
			return nil, false, nil
		case errors.Is(err, ErrKDFLimit):
			if overLimit == nil {
				overLimit = err
			}
			return nil, false, nil
		}
		return key, true, err
	}
	notOpened := func() error {
		if overLimit != nil {
			return overLimit
		}
		return ErrWrongPassphrase
	}
	if h.v1 != nil {
		for i, s := range h.v1.slots {
			if slot != AnySlot && i != slot {
				continue
			}
			if s.active != luks1Enabled {
				if slot != AnySlot {
					return nil, -1, fmt.Errorf("%w: keyslot %d", ErrSlotInactive, slot)
				}
				continue
			}
			key, end, err := try(func() ([]byte, error) { return h.v1.openSlot(ctx, h.r, i, passphrase, lim) })
			if err != nil {
				return nil, -1, err
			}
			if end {
				return key, i, nil
			}
		}
		return nil, -1, notOpened()
	}
	var slots []*luks2Keyslot
	if slot == AnySlot {
		slots = h.v2.unlockOrder()
	} else {
		s := h.v2.meta.slot(slot)
		if s == nil {
			return nil, -1, fmt.Errorf("%w: keyslot %d", ErrSlotInactive, slot)
		}
		if !h.v2.meta.boundToSegment(s) {
			return nil, -1, fmt.Errorf("%w: keyslot %d does not hold the data segment's key", ErrUnsupported, slot)
		}
		slots = []*luks2Keyslot{s}
	}
	for _, s := range slots {
		key, end, err := try(func() ([]byte, error) { return h.v2.openSlot(ctx, h.r, s, passphrase, lim) })
		if err != nil {
			return nil, -1, err
		}
		if end {
			return key, s.id, nil
		}
	}
	return nil, -1, notOpened()
}

// MatchSlots returns every active keyslot that passphrase opens (unlike
// Unlock, it does not stop at the first), for QEMU's amend semantics of
// erasing all keyslots of an old secret. ctx and lim are as for Unlock; a
// keyslot over lim is an error.
func (h *Header) MatchSlots(ctx context.Context, passphrase []byte, lim KDFLimits) ([]int, error) {
	var out []int
	for _, id := range h.ActiveSlots() {
		key, _, err := h.Unlock(ctx, passphrase, id, lim)
		switch {
		case err == nil:
			freeKey(key)
			out = append(out, id)
		case errors.Is(err, ErrWrongPassphrase), errors.Is(err, ErrSlotInactive):
		default:
			return nil, err
		}
	}
	return out, nil
}

// AddKey stores the volume key in keyslot slot (AnySlot: the lowest free
// one) protected by passphrase, and returns the keyslot used. The key must
// match the header's digest. The keyslot material is written before the
// header, so an interrupted AddKey leaves the header as it was.
func (h *Header) AddKey(w io.WriterAt, key []byte, slot int, passphrase []byte, kdf KDF) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.v2 != nil {
		return h.v2.addKey(w, key, slot, passphrase, kdf)
	}
	v1 := h.v1
	if err := v1.verifyKey(key); err != nil {
		return -1, err
	}
	if slot == AnySlot {
		for slot = 0; slot < luks1Slots && v1.slots[slot].active != luks1Disabled; slot++ {
		}
		if slot == luks1Slots {
			return -1, ErrNoFreeSlot
		}
	} else if slot < 0 || slot >= luks1Slots {
		return -1, fmt.Errorf("%w: keyslot %d is out of range (0-%d)", ErrInvalidArgument, slot, luks1Slots-1)
	}
	switch v1.slots[slot].active {
	case luks1Disabled:
	case luks1Enabled:
		return -1, fmt.Errorf("%w: keyslot %d", ErrSlotActive, slot)
	default:
		return -1, fmt.Errorf("%w: keyslot %d has an invalid state", ErrCorrupt, slot)
	}
	if kdf.Type != "" && kdf.Type != KDFPBKDF2 {
		return -1, fmt.Errorf("%w: luks1 keyslots use pbkdf2, not %q", ErrInvalidArgument, kdf.Type)
	}
	if kdf.Hash != "" && !strings.EqualFold(kdf.Hash, v1.hashSpec) {
		return -1, fmt.Errorf("%w: luks1 keyslots use the header hash %q", ErrInvalidArgument, v1.hashSpec)
	}
	kdf.Hash = ""
	p, err := newKDFParams(kdf, KDFPBKDF2, v1.hashSpec, int(v1.keyBytes))
	if err != nil {
		return -1, err
	}
	if err := v1.checkUnchanged(w); err != nil {
		return -1, err
	}
	s, err := v1.storeSlot(w, slot, key, passphrase, p)
	if err != nil {
		return -1, err
	}
	n := v1.clone()
	n.slots[slot] = s
	if err := n.writeHeader(w); err != nil {
		return -1, err
	}
	h.v1 = n
	return slot, nil
}

// KillSlot destroys keyslot slot: its material is overwritten with random
// data, then the header is updated. Removing the last keyslot is allowed
// (the volume then cannot be unlocked by passphrase); callers that want
// QEMU's safety check test ActiveSlots first.
func (h *Header) KillSlot(w io.WriterAt, slot int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.killSlots(w, []int{slot})
}

func (h *Header) killSlots(w io.WriterAt, slots []int) error {
	if h.v2 != nil {
		return h.v2.killSlots(w, slots)
	}
	n := h.v1.clone()
	for _, slot := range slots {
		if slot < 0 || slot >= luks1Slots {
			return fmt.Errorf("%w: keyslot %d is out of range (0-%d)", ErrInvalidArgument, slot, luks1Slots-1)
		}
		if n.slots[slot].active != luks1Enabled {
			return fmt.Errorf("%w: keyslot %d", ErrSlotInactive, slot)
		}
	}
	if err := h.v1.checkUnchanged(w); err != nil {
		return err
	}
	for _, slot := range slots {
		if err := n.wipeSlotArea(w, slot); err != nil {
			return err
		}
		n.slots[slot].active = luks1Disabled
		n.slots[slot].iterations = 0
		n.slots[slot].salt = [saltSize]byte{}
	}
	if err := n.writeHeader(w); err != nil {
		return err
	}
	h.v1 = n
	return nil
}

// RemoveKey destroys the keyslot that passphrase opens and returns its id
// (cryptsetup luksRemoveKey).
//
// The passphrase is tried with the default KDFLimits and cannot be
// interrupted.
func (h *Header) RemoveKey(w io.WriterAt, passphrase []byte) (int, error) {
	key, slot, err := h.Unlock(context.Background(), passphrase, AnySlot, KDFLimits{})
	if err != nil {
		return -1, err
	}
	freeKey(key)
	return slot, h.KillSlot(w, slot)
}

// ChangeKey replaces the passphrase of the keyslot that oldPass opens and
// returns the keyslot now holding newPass. LUKS2 keeps the keyslot id and
// switches to new keyslot material in a single header update; LUKS1 stores
// newPass in a free keyslot first and then destroys the old one (so it
// needs a free keyslot). Either way one of the two passphrases opens the
// volume at every instant.
//
// oldPass is tried with the default KDFLimits and cannot be interrupted.
func (h *Header) ChangeKey(w io.WriterAt, oldPass, newPass []byte, kdf KDF) (int, error) {
	key, slot, err := h.Unlock(context.Background(), oldPass, AnySlot, KDFLimits{})
	if err != nil {
		return -1, err
	}
	defer freeKey(key)
	if h.version == 2 {
		h.mu.Lock()
		defer h.mu.Unlock()
		// The header may have changed between Unlock and Lock.
		s := h.v2.meta.slot(slot)
		if s == nil || s.digest != h.v2.meta.segDigest {
			return -1, fmt.Errorf("%w: keyslot %d", ErrSlotInactive, slot)
		}
		return slot, h.v2.changeKey(w, s, key, newPass, kdf)
	}
	n, err := h.AddKey(w, key, AnySlot, newPass, kdf)
	if err != nil {
		return -1, err
	}
	return n, h.KillSlot(w, slot)
}

// Erase destroys every keyslot (cryptsetup luksErase): afterwards the
// header is still valid but no passphrase opens the volume.
func (h *Header) Erase(w io.WriterAt) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var ids []int
	if h.v1 != nil {
		for i, s := range h.v1.slots {
			if s.active == luks1Enabled {
				ids = append(ids, i)
			}
		}
	} else {
		ids = h.v2.slotIDs()
	}
	if len(ids) == 0 {
		return nil
	}
	return h.killSlots(w, ids)
}

// Info is the header summary QEMU reports as the luks format-specific data
// of a block node (QCryptoBlockInfoLUKS, same JSON names), with LUKS2
// additions marked as extensions.
type Info struct {
	CipherAlg      string     `json:"cipher-alg"`               // "aes-256"
	CipherMode     string     `json:"cipher-mode"`              // "xts"
	IVGenAlg       string     `json:"ivgen-alg"`                // "plain64"
	IVGenHashAlg   string     `json:"ivgen-hash-alg,omitempty"` // "sha256" for essiv
	HashAlg        string     `json:"hash-alg"`                 // LUKS1 hash spec, LUKS2 digest hash
	PayloadOffset  int64      `json:"payload-offset"`           // bytes
	MasterKeyIters uint32     `json:"master-key-iters"`         // volume key digest iterations
	UUID           string     `json:"uuid"`
	Slots          []SlotInfo `json:"slots"`

	Version    int    `json:"version"`             // extension: 1 or 2
	SectorSize int    `json:"sector-size"`         // extension
	Label      string `json:"label,omitempty"`     // extension (LUKS2)
	Subsystem  string `json:"subsystem,omitempty"` // extension (LUKS2)
}

// SlotInfo describes one keyslot. LUKS1 reports all 8; LUKS2 reports the
// keyslots present in the header.
type SlotInfo struct {
	Active    bool   `json:"active"`
	Iters     uint32 `json:"iters,omitempty"`   // PBKDF2 iterations or argon2 time cost
	Stripes   uint32 `json:"stripes,omitempty"` // AF stripes
	KeyOffset int64  `json:"key-offset"`        // bytes from the start of the header device

	ID        int    `json:"keyslot"`             // extension: keyslot id
	KDF       string `json:"kdf,omitempty"`       // extension: pbkdf2, argon2i, argon2id
	MemoryKiB uint32 `json:"memory,omitempty"`    // extension: argon2 memory cost
	Parallel  uint32 `json:"threads,omitempty"`   // extension: argon2 threads
	Priority  string `json:"priority,omitempty"`  // extension: LUKS2 "ignore", "normal" or "prefer"
	KeySize   int    `json:"key-size,omitempty"`  // extension: bytes
	AreaSize  int64  `json:"area-size,omitempty"` // extension: keyslot area bytes
}

// Info returns the header summary. It never contains key material.
func (h *Header) Info() Info {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var in Info
	var spec blockcrypto.Spec
	var keySize int
	if v1 := h.v1; v1 != nil {
		spec, keySize = v1.spec(), int(v1.keyBytes)
		in.Version = 1
		in.HashAlg = v1.hashSpec
		in.PayloadOffset = int64(v1.payloadOffset) * sectorSize
		in.MasterKeyIters = v1.mkDigestIter
		in.UUID = v1.uuid
		in.SectorSize = sectorSize
		for i, s := range v1.slots {
			si := SlotInfo{ID: i, KeyOffset: int64(s.offset) * sectorSize}
			if s.active == luks1Enabled {
				si.Active = true
				si.Iters = s.iterations
				si.Stripes = s.stripes
				si.KDF = KDFPBKDF2
				si.KeySize = keySize
				si.AreaSize = int64(v1.slotSectors() * sectorSize)
			}
			in.Slots = append(in.Slots, si)
		}
	} else {
		m := h.v2.meta
		spec, _ = parseSpec(m.seg.encryption)
		keySize = m.keySize()
		d := m.digs[m.segDigest]
		in.Version = 2
		in.HashAlg = d.hash
		in.PayloadOffset = int64(m.seg.offset)
		in.MasterKeyIters = d.iterations
		in.UUID = h.v2.bin.uuid
		in.SectorSize = m.seg.sectorSize
		in.Label, in.Subsystem = h.v2.bin.label, h.v2.bin.subsystem
		in.Slots = []SlotInfo{}
		for _, id := range h.v2.slotIDs() {
			s := m.slot(id)
			in.Slots = append(in.Slots, SlotInfo{
				Active:    m.boundToSegment(s),
				Iters:     s.kdf.iterations,
				Stripes:   stripes,
				KeyOffset: int64(s.areaOffset),
				ID:        id,
				KDF:       s.kdf.typ,
				MemoryKiB: s.kdf.memoryKiB,
				Parallel:  s.kdf.parallel,
				Priority:  []string{"ignore", "normal", "prefer"}[s.priority],
				KeySize:   s.keySize,
				AreaSize:  int64(s.areaSize),
			})
		}
	}
	bits := keySize * 8
	mode, iv, _ := strings.Cut(spec.Mode, "-")
	if mode == "xts" {
		bits /= 2
	}
	in.CipherAlg = spec.Cipher + "-" + strconv.Itoa(bits)
	in.CipherMode = mode
	in.IVGenAlg, in.IVGenHashAlg, _ = strings.Cut(iv, ":")
	return in
}
