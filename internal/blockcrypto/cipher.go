// Package blockcrypto encrypts and decrypts runs of disk sectors the way
// dm-crypt, cryptsetup and QEMU do: a block cipher in a mode (xts, cbc...)
// with a per-sector IV generator (plain, plain64, essiv:hash). The API takes a
// whole run of sectors per call so implementations can batch and parallelise.
//
// On amd64 the AES modes run in assembly: a VAES kernel (ymm registers, 16
// blocks in flight) on CPUs with VAES, VPCLMULQDQ and AVX2, otherwise an
// AES-NI kernel (8 blocks in flight). Elsewhere, or on CPUs without AES-NI,
// the portable path uses crypto/aes with golang.org/x/crypto/xts and
// crypto/cipher's CBC. All paths produce identical output.
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
	// sectors, the sector size is not a positive multiple of 16, or dst is
	// shorter than src.
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
// work across goroutines; each goroutine gets at least parallelMin/2 bytes.
var parallelMin = 256 << 10

// Cipher encrypts runs of sectors. It is safe for concurrent use, except
// that Wipe must not race with Encrypt or Decrypt.
type Cipher struct {
	spec   Spec
	key    []byte
	keyLen int
	mode   uint8 // modeXTS or modeCBC; modeNone once wiped
	ivgen  uint8 // ivPlain, ivPlain64 or ivESSIV
	impl   implKind

	// Assembly paths. k1 is the data key; k2 is the XTS tweak key or the
	// ESSIV key.
	k1, k2 schedule

	// Portable path.
	xts     *xts.Cipher
	cbc     cipher.Block
	essiv   cipher.Block
	blocks  []cipher.Block // every crypto/aes block made, so Wipe can zero them
	cbcPool sync.Pool      // *cbcState, reusable CBC modes for the portable path
}

// New makes a Cipher from a spec and a key (the LUKS volume key). The key is
// copied; call Wipe when done.
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
	c.key = append([]byte(nil), key...)

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
	var err error
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
	return c.run(dst, src, first, sectorSize, true)
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, first uint64, sectorSize int) error {
	return c.run(dst, src, first, sectorSize, false)
}

func (c *Cipher) run(dst, src []byte, first uint64, ss int, enc bool) error {
	if ss <= 0 || ss%16 != 0 || len(src)%ss != 0 || len(dst) < len(src) {
		return fmt.Errorf("%w: %d bytes for sector size %d", ErrBadLength, len(src), ss)
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
	if len(src) >= parallelMin && runtime.GOMAXPROCS(0) > 1 {
		c.parallel(dst, src, first, ss, enc)
		return nil
	}
	c.crypt(dst, src, first, ss, enc)
	return nil
}

// parallel splits a large request into runs of whole sectors and does them
// on separate goroutines, the first on the calling one.
func (c *Cipher) parallel(dst, src []byte, first uint64, ss int, enc bool) {
	nsect := len(src) / ss
	parts := min(runtime.GOMAXPROCS(0), len(src)/(parallelMin/2), nsect)
	per := (nsect + parts - 1) / parts
	var wg sync.WaitGroup
	for lo := per; lo < nsect; lo += per {
		hi := min(lo+per, nsect)
		wg.Go(func() {
			c.crypt(dst[lo*ss:hi*ss], src[lo*ss:hi*ss], first+uint64(lo), ss, enc)
		})
	}
	c.crypt(dst[:per*ss], src[:per*ss], first, ss, enc)
	wg.Wait()
}

// crypt does one run of whole sectors on the calling goroutine.
func (c *Cipher) crypt(dst, src []byte, first uint64, ss int, enc bool) {
	if c.impl != implPortable {
		c.cryptAsm(dst, src, first, ss, enc)
		return
	}
	if c.mode == modeXTS {
		for i := 0; i < len(src); i += ss {
			sec := c.ivSector(first + uint64(i/ss))
			if enc {
				c.xts.Encrypt(dst[i:i+ss], src[i:i+ss], sec)
			} else {
				c.xts.Decrypt(dst[i:i+ss], src[i:i+ss], sec)
			}
		}
		return
	}
	c.cbcPortable(dst, src, first, ss, enc)
}

// ivSector applies the IV generator's width to a sector number.
func (c *Cipher) ivSector(sec uint64) uint64 {
	if c.ivgen == ivPlain {
		return sec & 0xffffffff
	}
	return sec
}

// putIVInputs writes the 16-byte IV generator input of sectors first..first+k-1
// (the sector number, little-endian, zero-padded) into buf.
func (c *Cipher) putIVInputs(buf []byte, first uint64, k int) {
	for i := 0; i < k; i++ {
		b := buf[16*i : 16*i+16]
		binary.LittleEndian.PutUint64(b[:8], c.ivSector(first+uint64(i)))
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

func (c *Cipher) cbcPortable(dst, src []byte, first uint64, ss int, enc bool) {
	st := c.cbcPool.Get().(*cbcState)
	for i := 0; i < len(src); i += ss {
		c.putIVInputs(st.iv[:], first+uint64(i/ss), 1)
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

// Wipe zeroes the key copy and every expanded round key held by the cipher.
// The cipher must not be used afterwards; Encrypt and Decrypt then return
// ErrWiped.
func (c *Cipher) Wipe() {
	clear(c.key)
	c.k1.wipe()
	c.k2.wipe()
	for _, b := range c.blocks {
		wipeBlock(b)
	}
	c.blocks = nil
	c.xts, c.cbc, c.essiv = nil, nil, nil
	c.mode = modeNone
}
