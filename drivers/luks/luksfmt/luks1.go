package luksfmt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"blockd/internal/blockcrypto"
)

// LUKS1 on-disk layout (all integers big-endian). The phdr is 592 bytes;
// cryptsetup reads and writes it as 1024 bytes with zeroed padding.
const (
	luks1PhdrLen   = 592
	luks1HdrLen    = 1024
	luks1Slots     = 8
	luks1Enabled   = 0x00AC71F3
	luks1Disabled  = 0x0000DEAD
	luks1DigestLen = 20
	// luks1AlignSectors is the keyslot alignment of cryptsetup and QEMU,
	// 4096 bytes.
	luks1AlignSectors = 8

	offCipherName    = 8
	offCipherMode    = 40
	offHashSpec      = 72
	offPayloadOffset = 104
	offKeyBytes      = 108
	offMKDigest      = 112
	offMKDigestSalt  = 132
	offMKDigestIter  = 164
	offUUID          = 168
	offKeyblock      = 208
	keyblockLen      = 48
)

var luksMagic = []byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

type luks1Slot struct {
	active     uint32
	iterations uint32
	salt       [saltSize]byte
	offset     uint32 // key material offset in 512-byte sectors
	stripes    uint32
}

// luks1Header is a parsed LUKS1 phdr. raw keeps the bytes as read so that a
// rewrite changes only the fields that were modified.
type luks1Header struct {
	raw           [luks1PhdrLen]byte
	cipherName    string
	cipherMode    string
	hashSpec      string
	payloadOffset uint32 // sectors
	keyBytes      uint32
	mkDigest      [luks1DigestLen]byte
	mkDigestSalt  [saltSize]byte
	mkDigestIter  uint32
	uuid          string
	slots         [luks1Slots]luks1Slot
}

// parseLUKS1 decodes and validates a phdr (buf holds at least luks1HdrLen
// bytes) as cryptsetup's LUKS_read_phdr does. devSize < 0 skips the device
// size check.
func parseLUKS1(buf []byte, devSize int64) (*luks1Header, error) {
	if len(buf) < luks1HdrLen || !bytes.Equal(buf[:6], luksMagic) {
		return nil, ErrNotLUKS
	}
	if v := binary.BigEndian.Uint16(buf[6:8]); v != 1 {
		return nil, fmt.Errorf("%w: luks version %d is not 1", ErrCorrupt, v)
	}
	h := &luks1Header{}
	copy(h.raw[:], buf)
	h.cipherName = cString(buf[offCipherName : offCipherName+31])
	h.cipherMode = cString(buf[offCipherMode : offCipherMode+31])
	h.hashSpec = cString(buf[offHashSpec : offHashSpec+31])
	h.payloadOffset = binary.BigEndian.Uint32(buf[offPayloadOffset:])
	h.keyBytes = binary.BigEndian.Uint32(buf[offKeyBytes:])
	copy(h.mkDigest[:], buf[offMKDigest:])
	copy(h.mkDigestSalt[:], buf[offMKDigestSalt:])
	h.mkDigestIter = binary.BigEndian.Uint32(buf[offMKDigestIter:])
	h.uuid = cString(buf[offUUID : offUUID+39])
	for i := range h.slots {
		kb := buf[offKeyblock+i*keyblockLen:]
		s := &h.slots[i]
		s.active = binary.BigEndian.Uint32(kb[0:])
		s.iterations = binary.BigEndian.Uint32(kb[4:])
		copy(s.salt[:], kb[8:40])
		s.offset = binary.BigEndian.Uint32(kb[40:])
		s.stripes = binary.BigEndian.Uint32(kb[44:])
	}
	if _, err := lookupHash(h.hashSpec); err != nil {
		return nil, err
	}
	if h.keyBytes == 0 {
		return nil, fmt.Errorf("%w: key size is zero", ErrCorrupt)
	}
	if h.keyBytes > MaxKeySize {
		return nil, fmt.Errorf("%w: key size of %d bytes", ErrUnsupported, h.keyBytes)
	}
	if err := h.checkKeyslots(); err != nil {
		return nil, err
	}
	if h.mkDigestIter == 0 {
		return nil, fmt.Errorf("%w: volume key digest iteration count is zero", ErrCorrupt)
	}
	if h.mkDigestIter > MaxPBKDF2Iterations {
		return nil, fmt.Errorf("%w: volume key digest iteration count %d exceeds the limit of %d", ErrUnsupported, h.mkDigestIter, MaxPBKDF2Iterations)
	}
	for i, s := range h.slots {
		if s.active != luks1Enabled {
			continue
		}
		if s.iterations == 0 {
			return nil, fmt.Errorf("%w: keyslot %d iteration count is zero", ErrCorrupt, i)
		}
		if s.iterations > MaxPBKDF2Iterations {
			return nil, fmt.Errorf("%w: keyslot %d iteration count %d exceeds the limit of %d", ErrUnsupported, i, s.iterations, MaxPBKDF2Iterations)
		}
	}
	if need := h.deviceSize(); devSize >= 0 && need > devSize {
		return nil, fmt.Errorf("%w: header device is too small (luks1 requires at least %d bytes)", ErrCorrupt, need)
	}
	return h, nil
}

// slotSectors is the size of one keyslot's material in sectors.
func (h *luks1Header) slotSectors() uint64 {
	return uint64(afSectors(int(h.keyBytes), stripes))
}

// sortedSlots returns the slot indexes ordered by key material offset.
func (h *luks1Header) sortedSlots() []int {
	idx := []int{0, 1, 2, 3, 4, 5, 6, 7}
	slices.SortStableFunc(idx, func(a, b int) int {
		return int(int64(h.slots[a].offset) - int64(h.slots[b].offset))
	})
	return idx
}

// checkKeyslots is cryptsetup's LUKS_check_keyslots: every keyslot (active
// or not) has 4000 stripes, starts after the phdr, ends before the payload
// (unless the header is detached) and does not overlap the next one. Unlike
// QEMU it does not require 4096-byte alignment, so cryptsetup 1.0's
// unaligned layout opens.
func (h *luks1Header) checkKeyslots() error {
	n := h.slotSectors()
	for i, s := range h.slots {
		if s.stripes != stripes {
			return fmt.Errorf("%w: keyslot %d has %d stripes, want %d", ErrCorrupt, i, s.stripes, stripes)
		}
		if uint64(s.offset)*sectorSize < luks1HdrLen {
			return fmt.Errorf("%w: keyslot %d overlaps the header", ErrCorrupt, i)
		}
		if h.payloadOffset == 0 {
			continue
		}
		if h.payloadOffset <= s.offset || uint64(h.payloadOffset) < uint64(s.offset)+n {
			return fmt.Errorf("%w: keyslot %d overlaps the payload", ErrCorrupt, i)
		}
	}
	idx := h.sortedSlots()
	for i := 1; i < len(idx); i++ {
		prev, next := h.slots[idx[i-1]], h.slots[idx[i]]
		if uint64(next.offset) < uint64(prev.offset)+n {
			return fmt.Errorf("%w: keyslot %d overlaps keyslot %d", ErrCorrupt, idx[i-1], idx[i])
		}
	}
	return nil
}

// deviceSize is the size the header device needs: up to the end of the last
// keyslot (cryptsetup's LUKS_device_sectors).
func (h *luks1Header) deviceSize() int64 {
	idx := h.sortedSlots()
	last := h.slots[idx[len(idx)-1]]
	return int64((uint64(last.offset) + h.slotSectors()) * sectorSize)
}

func (h *luks1Header) spec() blockcrypto.Spec {
	return blockcrypto.Spec{Cipher: h.cipherName, Mode: h.cipherMode}
}

// marshal returns the 1024 bytes to write at offset 0.
func (h *luks1Header) marshal() []byte {
	buf := make([]byte, luks1HdrLen)
	copy(buf, h.raw[:])
	binary.BigEndian.PutUint32(buf[offPayloadOffset:], h.payloadOffset)
	binary.BigEndian.PutUint32(buf[offKeyBytes:], h.keyBytes)
	copy(buf[offMKDigest:], h.mkDigest[:])
	copy(buf[offMKDigestSalt:], h.mkDigestSalt[:])
	binary.BigEndian.PutUint32(buf[offMKDigestIter:], h.mkDigestIter)
	for i, s := range h.slots {
		kb := buf[offKeyblock+i*keyblockLen:]
		binary.BigEndian.PutUint32(kb[0:], s.active)
		binary.BigEndian.PutUint32(kb[4:], s.iterations)
		copy(kb[8:40], s.salt[:])
		binary.BigEndian.PutUint32(kb[40:], s.offset)
		binary.BigEndian.PutUint32(kb[44:], s.stripes)
	}
	return buf
}

// verifyKey checks a volume key against the master key digest.
func (h *luks1Header) verifyKey(key []byte) error {
	return h.verifyKeyContext(context.Background(), key)
}

// verifyKeyContext is verifyKey stopping with ctx's error when ctx is done.
func (h *luks1Header) verifyKeyContext(ctx context.Context, key []byte) error {
	if len(key) != int(h.keyBytes) {
		return fmt.Errorf("%w: key is %d bytes, header says %d", ErrWrongKey, len(key), h.keyBytes)
	}
	hf, err := lookupHash(h.hashSpec)
	if err != nil {
		return err
	}
	d, err := pbkdf2KeyContext(ctx, hf, key, h.mkDigestSalt[:], int(h.mkDigestIter), luks1DigestLen)
	if err != nil {
		return err
	}
	defer clear(d)
	if !constantTimeEqual(d, h.mkDigest[:]) {
		return ErrWrongKey
	}
	return nil
}

// errMismatch is the internal result of a keyslot that did not open with
// the passphrase.
var errMismatch = errors.New("passphrase does not match")

// openSlot tries one active keyslot. It returns errMismatch when the
// passphrase is wrong, an ErrKDFLimit error (before any work) when the
// keyslot costs more than lim allows, and ctx's error when ctx is done.
func (h *luks1Header) openSlot(ctx context.Context, r io.ReaderAt, i int, pass []byte, lim KDFLimits) ([]byte, error) {
	s := h.slots[i]
	hf, err := lookupHash(h.hashSpec)
	if err != nil {
		return nil, err
	}
	kdf := kdfParams{typ: KDFPBKDF2, hash: h.hashSpec, iterations: s.iterations, salt: s.salt[:]}
	digest := pbkdf2Cost{h.hashSpec, h.mkDigestIter, luks1DigestLen}
	if err := checkCost(fmt.Sprintf("keyslot %d", i), &kdf, int(h.keyBytes), digest, lim); err != nil {
		return nil, err
	}
	derived, err := kdf.derive(ctx, pass, int(h.keyBytes))
	if err != nil {
		return nil, err
	}
	defer freeKey(derived)
	area := keyBuf(int(h.slotSectors() * sectorSize))
	defer freeKey(area)
	if err := readFull(r, area, int64(s.offset)*sectorSize); err != nil {
		return nil, fmt.Errorf("reading keyslot %d: %w", i, err)
	}
	if err := cryptArea(h.spec(), derived, area, false); err != nil {
		return nil, err
	}
	key := keyBuf(int(h.keyBytes))
	afMerge(hf, area, key, stripes)
	if err := h.verifyKeyContext(ctx, key); err != nil {
		freeKey(key)
		if errors.Is(err, ErrWrongKey) {
			return nil, errMismatch
		}
		return nil, err
	}
	return key, nil
}

// cryptArea encrypts or decrypts keyslot material in place with a keyslot
// key: 512-byte sectors numbered from 0 at the start of the area.
func cryptArea(spec blockcrypto.Spec, key, area []byte, encrypt bool) error {
	c, err := blockcrypto.New(spec, key)
	if err != nil {
		return fmt.Errorf("%w: keyslot cipher %s-%s: %v", ErrUnsupported, spec.Cipher, spec.Mode, err)
	}
	defer c.Wipe()
	if encrypt {
		err = c.Encrypt(area, area, 0, sectorSize)
	} else {
		err = c.Decrypt(area, area, 0, sectorSize)
	}
	if err != nil {
		return fmt.Errorf("keyslot encryption: %w", err)
	}
	return nil
}

// storeSlot derives a keyslot key from pass, splits and encrypts key into
// slot i's area and returns the updated slot (not yet in the header).
func (h *luks1Header) storeSlot(w io.WriterAt, i int, key, pass []byte, kdf *kdfParams) (luks1Slot, error) {
	s := h.slots[i]
	hf, err := lookupHash(h.hashSpec)
	if err != nil {
		return s, err
	}
	derived, err := kdf.derive(context.Background(), pass, int(h.keyBytes))
	if err != nil {
		return s, err
	}
	defer freeKey(derived)
	area := keyBuf(int(h.slotSectors() * sectorSize))
	defer freeKey(area)
	if err := afSplit(hf, key, area, stripes); err != nil {
		return s, err
	}
	if err := cryptArea(h.spec(), derived, area, true); err != nil {
		return s, err
	}
	if err := writeAll(w, area, int64(s.offset)*sectorSize); err != nil {
		return s, fmt.Errorf("writing keyslot %d: %w", i, err)
	}
	if err := syncWriter(w); err != nil {
		return s, err
	}
	s.active = luks1Enabled
	s.iterations = kdf.iterations
	copy(s.salt[:], kdf.salt)
	return s, nil
}

// writeHeader writes the phdr and syncs.
func (h *luks1Header) writeHeader(w io.WriterAt) error {
	if err := writeAll(w, h.marshal(), 0); err != nil {
		return fmt.Errorf("writing luks1 header: %w", err)
	}
	return syncWriter(w)
}

// clone returns a deep copy (all fields are values).
func (h *luks1Header) clone() *luks1Header {
	c := *h
	return &c
}

// checkUnchanged refuses to update a header that changed on disk since it
// was read (another program or another Header on the same device), if w can
// also read.
func (h *luks1Header) checkUnchanged(w io.WriterAt) error {
	r, ok := w.(io.ReaderAt)
	if !ok {
		return nil
	}
	b := make([]byte, luks1PhdrLen)
	if err := readFull(r, b, 0); err != nil {
		return fmt.Errorf("reading luks1 header: %w", err)
	}
	if !bytes.Equal(b, h.marshal()[:luks1PhdrLen]) {
		return ErrConcurrentUpdate
	}
	return nil
}

// wipeSlotArea overwrites keyslot i's material with random bytes.
func (h *luks1Header) wipeSlotArea(w io.WriterAt, i int) error {
	off := int64(h.slots[i].offset) * sectorSize
	if err := writeRandom(w, off, int64(h.slotSectors()*sectorSize)); err != nil {
		return fmt.Errorf("wiping keyslot %d: %w", i, err)
	}
	return syncWriter(w)
}
