package luksfmt

import (
	"bytes"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"blockd/internal/blockcrypto"
)

// Limits on LUKS2 object ids (cryptsetup's LUKS2_KEYSLOTS_MAX,
// LUKS2_TOKENS_MAX, LUKS2_DIGEST_MAX, LUKS2_SEGMENT_MAX).
const (
	luks2MaxKeyslots = 32
	luks2MaxTokens   = 32
	luks2MaxDigests  = 8
	luks2MaxSegments = 32
)

// luks2Keyslot is the modelled part of a keyslot of type "luks2"; the raw
// object is kept in luks2Meta.keyslots.
type luks2Keyslot struct {
	id          int
	keySize     int
	afHash      string
	areaEnc     string
	areaKeySize int
	areaOffset  uint64
	areaSize    uint64
	kdf         kdfParams
	priority    int // 0 ignore, 1 normal, 2 prefer
	digest      int // the digest this keyslot is assigned to
}

type luks2Digest struct {
	id         int
	keyslots   []int
	segments   []int
	hash       string
	iterations uint32
	salt       []byte
	digest     []byte
}

type luks2Segment struct {
	offset     uint64
	size       uint64 // 0 when dynamic
	dynamic    bool
	ivTweak    uint64
	encryption string
	sectorSize int
}

// luks2Meta is validated LUKS2 JSON metadata: the raw objects (in order, for
// rewriting) and the typed view this package works with.
type luks2Meta struct {
	top      *jobject
	keyslots *jobject
	tokens   *jobject
	segments *jobject
	digests  *jobject
	config   *jobject

	slots        []*luks2Keyslot // in JSON order
	digs         map[int]*luks2Digest
	seg          luks2Segment
	segDigest    int
	jsonSize     uint64
	keyslotsSize uint64
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

func unsupportedf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsupported, fmt.Sprintf(format, args...))
}

// extractJSON returns the JSON text of a JSON area: it must start with '{'
// and everything after the text must be NUL bytes (cryptsetup's
// validate_json_area).
func extractJSON(area []byte) ([]byte, error) {
	if len(area) == 0 || area[0] != '{' {
		return nil, corruptf("json area does not start with '{'")
	}
	n := bytes.IndexByte(area, 0)
	if n < 0 {
		return nil, corruptf("json area has no terminating nul byte")
	}
	for _, c := range area[n:] {
		if c != 0 {
			return nil, corruptf("json area has data after its terminating nul byte")
		}
	}
	return area[:n], nil
}

// parseLUKS2Meta parses and validates JSON metadata for a header copy of
// hdrSize bytes.
func parseLUKS2Meta(text []byte, hdrSize uint64) (*luks2Meta, error) {
	top, err := parseJObject(text)
	if err != nil {
		return nil, corruptf("json metadata: %v", err)
	}
	m := &luks2Meta{top: top, digs: map[int]*luks2Digest{}}
	for _, sec := range []struct {
		name string
		dst  **jobject
	}{{"keyslots", &m.keyslots}, {"tokens", &m.tokens}, {"segments", &m.segments}, {"digests", &m.digests}, {"config", &m.config}} {
		o, err := top.obj(sec.name)
		if err != nil {
			return nil, corruptf("json metadata: %v", err)
		}
		*sec.dst = o
	}
	for _, sec := range []struct {
		name  string
		o     *jobject
		limit int
	}{{"keyslot", m.keyslots, luks2MaxKeyslots}, {"token", m.tokens, luks2MaxTokens}, {"segment", m.segments, luks2MaxSegments}, {"digest", m.digests, luks2MaxDigests}} {
		for _, k := range sec.o.keys {
			if _, ok := idKey(k, sec.limit); !ok {
				return nil, corruptf("bad %s id %q", sec.name, k)
			}
		}
	}
	if err := m.parseConfig(hdrSize); err != nil {
		return nil, err
	}
	if err := m.parseSegments(); err != nil {
		return nil, err
	}
	if err := m.parseDigests(); err != nil {
		return nil, err
	}
	if err := m.parseKeyslots(); err != nil {
		return nil, err
	}
	if err := m.parseTokens(); err != nil {
		return nil, err
	}
	if uint64(len(text)) >= m.jsonSize {
		return nil, corruptf("json metadata does not fit its area")
	}
	return m, nil
}

func (m *luks2Meta) parseConfig(hdrSize uint64) error {
	c := m.config
	var err error
	if m.jsonSize, err = c.u64s("json_size"); err != nil {
		return corruptf("config: %v", err)
	}
	if m.keyslotsSize, err = c.u64s("keyslots_size"); err != nil {
		return corruptf("config: %v", err)
	}
	if m.jsonSize != hdrSize-luks2BinLen {
		return corruptf("config: json_size %d does not match the binary header (%d)", m.jsonSize, hdrSize-luks2BinLen)
	}
	if !validHdrSize(hdrSize) {
		return corruptf("unsupported header size %d", hdrSize)
	}
	if m.keyslotsSize%4096 != 0 || m.keyslotsSize > luks2MaxKeyslotsSize {
		return corruptf("config: bad keyslots_size %d", m.keyslotsSize)
	}
	if c.has("flags") {
		if _, err := c.strArray("flags"); err != nil {
			return corruptf("config: %v", err)
		}
	}
	if c.has("requirements") {
		req, err := c.obj("requirements")
		if err != nil {
			return corruptf("config: %v", err)
		}
		if req.has("mandatory") {
			mand, err := req.strArray("mandatory")
			if err != nil {
				return corruptf("config requirements: %v", err)
			}
			if len(mand) > 0 {
				return unsupportedf("luks2 header has mandatory requirements %s", strings.Join(quoteAll(mand), ", "))
			}
		}
	}
	return nil
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strconv.Quote(s)
	}
	return out
}

// hdrAndAreasSize is the size of both header copies plus the keyslots area.
func (m *luks2Meta) hdrAndAreasSize() uint64 {
	return 2*(m.jsonSize+luks2BinLen) + m.keyslotsSize
}

func (m *luks2Meta) parseSegments() error {
	if len(m.segments.keys) == 0 {
		return corruptf("no segments")
	}
	for _, k := range m.segments.keys {
		if _, ok := idKey(k, luks2MaxSegments); !ok {
			return corruptf("bad segment id %q", k)
		}
	}
	if len(m.segments.keys) > 1 {
		return unsupportedf("luks2 header has %d segments (reencryption in progress?)", len(m.segments.keys))
	}
	if m.segments.keys[0] != "0" {
		return corruptf("the only segment is not segment 0")
	}
	so, err := m.segments.obj("0")
	if err != nil {
		return corruptf("segment 0: %v", err)
	}
	typ, err := so.str("type")
	if err != nil {
		return corruptf("segment 0: %v", err)
	}
	if typ != "crypt" {
		return unsupportedf("segment type %q", typ)
	}
	s := &m.seg
	if s.offset, err = so.u64s("offset"); err != nil {
		return corruptf("segment 0: %v", err)
	}
	size, err := so.str("size")
	if err != nil {
		return corruptf("segment 0: %v", err)
	}
	if size == "dynamic" {
		s.dynamic = true
	} else if s.size, err = parseDecimal("size", size); err != nil || s.size == 0 {
		return corruptf("segment 0: bad size %q", size)
	}
	if s.ivTweak, err = so.u64s("iv_tweak"); err != nil {
		return corruptf("segment 0: %v", err)
	}
	if s.encryption, err = so.str("encryption"); err != nil {
		return corruptf("segment 0: %v", err)
	}
	ss, err := so.u32("sector_size")
	if err != nil {
		return corruptf("segment 0: %v", err)
	}
	if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
		return corruptf("segment 0: bad sector size %d", ss)
	}
	s.sectorSize = int(ss)
	if s.offset%512 != 0 || s.size%uint64(ss) != 0 {
		return corruptf("segment 0: offset or size not aligned to its sector size")
	}
	if s.offset > 1<<62 || s.size > 1<<62 {
		return corruptf("segment 0: offset or size out of range")
	}
	if so.has("integrity") {
		return unsupportedf("segment with integrity protection")
	}
	if so.has("flags") {
		flags, err := so.strArray("flags")
		if err != nil {
			return corruptf("segment 0: %v", err)
		}
		if len(flags) > 0 {
			return unsupportedf("segment flags %s", strings.Join(quoteAll(flags), ", "))
		}
	}
	if _, err := parseSpec(s.encryption); err != nil {
		return err
	}
	if s.offset != 0 && s.offset < m.hdrAndAreasSize() {
		return corruptf("data segment offset %d is inside the header and keyslots area (%d bytes)", s.offset, m.hdrAndAreasSize())
	}
	return nil
}

// parseSpec splits a LUKS2 encryption string ("aes-xts-plain64") into the
// cipher and the mode with its IV generator.
func parseSpec(enc string) (blockcrypto.Spec, error) {
	c, mode, ok := strings.Cut(enc, "-")
	if !ok || c == "" || mode == "" || strings.Contains(c, ":") {
		return blockcrypto.Spec{}, unsupportedf("encryption %q", enc)
	}
	return blockcrypto.Spec{Cipher: c, Mode: mode}, nil
}

func refList(ids []string, section string, limit int, exists func(int) bool) ([]int, error) {
	out := make([]int, 0, len(ids))
	for _, s := range ids {
		n, ok := idKey(s, limit)
		if !ok || !exists(n) {
			return nil, fmt.Errorf("references missing %s %q", section, s)
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out, nil
}

func (m *luks2Meta) keyslotExists(n int) bool { return m.keyslots.has(strconv.Itoa(n)) }

func (m *luks2Meta) parseDigests() error {
	segDigests := 0
	for _, k := range m.digests.keys {
		id, ok := idKey(k, luks2MaxDigests)
		if !ok {
			return corruptf("bad digest id %q", k)
		}
		do, err := m.digests.obj(k)
		if err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		typ, err := do.str("type")
		if err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		d := &luks2Digest{id: id}
		ks, err := do.strArray("keyslots")
		if err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if d.keyslots, err = refList(ks, "keyslot", luks2MaxKeyslots, m.keyslotExists); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		segs, err := do.strArray("segments")
		if err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if d.segments, err = refList(segs, "segment", luks2MaxSegments, func(n int) bool { return n == 0 }); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if typ != "pbkdf2" {
			return unsupportedf("digest type %q", typ)
		}
		if d.hash, err = do.str("hash"); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		hf, err := lookupHash(d.hash)
		if err != nil {
			return err
		}
		if d.iterations, err = do.u32("iterations"); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if d.iterations == 0 {
			return corruptf("digest %s: iteration count is zero", k)
		}
		if d.iterations > MaxPBKDF2Iterations {
			return unsupportedf("digest %s iteration count %d exceeds the limit of %d", k, d.iterations, MaxPBKDF2Iterations)
		}
		if d.salt, err = do.b64("salt"); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if len(d.salt) != saltSize {
			return corruptf("digest %s: salt is %d bytes, want %d", k, len(d.salt), saltSize)
		}
		if d.digest, err = do.b64("digest"); err != nil {
			return corruptf("digest %s: %v", k, err)
		}
		if n := len(d.digest); n != luks1DigestLen && n != hf().Size() {
			return corruptf("digest %s: digest is %d bytes", k, n)
		}
		if slices.Contains(d.segments, 0) {
			segDigests++
			m.segDigest = id
		}
		m.digs[id] = d
	}
	if segDigests != 1 {
		return corruptf("segment 0 is assigned to %d digests, want 1", segDigests)
	}
	return nil
}

func (m *luks2Meta) parseKeyslots() error {
	type interval struct{ off, end uint64 }
	var areas []interval
	lo, hi := 2*(m.jsonSize+luks2BinLen), m.hdrAndAreasSize()
	for _, k := range m.keyslots.keys {
		id, ok := idKey(k, luks2MaxKeyslots)
		if !ok {
			return corruptf("bad keyslot id %q", k)
		}
		ko, err := m.keyslots.obj(k)
		if err != nil {
			return corruptf("keyslot %s: %v", k, err)
		}
		typ, err := ko.str("type")
		if err != nil {
			return corruptf("keyslot %s: %v", k, err)
		}
		switch typ {
		case "luks2":
		case "reencrypt":
			return unsupportedf("keyslot %s is a reencryption keyslot (reencryption in progress)", k)
		default:
			return unsupportedf("keyslot %s type %q", k, typ)
		}
		ks, err := parseLUKS2Keyslot(id, ko)
		if err != nil {
			return err
		}
		if ks.areaOffset < lo || ks.areaSize == 0 || ks.areaOffset > hi || ks.areaSize > hi-ks.areaOffset {
			return corruptf("keyslot %s area [%d, +%d) is outside the keyslots area [%d, %d)", k, ks.areaOffset, ks.areaSize, lo, hi)
		}
		for _, a := range areas {
			if ks.areaOffset < a.end && a.off < ks.areaOffset+ks.areaSize {
				return corruptf("keyslot %s area overlaps another keyslot", k)
			}
		}
		areas = append(areas, interval{ks.areaOffset, ks.areaOffset + ks.areaSize})
		n := 0
		for _, d := range m.digs {
			if slices.Contains(d.keyslots, id) {
				n++
				ks.digest = d.id
			}
		}
		if n != 1 {
			return corruptf("keyslot %s is assigned to %d digests, want 1", k, n)
		}
		m.slots = append(m.slots, ks)
	}
	return nil
}

func parseLUKS2Keyslot(id int, ko *jobject) (*luks2Keyslot, error) {
	ks := &luks2Keyslot{id: id, priority: 1}
	bad := func(err error) error { return corruptf("keyslot %d: %v", id, err) }
	ksz, err := ko.u32("key_size")
	if err != nil {
		return nil, bad(err)
	}
	if ksz == 0 || ksz > MaxKeySize {
		return nil, unsupportedf("keyslot %d key size of %d bytes", id, ksz)
	}
	ks.keySize = int(ksz)
	if ko.has("priority") {
		p, err := ko.u32("priority")
		if err != nil || p > 2 {
			return nil, corruptf("keyslot %d: bad priority", id)
		}
		ks.priority = int(p)
	}
	af, err := ko.obj("af")
	if err != nil {
		return nil, bad(err)
	}
	afType, err := af.str("type")
	if err != nil {
		return nil, bad(err)
	}
	if afType != "luks1" {
		return nil, unsupportedf("keyslot %d af type %q", id, afType)
	}
	st, err := af.u32("stripes")
	if err != nil {
		return nil, bad(err)
	}
	if st != stripes {
		return nil, unsupportedf("keyslot %d has %d af stripes, only %d are supported", id, st, stripes)
	}
	if ks.afHash, err = af.str("hash"); err != nil {
		return nil, bad(err)
	}
	if _, err := lookupHash(ks.afHash); err != nil {
		return nil, err
	}
	area, err := ko.obj("area")
	if err != nil {
		return nil, bad(err)
	}
	areaType, err := area.str("type")
	if err != nil {
		return nil, bad(err)
	}
	if areaType != "raw" {
		return nil, unsupportedf("keyslot %d area type %q", id, areaType)
	}
	if ks.areaEnc, err = area.str("encryption"); err != nil {
		return nil, bad(err)
	}
	if _, err := parseSpec(ks.areaEnc); err != nil {
		return nil, err
	}
	aks, err := area.u32("key_size")
	if err != nil {
		return nil, bad(err)
	}
	if aks == 0 || aks > MaxKeySize {
		return nil, unsupportedf("keyslot %d area key size of %d bytes", id, aks)
	}
	ks.areaKeySize = int(aks)
	if ks.areaOffset, err = area.u64s("offset"); err != nil {
		return nil, bad(err)
	}
	if ks.areaSize, err = area.u64s("size"); err != nil {
		return nil, bad(err)
	}
	if ks.areaOffset%sectorSize != 0 {
		return nil, corruptf("keyslot %d area offset %d is not sector aligned", id, ks.areaOffset)
	}
	if need := uint64(afSectors(ks.keySize, stripes)) * sectorSize; ks.areaSize < need {
		return nil, corruptf("keyslot %d area of %d bytes is smaller than its key material (%d bytes)", id, ks.areaSize, need)
	}
	kdf, err := ko.obj("kdf")
	if err != nil {
		return nil, bad(err)
	}
	p := &ks.kdf
	if p.typ, err = kdf.str("type"); err != nil {
		return nil, bad(err)
	}
	switch p.typ {
	case KDFPBKDF2:
		if len(kdf.keys) != 4 {
			return nil, corruptf("keyslot %d: pbkdf2 kdf must have exactly type, hash, iterations and salt", id)
		}
		if p.hash, err = kdf.str("hash"); err != nil {
			return nil, bad(err)
		}
		if p.iterations, err = kdf.u32("iterations"); err != nil {
			return nil, bad(err)
		}
	case KDFArgon2i, KDFArgon2id:
		if len(kdf.keys) != 5 {
			return nil, corruptf("keyslot %d: %s kdf must have exactly type, time, memory, cpus and salt", id, p.typ)
		}
		if p.iterations, err = kdf.u32("time"); err != nil {
			return nil, bad(err)
		}
		if p.memoryKiB, err = kdf.u32("memory"); err != nil {
			return nil, bad(err)
		}
		if p.parallel, err = kdf.u32("cpus"); err != nil {
			return nil, bad(err)
		}
	default:
		return nil, unsupportedf("keyslot %d kdf %q", id, p.typ)
	}
	if p.salt, err = kdf.b64("salt"); err != nil {
		return nil, bad(err)
	}
	if err := p.check(); err != nil {
		return nil, withContext(err, fmt.Sprintf("keyslot %d", id))
	}
	return ks, nil
}

func (m *luks2Meta) parseTokens() error {
	for _, k := range m.tokens.keys {
		if _, ok := idKey(k, luks2MaxTokens); !ok {
			return corruptf("bad token id %q", k)
		}
		to, err := m.tokens.obj(k)
		if err != nil {
			return corruptf("token %s: %v", k, err)
		}
		if _, err := to.str("type"); err != nil {
			return corruptf("token %s: %v", k, err)
		}
		ks, err := to.strArray("keyslots")
		if err != nil {
			return corruptf("token %s: %v", k, err)
		}
		if _, err := refList(ks, "keyslot", luks2MaxKeyslots, m.keyslotExists); err != nil {
			return corruptf("token %s: %v", k, err)
		}
	}
	return nil
}

// slot returns keyslot id, or nil.
func (m *luks2Meta) slot(id int) *luks2Keyslot {
	for _, s := range m.slots {
		if s.id == id {
			return s
		}
	}
	return nil
}

// boundToSegment reports whether keyslot s holds the data segment's key.
func (m *luks2Meta) boundToSegment(s *luks2Keyslot) bool {
	return s.digest == m.segDigest
}

// keySize is the volume key size: that of the keyslots holding the data
// segment's key (0 if there are none).
func (m *luks2Meta) keySize() int {
	for _, s := range m.slots {
		if m.boundToSegment(s) {
			return s.keySize
		}
	}
	return 0
}

// marshal rebuilds the JSON text from the raw objects.
func (m *luks2Meta) marshal() []byte {
	m.top.setObj("keyslots", m.keyslots)
	m.top.setObj("tokens", m.tokens)
	m.top.setObj("segments", m.segments)
	m.top.setObj("digests", m.digests)
	m.top.setObj("config", m.config)
	return m.top.marshal()
}

// clone returns a copy whose raw objects can be modified independently.
func (m *luks2Meta) clone() (*luks2Meta, error) {
	return parseLUKS2Meta(m.marshal(), m.jsonSize+luks2BinLen)
}

// jsonArea renders the metadata into a JSON area of jsonSize bytes.
func (m *luks2Meta) jsonArea() ([]byte, error) {
	text := m.marshal()
	if uint64(len(text)) >= m.jsonSize {
		return nil, fmt.Errorf("%w: json metadata (%d bytes) does not fit the %d-byte json area", ErrNoSpace, len(text), m.jsonSize)
	}
	area := make([]byte, m.jsonSize)
	copy(area, text)
	return area, nil
}

// editRefs removes (or adds) keyslot id in the "keyslots" array of every
// object in section (digests or tokens) selected by which.
func editRefs(section *jobject, id int, add bool, which func(key string) bool) error {
	sid := strconv.Itoa(id)
	for _, k := range section.keys {
		if !which(k) {
			continue
		}
		o, err := section.obj(k)
		if err != nil {
			return err
		}
		refs, err := o.strArray("keyslots")
		if err != nil {
			return err
		}
		i := slices.Index(refs, sid)
		switch {
		case add && i < 0:
			refs = append(refs, sid)
		case !add && i >= 0:
			refs = slices.DeleteFunc(refs, func(r string) bool { return r == sid })
		default:
			continue
		}
		o.set("keyslots", jsonStringArray(refs))
		section.setObj(k, o)
	}
	return nil
}

// findAreaGap returns the lowest offset of a free, 4096-aligned region of
// length bytes in the keyslots area (cryptsetup's LUKS2_find_area_gap).
func (m *luks2Meta) findAreaGap(length uint64) (uint64, error) {
	type interval struct{ off, end uint64 }
	var used []interval
	for _, s := range m.slots {
		used = append(used, interval{s.areaOffset, s.areaOffset + s.areaSize})
	}
	sort.Slice(used, func(i, j int) bool { return used[i].off < used[j].off })
	off := 2 * (m.jsonSize + luks2BinLen)
	for _, u := range used {
		if off+length <= u.off {
			break
		}
		off = max(off, (u.end+4095)/4096*4096)
	}
	if off+length > m.hdrAndAreasSize() {
		return 0, fmt.Errorf("%w: no room for a new keyslot area", ErrNoSpace)
	}
	return off, nil
}

// newKeyslotJSON builds a keyslot object in cryptsetup's member order.
func newKeyslotJSON(keySize int, afHash, areaEnc string, areaOff, areaSize uint64, kdf *kdfParams) *jobject {
	af := newJObject()
	af.set("type", jsonString("luks1"))
	af.set("stripes", jsonInt(stripes))
	af.set("hash", jsonString(afHash))
	area := newJObject()
	area.set("type", jsonString("raw"))
	area.set("offset", jsonU64String(areaOff))
	area.set("size", jsonU64String(areaSize))
	area.set("encryption", jsonString(areaEnc))
	area.set("key_size", jsonInt(uint64(keySize)))
	k := newJObject()
	k.set("type", jsonString(kdf.typ))
	if kdf.typ == KDFPBKDF2 {
		k.set("hash", jsonString(kdf.hash))
		k.set("iterations", jsonInt(uint64(kdf.iterations)))
	} else {
		k.set("time", jsonInt(uint64(kdf.iterations)))
		k.set("memory", jsonInt(uint64(kdf.memoryKiB)))
		k.set("cpus", jsonInt(uint64(kdf.parallel)))
	}
	k.set("salt", jsonString(b64(kdf.salt)))
	o := newJObject()
	o.set("type", jsonString("luks2"))
	o.set("key_size", jsonInt(uint64(keySize)))
	o.setObj("af", af)
	o.setObj("area", area)
	o.setObj("kdf", k)
	return o
}
