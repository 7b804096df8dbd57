package luksfmt

import (
	"fmt"
	"io"
	"strings"

	"blockd/internal/blockcrypto"
)

// LUKS2 layout defaults (cryptsetup 2.6's luksFormat).
const (
	// DefaultLUKS2HeaderSize is the size of one LUKS2 header copy (binary
	// header and JSON area), 16 KiB.
	DefaultLUKS2HeaderSize = 0x4000
	// DefaultLUKS2DataOffset is where the payload starts after an embedded
	// LUKS2 header: both header copies and the keyslots area, 16 MiB.
	DefaultLUKS2DataOffset = 0x1000000
)

// CreateOptions describes a new LUKS volume. The zero value (plus a
// passphrase) gives what qemu-img makes by default: LUKS1, aes-256 in
// xts-plain64, sha256, PBKDF2 benchmarked to 2 s, embedded header.
type CreateOptions struct {
	// Version is 1 or 2; 0 means 1.
	Version int
	// Cipher and Mode name the payload cipher, e.g. "aes" and
	// "xts-plain64" (the defaults) or "cbc-essiv:sha256".
	Cipher string
	Mode   string
	// KeySize is the volume key size in bytes; 0 means 64 for xts modes
	// (aes-256) and 32 otherwise.
	KeySize int
	// Hash is the header hash: LUKS1's hash spec, LUKS2's digest and AF
	// hash. Default sha256.
	Hash string
	// KDF configures keyslot 0 (defaults: PBKDF2 for LUKS1, argon2id for
	// LUKS2, 2 s). Iterations set means no benchmark, also for the volume
	// key digest (1000 iterations).
	KDF KDF
	// Passphrase protects keyslot 0. The caller keeps ownership.
	Passphrase []byte
	// Key is the volume key to use; nil means a random one.
	Key []byte
	// UUID in 8-4-4-4-12 form; empty means a random one.
	UUID string
	// Detached makes a header for a separate device: the payload starts at
	// offset 0 of the data device (unless PayloadOffset says otherwise).
	Detached bool
	// PayloadOffset, in bytes, overrides where the payload starts on the
	// data device. For an embedded header it must not be inside the
	// header. It must be a multiple of 512 (LUKS1) or of the sector size
	// (LUKS2).
	PayloadOffset int64
	// SectorSize is the LUKS2 encryption sector size, 512 (default) to
	// 4096. LUKS1 always uses 512.
	SectorSize int
	// Label and Subsystem are LUKS2 header labels (at most 47 bytes).
	Label, Subsystem string
	// MetadataSize is the LUKS2 header copy size: 16 KiB (default) to
	// 4 MiB, a power of two.
	MetadataSize int64
	// KeyslotsSize is the LUKS2 keyslots area size, a multiple of 4096 up
	// to 128 MiB; 0 means up to the payload offset, or 16 MiB minus both
	// header copies when the payload offset is 0.
	KeyslotsSize int64
}

// Create writes a new LUKS header with keyslot 0 holding opts.Passphrase to
// w and returns the opened header and the volume key, in key memory (the
// caller must release it with Wipe). It writes only the metadata region
// [0, HeaderSize()): LUKS1 gets QEMU's layout (keyslots from 4096 bytes, each aligned to 4096, the
// payload right after the last one; 2068480 bytes for a 512-bit key), LUKS2
// gets cryptsetup's (two 16 KiB header copies, keyslots area, payload at
// 16 MiB). Unused keyslot space is filled with random data. If w also
// implements io.ReaderAt, the returned header can Unlock.
func Create(w io.WriterAt, opts CreateOptions) (*Header, []byte, error) {
	if opts.Cipher == "" {
		opts.Cipher = "aes"
	}
	if opts.Mode == "" {
		opts.Mode = "xts-plain64"
	}
	if opts.Hash == "" {
		opts.Hash = DefaultHash
	}
	opts.Hash = strings.ToLower(opts.Hash)
	if _, err := lookupHash(opts.Hash); err != nil {
		return nil, nil, err
	}
	if opts.KeySize == 0 {
		opts.KeySize = 32
		if strings.HasPrefix(opts.Mode, "xts") {
			opts.KeySize = 64
		}
	}
	if opts.Key != nil && len(opts.Key) != opts.KeySize {
		return nil, nil, fmt.Errorf("%w: volume key is %d bytes, key size is %d", ErrInvalidArgument, len(opts.Key), opts.KeySize)
	}
	if opts.KeySize < 1 || opts.KeySize > MaxKeySize {
		return nil, nil, fmt.Errorf("%w: key size %d", ErrInvalidArgument, opts.KeySize)
	}
	if opts.PayloadOffset < 0 || opts.PayloadOffset%sectorSize != 0 {
		return nil, nil, fmt.Errorf("%w: payload offset %d is not a multiple of 512", ErrInvalidArgument, opts.PayloadOffset)
	}
	if opts.UUID == "" {
		u, err := newUUID()
		if err != nil {
			return nil, nil, err
		}
		opts.UUID = u
	} else {
		u, err := canonicalUUID(opts.UUID)
		if err != nil {
			return nil, nil, err
		}
		opts.UUID = u
	}
	var key []byte
	if opts.Key != nil {
		key = keyBuf(len(opts.Key))
		copy(key, opts.Key)
	} else {
		var err error
		if key, err = randomKey(opts.KeySize); err != nil {
			return nil, nil, err
		}
	}
	spec := blockcrypto.Spec{Cipher: opts.Cipher, Mode: opts.Mode}
	c, err := blockcrypto.New(spec, key)
	if err != nil {
		freeKey(key)
		return nil, nil, fmt.Errorf("%w: cipher %s-%s with a %d-bit key: %v", ErrUnsupported, opts.Cipher, opts.Mode, 8*opts.KeySize, err)
	}
	c.Wipe()
	r, _ := w.(io.ReaderAt)
	var h *Header
	switch opts.Version {
	case 0, 1:
		h, err = createLUKS1(w, key, &opts)
	case 2:
		h, err = createLUKS2(w, key, &opts)
	default:
		err = fmt.Errorf("%w: luks version %d", ErrInvalidArgument, opts.Version)
	}
	if err != nil {
		freeKey(key)
		return nil, nil, err
	}
	h.r = r
	return h, key, nil
}

// digestIterations is the PBKDF2 iteration count of a new volume key
// digest: 1000 when keyslot iterations are forced, else what costs 125 ms.
func digestIterations(kdf KDF, hash string, keyLen int) (uint32, error) {
	if kdf.Iterations != 0 {
		return minPBKDF2Iterations, nil
	}
	hf, err := lookupHash(hash)
	if err != nil {
		return 0, err
	}
	return pbkdf2Iterations(hf, keyLen, digestIterTime)
}

func createLUKS1(w io.WriterAt, key []byte, opts *CreateOptions) (*Header, error) {
	if opts.SectorSize != 0 && opts.SectorSize != sectorSize {
		return nil, fmt.Errorf("%w: luks1 sector size is always 512", ErrInvalidArgument)
	}
	if opts.Label != "" || opts.Subsystem != "" || opts.MetadataSize != 0 || opts.KeyslotsSize != 0 {
		return nil, fmt.Errorf("%w: labels and metadata sizes are luks2 options", ErrInvalidArgument)
	}
	if opts.KDF.Type != "" && opts.KDF.Type != KDFPBKDF2 {
		return nil, fmt.Errorf("%w: luks1 keyslots use pbkdf2, not %q", ErrInvalidArgument, opts.KDF.Type)
	}
	if len(opts.Cipher) > 31 || len(opts.Mode) > 31 || len(opts.Hash) > 31 {
		return nil, fmt.Errorf("%w: cipher, mode or hash name too long for a luks1 header", ErrInvalidArgument)
	}
	if opts.KDF.Hash != "" && !strings.EqualFold(opts.KDF.Hash, opts.Hash) {
		return nil, fmt.Errorf("%w: luks1 keyslots use the header hash %q", ErrInvalidArgument, opts.Hash)
	}
	h := &luks1Header{
		cipherName: opts.Cipher,
		cipherMode: opts.Mode,
		hashSpec:   opts.Hash,
		keyBytes:   uint32(len(key)),
		uuid:       opts.UUID,
	}
	copy(h.raw[:], luksMagic)
	h.raw[7] = 1
	putCString(h.raw[offCipherName:offCipherName+32], h.cipherName)
	putCString(h.raw[offCipherMode:offCipherMode+32], h.cipherMode)
	putCString(h.raw[offHashSpec:offHashSpec+32], h.hashSpec)
	putCString(h.raw[offUUID:offUUID+40], h.uuid)

	slotSectors := (uint64(afSectors(len(key), stripes)) + luks1AlignSectors - 1) / luks1AlignSectors * luks1AlignSectors
	for i := range h.slots {
		h.slots[i] = luks1Slot{
			active:  luks1Disabled,
			offset:  uint32(luks1AlignSectors + uint64(i)*slotSectors),
			stripes: stripes,
		}
	}
	end := luks1AlignSectors + luks1Slots*slotSectors
	switch {
	case opts.PayloadOffset != 0:
		p := uint64(opts.PayloadOffset) / sectorSize
		if p > uint64(^uint32(0)) {
			return nil, fmt.Errorf("%w: payload offset %d must be 0 or at least the header size %d", ErrInvalidArgument, opts.PayloadOffset, end*sectorSize)
		}
		h.payloadOffset = uint32(p)
	case opts.Detached:
		h.payloadOffset = 0
	default:
		h.payloadOffset = uint32(end)
	}
	if h.payloadOffset != 0 && uint64(h.payloadOffset) < end {
		// A detached header with a payload offset inside the keyslots would
		// fail cryptsetup's keyslot checks.
		return nil, fmt.Errorf("%w: payload offset %d must be 0 or at least the header size %d", ErrInvalidArgument, opts.PayloadOffset, end*sectorSize)
	}

	salt, err := randomBytes(saltSize)
	if err != nil {
		return nil, err
	}
	copy(h.mkDigestSalt[:], salt)
	if h.mkDigestIter, err = digestIterations(opts.KDF, h.hashSpec, len(key)); err != nil {
		return nil, err
	}
	hf, _ := lookupHash(h.hashSpec)
	d := pbkdf2Key(hf, key, h.mkDigestSalt[:], int(h.mkDigestIter), luks1DigestLen)
	copy(h.mkDigest[:], d)
	clear(d)

	kdfOpts := opts.KDF
	kdfOpts.Type, kdfOpts.Hash = KDFPBKDF2, ""
	kdf, err := newKDFParams(kdfOpts, KDFPBKDF2, h.hashSpec, len(key))
	if err != nil {
		return nil, err
	}
	if err := writeZeroes(w, 0, luks1AlignSectors*sectorSize); err != nil {
		return nil, fmt.Errorf("writing luks1 header: %w", err)
	}
	if err := writeRandom(w, luks1AlignSectors*sectorSize, int64((end-luks1AlignSectors)*sectorSize)); err != nil {
		return nil, fmt.Errorf("writing luks1 keyslots: %w", err)
	}
	s, err := h.storeSlot(w, 0, key, opts.Passphrase, kdf)
	if err != nil {
		return nil, err
	}
	h.slots[0] = s
	if err := h.writeHeader(w); err != nil {
		return nil, err
	}
	// Validate what was written the way Open will.
	v1, err := parseLUKS1(h.marshal(), -1)
	if err != nil {
		return nil, fmt.Errorf("created luks1 header does not validate: %w", err)
	}
	return &Header{version: 1, v1: v1}, nil
}

func createLUKS2(w io.WriterAt, key []byte, opts *CreateOptions) (*Header, error) {
	hdrSize := uint64(opts.MetadataSize)
	if hdrSize == 0 {
		hdrSize = DefaultLUKS2HeaderSize
	}
	if !validHdrSize(hdrSize) {
		return nil, fmt.Errorf("%w: luks2 header size %d (must be a power of two from 16 KiB to 4 MiB)", ErrInvalidArgument, opts.MetadataSize)
	}
	ss := opts.SectorSize
	if ss == 0 {
		ss = sectorSize
	}
	if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
		return nil, fmt.Errorf("%w: sector size %d (must be a power of two from 512 to 4096)", ErrInvalidArgument, ss)
	}
	if len(opts.Label) >= luks2LabelLen || len(opts.Subsystem) >= luks2LabelLen {
		return nil, fmt.Errorf("%w: label or subsystem longer than %d bytes", ErrInvalidArgument, luks2LabelLen-1)
	}
	minOff := 2 * hdrSize
	dataOff := uint64(opts.PayloadOffset)
	if dataOff == 0 && !opts.Detached {
		dataOff = DefaultLUKS2DataOffset
	}
	if dataOff%uint64(ss) != 0 {
		return nil, fmt.Errorf("%w: payload offset %d is not a multiple of the sector size %d", ErrInvalidArgument, dataOff, ss)
	}
	ksSize := uint64(opts.KeyslotsSize)
	switch {
	case ksSize != 0:
	case dataOff != 0:
		if dataOff < minOff {
			return nil, fmt.Errorf("%w: payload offset %d is inside the luks2 header", ErrInvalidArgument, dataOff)
		}
		ksSize = min(dataOff-minOff, luks2MaxKeyslotsSize) / 4096 * 4096
	default:
		ksSize = DefaultLUKS2DataOffset - minOff
	}
	if ksSize%4096 != 0 || ksSize > luks2MaxKeyslotsSize {
		return nil, fmt.Errorf("%w: keyslots area size %d (must be a multiple of 4096 up to 128 MiB)", ErrInvalidArgument, ksSize)
	}
	if dataOff != 0 && dataOff < minOff+ksSize {
		return nil, fmt.Errorf("%w: payload offset %d is inside the luks2 header and keyslots area (%d bytes)", ErrInvalidArgument, dataOff, minOff+ksSize)
	}
	areaSize := (uint64(len(key))*stripes + 4095) / 4096 * 4096
	if areaSize > ksSize {
		return nil, fmt.Errorf("%w: keyslots area of %d bytes cannot hold a keyslot", ErrInvalidArgument, ksSize)
	}
	enc := opts.Cipher + "-" + opts.Mode

	// Volume key digest.
	dIter, err := digestIterations(opts.KDF, opts.Hash, len(key))
	if err != nil {
		return nil, err
	}
	dSalt, err := randomBytes(saltSize)
	if err != nil {
		return nil, err
	}
	hf, _ := lookupHash(opts.Hash)
	dig := pbkdf2Key(hf, key, dSalt, int(dIter), hf().Size())

	kdfOpts := opts.KDF
	if kdfOpts.Hash == "" {
		kdfOpts.Hash = opts.Hash
	}
	kdf, err := newKDFParams(kdfOpts, KDFArgon2id, kdfOpts.Hash, len(key))
	if err != nil {
		return nil, err
	}

	seg := newJObject()
	seg.set("type", jsonString("crypt"))
	seg.set("offset", jsonU64String(dataOff))
	seg.set("size", jsonString("dynamic"))
	seg.set("iv_tweak", jsonString("0"))
	seg.set("encryption", jsonString(enc))
	seg.set("sector_size", jsonInt(uint64(ss)))
	segs := newJObject()
	segs.setObj("0", seg)
	d := newJObject()
	d.set("type", jsonString("pbkdf2"))
	d.set("keyslots", jsonStringArray([]string{"0"}))
	d.set("segments", jsonStringArray([]string{"0"}))
	d.set("hash", jsonString(opts.Hash))
	d.set("iterations", jsonInt(uint64(dIter)))
	d.set("salt", jsonString(b64(dSalt)))
	d.set("digest", jsonString(b64(dig)))
	digs := newJObject()
	digs.setObj("0", d)
	cfg := newJObject()
	cfg.set("json_size", jsonU64String(hdrSize-luks2BinLen))
	cfg.set("keyslots_size", jsonU64String(ksSize))
	slots := newJObject()
	slots.setObj("0", newKeyslotJSON(len(key), kdfOpts.Hash, enc, minOff, areaSize, kdf))
	top := newJObject()
	top.setObj("keyslots", slots)
	top.setObj("tokens", newJObject())
	top.setObj("segments", segs)
	top.setObj("digests", digs)
	top.setObj("config", cfg)

	meta, err := parseLUKS2Meta(top.marshal(), hdrSize)
	if err != nil {
		return nil, fmt.Errorf("new luks2 metadata does not validate: %w", err)
	}
	area, err := meta.jsonArea()
	if err != nil {
		return nil, err
	}
	h := &luks2Header{
		bin: luks2Bin{
			hdrSize:   hdrSize,
			seqid:     1,
			label:     opts.Label,
			csumAlg:   "sha256",
			uuid:      opts.UUID,
			subsystem: opts.Subsystem,
		},
		meta:    meta,
		rawArea: area,
	}
	for i := range h.salts {
		s, err := randomBytes(luks2SaltLen)
		if err != nil {
			return nil, err
		}
		copy(h.salts[i][:], s)
	}
	if err := writeZeroes(w, 0, int64(minOff)); err != nil {
		return nil, fmt.Errorf("writing luks2 header: %w", err)
	}
	if err := writeRandom(w, int64(minOff), int64(ksSize)); err != nil {
		return nil, fmt.Errorf("writing luks2 keyslots area: %w", err)
	}
	if err := h.storeArea(w, key, opts.Passphrase, kdf, kdfOpts.Hash, minOff); err != nil {
		return nil, err
	}
	for i := range 2 {
		b := h.bin
		b.salt = h.salts[i]
		if err := writeLUKS2Copy(w, &b, area, i == 1); err != nil {
			return nil, fmt.Errorf("writing luks2 header copy %d: %w", i+1, err)
		}
	}
	return &Header{version: 2, v2: h}, nil
}
