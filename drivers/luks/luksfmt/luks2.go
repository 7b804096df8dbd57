package luksfmt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// luks2Header is an opened LUKS2 header: the binary header fields of the
// copy in use, both copies' salts and states, and the validated metadata.
type luks2Header struct {
	bin      luks2Bin // of the copy in use; hdrOffset is rewritten per copy
	salts    [2][luks2SaltLen]byte
	states   [2]CopyState
	problems [2]error // why a copy is not CopyOK (nil if it is)
	rawArea  []byte   // JSON area of the copy in use, as read
	meta     *luks2Meta
}

// copyResult is one header copy as read by openLUKS2.
type copyResult struct {
	bin     *luks2Bin
	area    []byte
	meta    *luks2Meta
	err     error // binary header, checksum or I/O problem
	metaErr error // JSON problem (ErrCorrupt or ErrUnsupported)
}

func (c *copyResult) valid() bool {
	return c.err == nil && (c.metaErr == nil || errors.Is(c.metaErr, ErrUnsupported))
}

func (c *copyResult) state() CopyState {
	switch {
	case c.err != nil && errors.Is(c.err, errCopyIO):
		return CopyUnreadable
	case c.err != nil || (c.metaErr != nil && !errors.Is(c.metaErr, ErrUnsupported)):
		return CopyCorrupt
	}
	return CopyOK
}

func readCopy(r io.ReaderAt, devSize, off int64, secondary bool) *copyResult {
	c := &copyResult{}
	c.bin, c.area, c.err = readLUKS2Copy(r, devSize, off, secondary)
	if c.err != nil {
		return c
	}
	text, err := extractJSON(c.area)
	if err == nil {
		c.meta, err = parseLUKS2Meta(text, c.bin.hdrSize)
	}
	c.metaErr = err
	return c
}

// openLUKS2 reads both header copies as cryptsetup's LUKS2_disk_hdr_read
// does and uses the valid one with the higher sequence id. It returns
// ErrNotLUKS if neither copy has a LUKS2 binary header.
func openLUKS2(r io.ReaderAt, devSize int64) (*luks2Header, error) {
	c1 := readCopy(r, devSize, 0, false)
	var c2 *copyResult
	if c1.err == nil {
		c2 = readCopy(r, devSize, int64(c1.bin.hdrSize), true)
	} else {
		for _, off := range luks2Offsets {
			c2 = readCopy(r, devSize, off, true)
			if c2.err == nil {
				break
			}
		}
	}
	if c1.err != nil && c2.err != nil {
		if bytes.Equal(primaryMagic(r), luksMagic) {
			return nil, fmt.Errorf("%w: both luks2 header copies are damaged (primary: %v; secondary: %v)", ErrCorrupt, c1.err, c2.err)
		}
		return nil, ErrNotLUKS
	}
	var use *copyResult
	switch {
	case c1.valid() && c2.valid():
		use = c1
		if c2.bin.seqid > c1.bin.seqid {
			use = c2
		}
	case c1.valid():
		use = c1
	case c2.valid():
		use = c2
	default:
		e := c1.metaErr
		if e == nil {
			e = c1.err
		}
		e2 := c2.metaErr
		if e2 == nil {
			e2 = c2.err
		}
		m1, m2 := trimKind(e), trimKind(e2)
		if m1 == m2 {
			return nil, fmt.Errorf("%w: %s (both luks2 header copies)", ErrCorrupt, m1)
		}
		return nil, fmt.Errorf("%w: both luks2 header copies are invalid (primary: %s; secondary: %s)", ErrCorrupt, m1, m2)
	}
	if use.metaErr != nil {
		return nil, use.metaErr
	}
	h := &luks2Header{bin: *use.bin, rawArea: use.area, meta: use.meta}
	for i, c := range []*copyResult{c1, c2} {
		h.states[i] = c.state()
		switch {
		case h.states[i] != CopyOK:
			if c.err != nil {
				h.problems[i] = c.err
			} else {
				h.problems[i] = c.metaErr
			}
		case c.bin.seqid < use.bin.seqid:
			h.states[i] = CopyObsolete
			h.problems[i] = fmt.Errorf("sequence id %d is older than %d", c.bin.seqid, use.bin.seqid)
		}
		if c.bin != nil && h.states[i] == CopyOK {
			h.salts[i] = c.bin.salt
		} else {
			salt, err := randomBytes(luks2SaltLen)
			if err != nil {
				return nil, err
			}
			copy(h.salts[i][:], salt)
		}
	}
	if need := h.meta.hdrAndAreasSize(); devSize >= 0 && need > uint64(devSize) {
		return nil, fmt.Errorf("%w: header device is too small (luks2 requires at least %d bytes)", ErrCorrupt, need)
	}
	return h, nil
}

// trimKind returns an error's message without the sentinel prefix, for
// combining the reasons of both header copies.
func trimKind(err error) string {
	s := err.Error()
	for _, k := range []error{ErrCorrupt, ErrUnsupported} {
		s = strings.TrimPrefix(s, k.Error()+": ")
	}
	return s
}

// withContext adds context to an error's detail, keeping the sentinel's
// message first ("unsupported luks feature: keyslot 3: ...").
func withContext(err error, ctx string) error {
	for _, k := range []error{ErrCorrupt, ErrUnsupported} {
		if errors.Is(err, k) && strings.HasPrefix(err.Error(), k.Error()+": ") {
			return fmt.Errorf("%w: %s: %s", k, ctx, trimKind(err))
		}
	}
	return fmt.Errorf("%s: %w", ctx, err)
}

func primaryMagic(r io.ReaderAt) []byte {
	b := make([]byte, 8)
	if readFull(r, b, 0) != nil {
		return nil
	}
	if v := binary.BigEndian.Uint16(b[6:]); v != 2 {
		return nil
	}
	return b[:6]
}

// verifyDigest checks a key against digest d; it stops with ctx's error
// when ctx is done.
func verifyDigest(ctx context.Context, d *luks2Digest, key []byte) error {
	hf, err := lookupHash(d.hash)
	if err != nil {
		return err
	}
	got, err := pbkdf2KeyContext(ctx, hf, key, d.salt, int(d.iterations), len(d.digest))
	if err != nil {
		return err
	}
	defer clear(got)
	if !constantTimeEqual(got, d.digest) {
		return ErrWrongKey
	}
	return nil
}

func (h *luks2Header) verifyKey(key []byte) error {
	if ks := h.meta.keySize(); ks != 0 && ks != len(key) {
		return fmt.Errorf("%w: key is %d bytes, keyslots hold %d", ErrWrongKey, len(key), ks)
	}
	return verifyDigest(context.Background(), h.meta.digs[h.meta.segDigest], key)
}

// openSlot tries one keyslot; errMismatch means a wrong passphrase, an
// ErrKDFLimit error (before any work) a keyslot costing more than lim
// allows, ctx's error that ctx is done.
func (h *luks2Header) openSlot(ctx context.Context, r io.ReaderAt, s *luks2Keyslot, pass []byte, lim KDFLimits) ([]byte, error) {
	hf, err := lookupHash(s.afHash)
	if err != nil {
		return nil, err
	}
	spec, err := parseSpec(s.areaEnc)
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("keyslot %d", s.id)
	d := h.meta.digs[s.digest]
	if err := checkCost(name, &s.kdf, s.areaKeySize, pbkdf2Cost{d.hash, d.iterations, len(d.digest)}, lim); err != nil {
		if errors.Is(err, ErrKDFLimit) {
			return nil, err // names the keyslot
		}
		return nil, withContext(err, name)
	}
	derived, err := s.kdf.derive(ctx, pass, s.areaKeySize)
	if err != nil {
		return nil, withContext(err, name)
	}
	defer freeKey(derived)
	area := keyBuf(afSectors(s.keySize, stripes) * sectorSize)
	defer freeKey(area)
	if err := readFull(r, area, int64(s.areaOffset)); err != nil {
		return nil, fmt.Errorf("reading keyslot %d: %w", s.id, err)
	}
	if err := cryptArea(spec, derived, area, false); err != nil {
		return nil, err
	}
	key := keyBuf(s.keySize)
	afMerge(hf, area, key, stripes)
	if err := verifyDigest(ctx, d, key); err != nil {
		freeKey(key)
		if errors.Is(err, ErrWrongKey) {
			return nil, errMismatch
		}
		return nil, err
	}
	return key, nil
}

// unlockOrder lists the keyslots an any-slot unlock tries: those holding the
// data segment's key, "prefer" priority first, then "normal", each in JSON
// order; "ignore" keyslots are skipped (cryptsetup's LUKS2_keyslot_open).
func (h *luks2Header) unlockOrder() []*luks2Keyslot {
	var out []*luks2Keyslot
	for _, prio := range []int{2, 1} {
		for _, s := range h.meta.slots {
			if s.priority == prio && h.meta.boundToSegment(s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// storeArea derives the keyslot key and writes key's split, encrypted
// material to [off, off+size) with the data segment's cipher.
func (h *luks2Header) storeArea(w io.WriterAt, key, pass []byte, kdf *kdfParams, afHash string, off uint64) error {
	hf, err := lookupHash(afHash)
	if err != nil {
		return err
	}
	spec, err := parseSpec(h.meta.seg.encryption)
	if err != nil {
		return err
	}
	derived, err := kdf.derive(context.Background(), pass, len(key))
	if err != nil {
		return err
	}
	defer freeKey(derived)
	area := keyBuf(afSectors(len(key), stripes) * sectorSize)
	defer freeKey(area)
	if err := afSplit(hf, key, area, stripes); err != nil {
		return err
	}
	if err := cryptArea(spec, derived, area, true); err != nil {
		return err
	}
	if err := writeAll(w, area, int64(off)); err != nil {
		return fmt.Errorf("writing keyslot area: %w", err)
	}
	return syncWriter(w)
}

// newKeyslot allocates an area for a new keyslot holding key and returns
// its JSON (not yet in the metadata) and area offset.
func (h *luks2Header) newKeyslot(key []byte, opts KDF) (*jobject, uint64, *kdfParams, string, error) {
	areaSize := (uint64(len(key))*stripes + 4095) / 4096 * 4096
	off, err := h.meta.findAreaGap(areaSize)
	if err != nil {
		return nil, 0, nil, "", err
	}
	afHash := opts.Hash
	if afHash == "" {
		afHash = DefaultHash
	}
	kdf, err := newKDFParams(opts, KDFArgon2id, afHash, len(key))
	if err != nil {
		return nil, 0, nil, "", err
	}
	o := newKeyslotJSON(len(key), afHash, h.meta.seg.encryption, off, areaSize, kdf)
	return o, off, kdf, afHash, nil
}

// writeMeta writes new metadata to both copies with the next sequence id,
// primary first, as cryptsetup's LUKS2_disk_hdr_write. If w can also read,
// the primary's sequence id on disk is checked first so that a concurrent
// update by another program is not overwritten.
func (h *luks2Header) writeMeta(w io.WriterAt, m *luks2Meta) error {
	area, err := m.jsonArea()
	if err != nil {
		return err
	}
	if err := h.checkSeqid(w); err != nil {
		return err
	}
	// A copy left behind (by a crash between the two copies of an earlier
	// update) is brought up to the copy in use first: were the update now
	// interrupted inside the primary copy, the secondary is what readers
	// fall back to, and it must hold the last completed state, not an
	// older one (cryptsetup recovers a stale copy before writing too).
	if h.states != [2]CopyState{CopyOK, CopyOK} {
		if err := h.repair(w); err != nil {
			return err
		}
		if err := syncWriter(w); err != nil {
			return err
		}
	}
	b := h.bin
	b.seqid++
	for i := range 2 {
		b.salt = h.salts[i]
		if err := writeLUKS2Copy(w, &b, area, i == 1); err != nil {
			return fmt.Errorf("writing luks2 header copy %d: %w", i+1, err)
		}
	}
	h.bin.seqid = b.seqid
	h.meta = m
	h.rawArea = area
	h.states = [2]CopyState{CopyOK, CopyOK}
	h.problems = [2]error{}
	return nil
}

// checkSeqid refuses to update a header that another program changed since
// it was read: if w can also read, the primary copy's sequence id on disk
// must still be the one in memory (cryptsetup's LUKS2_check_sequence_id).
// Updates call it before their first write.
func (h *luks2Header) checkSeqid(w io.WriterAt) error {
	r, ok := w.(io.ReaderAt)
	if !ok || h.states[0] != CopyOK {
		return nil
	}
	b := make([]byte, 512)
	if err := readFull(r, b, 0); err != nil {
		return fmt.Errorf("reading luks2 header: %w", err)
	}
	if bytes.Equal(b[:6], luksMagic) && binary.BigEndian.Uint16(b[off2Version:]) == 2 &&
		cString(b[off2UUID:off2UUID+luks2UUIDLen-1]) == h.bin.uuid &&
		binary.BigEndian.Uint64(b[off2Seqid:]) != h.bin.seqid {
		return ErrConcurrentUpdate
	}
	return nil
}

// addKey stores key in keyslot id (-1: the lowest free id).
func (h *luks2Header) addKey(w io.WriterAt, key []byte, id int, pass []byte, opts KDF) (int, error) {
	if err := h.verifyKey(key); err != nil {
		return -1, err
	}
	if id < 0 {
		for id = 0; id < luks2MaxKeyslots && h.meta.slot(id) != nil; id++ {
		}
		if id == luks2MaxKeyslots {
			return -1, ErrNoFreeSlot
		}
	} else if id >= luks2MaxKeyslots {
		return -1, fmt.Errorf("%w: keyslot %d is out of range (0-%d)", ErrInvalidArgument, id, luks2MaxKeyslots-1)
	} else if h.meta.slot(id) != nil {
		return -1, fmt.Errorf("%w: keyslot %d", ErrSlotActive, id)
	}
	ko, off, kdf, afHash, err := h.newKeyslot(key, opts)
	if err != nil {
		return -1, err
	}
	m, err := h.meta.clone()
	if err != nil {
		return -1, err
	}
	m.keyslots.setObj(strconv.Itoa(id), ko)
	if err := editRefs(m.digests, id, true, func(k string) bool { return k == strconv.Itoa(h.meta.segDigest) }); err != nil {
		return -1, err
	}
	if m, err = m.clone(); err != nil {
		return -1, err
	}
	if _, err := m.jsonArea(); err != nil {
		return -1, err
	}
	if err := h.checkSeqid(w); err != nil {
		return -1, err
	}
	if err := h.storeArea(w, key, pass, kdf, afHash, off); err != nil {
		return -1, err
	}
	return id, h.writeMeta(w, m)
}

// killSlots removes keyslots: their areas are overwritten with random data
// first, then the keyslots and every reference to them (digests, tokens)
// are removed from the metadata.
func (h *luks2Header) killSlots(w io.WriterAt, ids []int) error {
	m, err := h.meta.clone()
	if err != nil {
		return err
	}
	var wipe []*luks2Keyslot
	for _, id := range ids {
		s := h.meta.slot(id)
		if s == nil {
			return fmt.Errorf("%w: keyslot %d", ErrSlotInactive, id)
		}
		wipe = append(wipe, s)
		m.keyslots.del(strconv.Itoa(id))
		all := func(string) bool { return true }
		if err := editRefs(m.digests, id, false, all); err != nil {
			return err
		}
		if err := editRefs(m.tokens, id, false, all); err != nil {
			return err
		}
	}
	if m, err = m.clone(); err != nil {
		return err
	}
	if err := h.checkSeqid(w); err != nil {
		return err
	}
	for _, s := range wipe {
		if err := writeRandom(w, int64(s.areaOffset), int64(s.areaSize)); err != nil {
			return fmt.Errorf("wiping keyslot %d: %w", s.id, err)
		}
	}
	if err := syncWriter(w); err != nil {
		return err
	}
	return h.writeMeta(w, m)
}

// changeKey replaces keyslot s (which holds key) with a new keyslot under
// the same id protected by pass. The new material goes to a free area and
// the header switches to it in one update, so at every instant either the
// old or the new passphrase opens the keyslot; the old area is wiped last.
func (h *luks2Header) changeKey(w io.WriterAt, s *luks2Keyslot, key, pass []byte, opts KDF) error {
	ko, off, kdf, afHash, err := h.newKeyslot(key, opts)
	if err != nil {
		return err
	}
	m, err := h.meta.clone()
	if err != nil {
		return err
	}
	sid := strconv.Itoa(s.id)
	if old, err := m.keyslots.obj(sid); err == nil {
		if p, ok := old.get("priority"); ok {
			ko.set("priority", p)
		}
	}
	m.keyslots.setObj(sid, ko)
	if m, err = m.clone(); err != nil {
		return err
	}
	if _, err := m.jsonArea(); err != nil {
		return err
	}
	if err := h.checkSeqid(w); err != nil {
		return err
	}
	if err := h.storeArea(w, key, pass, kdf, afHash, off); err != nil {
		return err
	}
	if err := h.writeMeta(w, m); err != nil {
		return err
	}
	if err := writeRandom(w, int64(s.areaOffset), int64(s.areaSize)); err != nil {
		return fmt.Errorf("wiping old keyslot %d area: %w", s.id, err)
	}
	return syncWriter(w)
}

// repair rewrites copies that are not CopyOK from the copy in use, with the
// same sequence id and a fresh salt, as cryptsetup's automatic recovery.
func (h *luks2Header) repair(w io.WriterAt) error {
	for i := range 2 {
		if h.states[i] == CopyOK {
			continue
		}
		salt, err := randomBytes(luks2SaltLen)
		if err != nil {
			return err
		}
		copy(h.salts[i][:], salt)
		b := h.bin
		b.salt = h.salts[i]
		if err := writeLUKS2Copy(w, &b, h.rawArea, i == 1); err != nil {
			return fmt.Errorf("repairing luks2 header copy %d: %w", i+1, err)
		}
		h.states[i] = CopyOK
		h.problems[i] = nil
	}
	return nil
}

// slotIDs returns the ids of all keyslots in ascending order.
func (h *luks2Header) slotIDs() []int {
	var ids []int
	for _, s := range h.meta.slots {
		ids = append(ids, s.id)
	}
	slices.Sort(ids)
	return ids
}
