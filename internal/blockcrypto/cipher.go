// Package blockcrypto encrypts and decrypts runs of disk sectors the way
// dm-crypt, cryptsetup and QEMU do: a block cipher in a mode (xts, cbc...)
// with a per-sector IV generator (plain, plain64, essiv:hash). The API takes a
// whole run of sectors per call so implementations can batch and parallelise.
//
// The key copy and the expanded round keys live in internal/keymem memory:
// outside the Go heap, locked into RAM, left out of core dumps, and wiped
// and unmapped by Wipe.
//
// On amd64 the AES modes run in assembly: a VAES kernel (ymm registers, 16
// blocks in flight) on CPUs with VAES, VPCLMULQDQ and AVX2, otherwise an
// AES-NI kernel (8 blocks in flight; needs PCLMULQDQ too). Elsewhere, or on
// CPUs without AES-NI, the portable path uses crypto/aes with
// golang.org/x/crypto/xts and crypto/cipher's CBC. All paths produce
// identical output.
package blockcrypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/crypto/xts"

	"blockd/internal/keymem"
)

// Spec names a sector cipher in LUKS terms: Cipher "aes", Mode "xts-plain64"
// or "cbc-essiv:sha256" (mode and IV generator joined by '-', as in a LUKS
// header's cipher_mode).
type Spec struct {
	Cipher string
	Mode   string
}

// Errors returned by this package.
var (
	// ErrUnsupported is returned for cipher specs this package does not implement.
	ErrUnsupported = errors.New("unsupported cipher")
	// ErrBadLength is returned when a request is not a whole number of
	// sectors, the sector size is not a positive multiple of 16, the IV
	// unit does not divide the sector size, or dst is shorter than src.
	ErrBadLength = errors.New("blockcrypto: bad request length")
	// ErrOverlap is returned when dst and src overlap without being the
	// same memory.
	ErrOverlap = errors.New("blockcrypto: dst and src overlap")
	// ErrWiped is returned by Encrypt and Decrypt after Wipe.
	ErrWiped = errors.New("blockcrypto: cipher has been wiped")
)

const (
	modeNone uint8 = iota // after Wipe
	modeXTS
	modeCBC
)

const (
	ivPlain uint8 = iota + 1
	ivPlain64
	ivESSIV
)

// implKind selects the code that does the work.
type implKind uint8

const (
	implPortable implKind = iota // crypto/aes + x/crypto/xts, crypto/cipher CBC
	implAESNI                    // amd64 AES-NI, 8 blocks in flight
	implVAES                     // amd64 VAES on ymm, 16 blocks in flight
)

func (k implKind) String() string {
	switch k {
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	}
	return "portable"
}

// defaultImpl is the implementation New picks: the best one this CPU
// supports (see bestImpl in the per-architecture files).
var defaultImpl = bestImpl()

// parallelMin is the request size from which Encrypt and Decrypt split the
// work across goroutines, in parts of parallelMin/4 bytes (see parallel.go).
var parallelMin = 256 << 10

// Cipher encrypts runs of sectors. It is safe for concurrent use, except
// that Wipe must not race with Encrypt or Decrypt.
type Cipher struct {
	spec   Spec
	keyLen int
	mode   uint8 // modeXTS or modeCBC; modeNone once wiped
	ivgen  uint8 // ivPlain, ivPlain64 or ivESSIV
	impl   implKind

	// mem is the keymem region that holds the key copy and the assembly
	// paths' round keys; key, k1 and k2 point into it. k1 is the data
	// key; k2 is the XTS tweak key or the ESSIV key.
	mem     []byte
	key     []byte
	k1, k2  *schedule
	wipeMu  sync.Mutex      // serialises Wipe
	cleanup runtime.Cleanup // frees mem if the cipher is dropped unwiped

	// Portable path. crypto/aes keeps its round keys in the Go heap;
	// Wipe zeroes them (wipeBlock).
	xts     *xts.Cipher
	cbc     cipher.Block
	essiv   cipher.Block
	blocks  []cipher.Block // every crypto/aes block made, so Wipe can zero them
	cbcPool sync.Pool      // *cbcState, reusable CBC modes for the portable path
}

// Layout of a cipher's keymem region: both schedules and the key, each
// starting on a cache line, in one page.
const (
	memK1    = 0
	memK2    = (unsafe.Sizeof(schedule{}) + 63) &^ 63
	memKey   = 2 * memK2
	memTotal = memKey + 64 // room for the longest key (512-bit XTS)
)

// New makes a Cipher from a spec and a key (the LUKS volume key). The key is
// copied into locked memory; call Wipe when done.
func New(spec Spec, key []byte) (*Cipher, error) {
	return newCipher(spec, key, defaultImpl)
}

func newCipher(spec Spec, key []byte, impl implKind) (*Cipher, error) {
	if spec.Cipher != "aes" {
		return nil, fmt.Errorf("%w: %s", ErrUnsupported, spec.Cipher)
	}
	mode, iv, _ := strings.Cut(spec.Mode, "-")
	ivName, ivHash, _ := strings.Cut(iv, ":")
	c := &Cipher{spec: spec, keyLen: len(key), impl: impl}
	switch ivName {
	case "plain":
		c.ivgen = ivPlain
	case "plain64":
		c.ivgen = ivPlain64
	case "essiv":
		c.ivgen = ivESSIV
	default:
		return nil, fmt.Errorf("%w: iv generator %q", ErrUnsupported, ivName)
	}
	if c.ivgen != ivESSIV && ivHash != "" {
		return nil, fmt.Errorf("%w: %s-%s", ErrUnsupported, spec.Cipher, spec.Mode)
	}
	switch mode {
	case "xts":
		if c.ivgen == ivESSIV {
			return nil, fmt.Errorf("%w: %s-%s", ErrUnsupported, spec.Cipher, spec.Mode)
		}
		if len(key) != 32 && len(key) != 48 && len(key) != 64 {
			return nil, fmt.Errorf("%w: xts key size %d", ErrUnsupported, len(key))
		}
		c.mode = modeXTS
	case "cbc":
		if len(key) != 16 && len(key) != 24 && len(key) != 32 {
			return nil, fmt.Errorf("%w: cbc key size %d", ErrUnsupported, len(key))
		}
		if c.ivgen == ivESSIV && ivHash != "sha256" {
			return nil, fmt.Errorf("%w: essiv hash %q", ErrUnsupported, ivHash)
		}
		c.mode = modeCBC
	default:
		return nil, fmt.Errorf("%w: mode %q", ErrUnsupported, mode)
	}
	mem, err := keymem.Alloc(int(memTotal))
	if err != nil {
		return nil, err
	}
	// A cipher dropped without Wipe still gives its memory back (wiped)
	// once the collector finds it unreachable.
	c.mem = mem
	c.cleanup = runtime.AddCleanup(c, keymem.Free, mem)
	c.k1 = (*schedule)(unsafe.Pointer(&mem[memK1]))
	c.k2 = (*schedule)(unsafe.Pointer(&mem[memK2]))
	c.key = mem[memKey : memKey+uintptr(len(key)) : memKey+uintptr(len(key))]
	copy(c.key, key)

	var essivKey []byte
	if c.ivgen == ivESSIV {
		h := sha256.Sum256(c.key)
		essivKey = h[:]
		defer clear(h[:])
	}

	if impl != implPortable {
		switch c.mode {
		case modeXTS:
			half := len(c.key) / 2
			c.k1.expandKey(c.key[:half])
			c.k2.expandKey(c.key[half:])
		case modeCBC:
			c.k1.expandKey(c.key)
			if essivKey != nil {
				c.k2.expandKey(essivKey)
			}
		}
		return c, nil
	}

	newBlock := func(k []byte) (cipher.Block, error) {
		b, err := aes.NewCipher(k)
		if err == nil {
			c.blocks = append(c.blocks, b)
		}
		return b, err
	}
	switch c.mode {
	case modeXTS:
		c.xts, err = xts.NewCipher(newBlock, c.key)
	case modeCBC:
		c.cbc, err = newBlock(c.key)
		if err == nil && essivKey != nil {
			c.essiv, err = newBlock(essivKey)
		}
		c.cbcPool.New = c.newCBCState
	}
	if err != nil {
		c.Wipe()
		return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
	}
	return c, nil
}

// Spec returns the cipher's spec.
func (c *Cipher) Spec() Spec { return c.spec }

// KeySize returns the key length in bytes.
func (c *Cipher) KeySize() int { return c.keyLen }

// Implementation names the code path in use: "vaes", "aesni" or "portable".
func (c *Cipher) Implementation() string { return c.impl.String() }

// Encrypt encrypts src into dst. dst and src may be the same slice but must
// not otherwise overlap. len(src) must be a multiple of sectorSize, which
// must be a positive multiple of 16; the first sector is numbered first (the
// IV sector number, in units of sectorSize for LUKS2 iv_tweak semantics the
// caller computes). Sector numbers advance by one per sector; with the
// "plain" IV generator only their low 32 bits are used.
func (c *Cipher) Encrypt(dst, src []byte, first uint64, sectorSize int) error {
	return c.run(dst, src, first, sectorSize, sectorSize, true)
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, first uint64, sectorSize int) error {
	return c.run(dst, src, first, sectorSize, sectorSize, false)
}

// EncryptUnits is Encrypt with IV numbers counted in ivUnit-byte units
// rather than in sectors: sector k of the run gets IV number
// first + k*sectorSize/ivUnit. ivUnit must be positive and divide
// sectorSize. This is how dm-crypt (without iv_large_sectors), cryptsetup
// and QEMU number the IVs of LUKS2 volumes with sectors larger than 512
// bytes: ivUnit 512, first = offset/512 + iv_tweak. The whole run is one
// batch, split across goroutines when large, like a run of 512-byte
// sectors. EncryptUnits(dst, src, first, ss, ss) is Encrypt.
func (c *Cipher) EncryptUnits(dst, src []byte, first uint64, sectorSize, ivUnit int) error {
	return c.run(dst, src, first, sectorSize, ivUnit, true)
}

// DecryptUnits is the inverse of EncryptUnits.
func (c *Cipher) DecryptUnits(dst, src []byte, first uint64, sectorSize, ivUnit int) error {
	return c.run(dst, src, first, sectorSize, ivUnit, false)
}

func (c *Cipher) run(dst, src []byte, first uint64, ss, unit int, enc bool) error {
	if ss <= 0 || ss%16 != 0 || unit <= 0 || ss%unit != 0 || len(src)%ss != 0 || len(dst) < len(src) {
		return fmt.Errorf("%w: %d bytes for sector size %d, IV unit %d", ErrBadLength, len(src), ss, unit)
	}
	if c.mode == modeNone {
		return ErrWiped
	}
	if len(src) == 0 {
		return nil
	}
	dst = dst[:len(src)]
	if inexactOverlap(dst, src) {
		return ErrOverlap
	}
	step := uint64(ss / unit)
	if len(src) >= parallelMin && runtime.GOMAXPROCS(0) > 1 {
		c.parallel(dst, src, first, step, ss, enc)
		return nil
	}
	c.crypt(dst, src, first, step, ss, enc)
	return nil
}

// crypt does one run of whole sectors on the calling goroutine; sector k
// of the run has IV number first + k*step.
func (c *Cipher) crypt(dst, src []byte, first, step uint64, ss int, enc bool) {
	if c.impl != implPortable {
		c.cryptAsm(dst, src, first, step, ss, enc)
		return
	}
	if c.mode == modeXTS {
		for i := 0; i < len(src); i += ss {
			sec := c.ivSector(first + uint64(i/ss)*step)
			if enc {
				c.xts.Encrypt(dst[i:i+ss], src[i:i+ss], sec)
			} else {
				c.xts.Decrypt(dst[i:i+ss], src[i:i+ss], sec)
			}
		}
		return
	}
	c.cbcPortable(dst, src, first, step, ss, enc)
}

// ivSector applies the IV generator's width to a sector number.
func (c *Cipher) ivSector(sec uint64) uint64 {
	if c.ivgen == ivPlain {
		return sec & 0xffffffff
	}
	return sec
}

// putIVInputs writes the 16-byte IV generator inputs of k sectors into
// buf: sector i's IV number first + i*step, little-endian, zero-padded.
func (c *Cipher) putIVInputs(buf []byte, first, step uint64, k int) {
	for i := 0; i < k; i++ {
		b := buf[16*i : 16*i+16]
		binary.LittleEndian.PutUint64(b[:8], c.ivSector(first+uint64(i)*step))
		binary.LittleEndian.PutUint64(b[8:], 0)
	}
}

// cbcState is per-goroutine scratch for the portable CBC path.
type cbcState struct {
	enc, dec cipher.BlockMode
	iv       [16]byte
}

type ivSetter interface{ SetIV([]byte) }

func (c *Cipher) newCBCState() any {
	var zero [16]byte
	return &cbcState{
		enc: cipher.NewCBCEncrypter(c.cbc, zero[:]),
		dec: cipher.NewCBCDecrypter(c.cbc, zero[:]),
	}
}

func (c *Cipher) cbcPortable(dst, src []byte, first, step uint64, ss int, enc bool) {
	st := c.cbcPool.Get().(*cbcState)
	for i := 0; i < len(src); i += ss {
		c.putIVInputs(st.iv[:], first+uint64(i/ss)*step, step, 1)
		if c.essiv != nil {
			c.essiv.Encrypt(st.iv[:], st.iv[:])
		}
		m := st.dec
		if enc {
			m = st.enc
		}
		if s, ok := m.(ivSetter); ok {
			s.SetIV(st.iv[:])
		} else if enc {
			m = cipher.NewCBCEncrypter(c.cbc, st.iv[:])
		} else {
			m = cipher.NewCBCDecrypter(c.cbc, st.iv[:])
		}
		m.CryptBlocks(dst[i:i+ss], src[i:i+ss])
	}
	clear(st.iv[:])
	c.cbcPool.Put(st)
}

// inexactOverlap reports whether x and y share memory without starting at
// the same address.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs, ys := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}

// Wipe zeroes the key copy and every expanded round key held by the cipher
// and releases the locked memory that held them. The cipher must not be
// used afterwards: Encrypt and Decrypt then return ErrWiped. Wipe may be
// called more than once.
func (c *Cipher) Wipe() {
	c.wipeMu.Lock()
	defer c.wipeMu.Unlock()
	c.mode = modeNone
	for _, b := range c.blocks {
		wipeBlock(b)
	}
	c.blocks = nil
	c.xts, c.cbc, c.essiv = nil, nil, nil
	if c.mem != nil {
		c.cleanup.Stop()
		keymem.Free(c.mem)
	}
	c.mem, c.key, c.k1, c.k2 = nil, nil, nil, nil
}

// Close is Wipe, for owners that release resources through io.Closer.
func (c *Cipher) Close() error {
	c.Wipe()
	return nil
}
