// Package blockcrypto encrypts and decrypts runs of disk sectors the way
// dm-crypt, cryptsetup and QEMU do: a block cipher in a mode (xts, cbc...)
// with a per-sector IV generator (plain, plain64, essiv:hash). The API takes a
// whole run of sectors per call so implementations can batch and parallelise.
package blockcrypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/xts"
)

// Spec names a sector cipher in LUKS terms: Cipher "aes", Mode "xts-plain64"
// or "cbc-essiv:sha256" (mode and IV generator joined by '-', as in a LUKS
// header's cipher_mode).
type Spec struct {
	Cipher string
	Mode   string
}

// Cipher encrypts runs of sectors. It is safe for concurrent use.
type Cipher struct {
	spec   Spec
	key    []byte
	xts    *xts.Cipher
	cbc    cipher.Block // data cipher for cbc modes
	essiv  cipher.Block // IV cipher for essiv
	ivgen  string       // "plain", "plain64", "essiv"
	keyLen int
}

// ErrUnsupported is returned for cipher specs this package does not implement.
var ErrUnsupported = errors.New("unsupported cipher")

// New makes a Cipher from a spec and a key (the LUKS volume key). The key is
// copied; call Wipe when done.
func New(spec Spec, key []byte) (*Cipher, error) {
	c := &Cipher{spec: spec, key: append([]byte(nil), key...), keyLen: len(key)}
	if spec.Cipher != "aes" {
		return nil, fmt.Errorf("%w: %s", ErrUnsupported, spec.Cipher)
	}
	mode, iv, _ := strings.Cut(spec.Mode, "-")
	ivName, ivHash, _ := strings.Cut(iv, ":")
	c.ivgen = ivName
	switch mode {
	case "xts":
		if ivName != "plain" && ivName != "plain64" {
			return nil, fmt.Errorf("%w: %s-%s", ErrUnsupported, spec.Cipher, spec.Mode)
		}
		x, err := xts.NewCipher(aes.NewCipher, c.key)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		c.xts = x
	case "cbc":
		b, err := aes.NewCipher(c.key)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		c.cbc = b
		switch ivName {
		case "plain", "plain64":
		case "essiv":
			if ivHash != "sha256" {
				return nil, fmt.Errorf("%w: essiv hash %q", ErrUnsupported, ivHash)
			}
			h := sha256.Sum256(c.key)
			e, err := aes.NewCipher(h[:])
			if err != nil {
				return nil, err
			}
			c.essiv = e
		default:
			return nil, fmt.Errorf("%w: iv generator %q", ErrUnsupported, ivName)
		}
	default:
		return nil, fmt.Errorf("%w: mode %q", ErrUnsupported, mode)
	}
	return c, nil
}

// Spec returns the cipher's spec.
func (c *Cipher) Spec() Spec { return c.spec }

// KeySize returns the key length in bytes.
func (c *Cipher) KeySize() int { return c.keyLen }

// Encrypt encrypts src into dst (they may be the same slice). len(src) must
// be a multiple of sectorSize; the first sector is numbered first (the IV
// sector number, in units of sectorSize for LUKS2 iv_tweak semantics the
// caller computes).
func (c *Cipher) Encrypt(dst, src []byte, first uint64, sectorSize int) error {
	return c.run(dst, src, first, sectorSize, true)
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, first uint64, sectorSize int) error {
	return c.run(dst, src, first, sectorSize, false)
}

func (c *Cipher) run(dst, src []byte, first uint64, ss int, enc bool) error {
	if ss <= 0 || len(src)%ss != 0 || len(dst) < len(src) {
		return fmt.Errorf("blockcrypto: bad request length %d for sector size %d", len(src), ss)
	}
	var iv [16]byte
	for i := 0; i < len(src); i += ss {
		sec := first + uint64(i/ss)
		s, d := src[i:i+ss], dst[i:i+ss]
		if c.xts != nil {
			if c.ivgen == "plain" {
				sec &= 0xffffffff
			}
			if enc {
				c.xts.Encrypt(d, s, sec)
			} else {
				c.xts.Decrypt(d, s, sec)
			}
			continue
		}
		clear(iv[:])
		if c.ivgen == "plain" {
			binary.LittleEndian.PutUint32(iv[:], uint32(sec))
		} else {
			binary.LittleEndian.PutUint64(iv[:], sec)
		}
		if c.essiv != nil {
			c.essiv.Encrypt(iv[:], iv[:])
		}
		if enc {
			cipher.NewCBCEncrypter(c.cbc, iv[:]).CryptBlocks(d, s)
		} else {
			cipher.NewCBCDecrypter(c.cbc, iv[:]).CryptBlocks(d, s)
		}
	}
	return nil
}

// Wipe zeroes the key copy held by the cipher. The cipher must not be used
// afterwards.
func (c *Cipher) Wipe() {
	clear(c.key)
}
