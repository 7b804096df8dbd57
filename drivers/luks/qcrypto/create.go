package qcrypto

import (
	"fmt"
	"strings"
	"time"

	"blockd/drivers/luks/luksfmt"
)

// CipherAlg is QCryptoCipherAlgorithm.
type CipherAlg string

// EnumValues implements qapi.Enum.
func (CipherAlg) EnumValues() []string {
	return []string{"aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4"}
}

// CipherMode is QCryptoCipherMode.
type CipherMode string

// EnumValues implements qapi.Enum.
func (CipherMode) EnumValues() []string { return []string{"ecb", "cbc", "xts", "ctr"} }

// IVGenAlg is QCryptoIVGenAlgorithm.
type IVGenAlg string

// EnumValues implements qapi.Enum.
func (IVGenAlg) EnumValues() []string { return []string{"plain", "plain64", "essiv"} }

// HashAlg is QCryptoHashAlgorithm.
type HashAlg string

// EnumValues implements qapi.Enum.
func (HashAlg) EnumValues() []string {
	return []string{"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3"}
}

// PBKDFAlg is blockd's pbkdf extension: the key derivation of new
// keyslots.
type PBKDFAlg string

// EnumValues implements qapi.Enum.
func (PBKDFAlg) EnumValues() []string { return []string{"pbkdf2", "argon2i", "argon2id"} }

// CreateFields are QCryptoBlockCreateOptionsLUKS, plus blockd's extensions
// luks-version, pbkdf and sector-size. They are shared with qcow2's
// encrypt options.
type CreateFields struct {
	KeySecret    *string     `json:"key-secret,omitempty"`
	CipherAlg    *CipherAlg  `json:"cipher-alg,omitempty"`
	CipherMode   *CipherMode `json:"cipher-mode,omitempty"`
	IVGenAlg     *IVGenAlg   `json:"ivgen-alg,omitempty"`
	IVGenHashAlg *HashAlg    `json:"ivgen-hash-alg,omitempty"`
	HashAlg      *HashAlg    `json:"hash-alg,omitempty"`
	IterTime     *int64      `json:"iter-time,omitempty"`
	// Extensions.
	LUKSVersion *int64    `json:"luks-version,omitempty"`
	PBKDF       *PBKDFAlg `json:"pbkdf,omitempty"`
	SectorSize  *int64    `json:"sector-size,omitempty"`
}

// FormatOptions turns the QAPI fields into luksfmt options (without the
// passphrase).
func (f *CreateFields) FormatOptions() (luksfmt.CreateOptions, error) {
	var o luksfmt.CreateOptions
	alg := "aes-256"
	if f.CipherAlg != nil {
		alg = string(*f.CipherAlg)
	}
	name, bits, _ := strings.Cut(alg, "-")
	if name != "aes" {
		return o, fmt.Errorf("Cipher algorithm '%s' is not supported by blockd", alg)
	}
	keyBytes := map[string]int{"128": 16, "192": 24, "256": 32}[bits]
	mode := "xts"
	if f.CipherMode != nil {
		mode = string(*f.CipherMode)
	}
	iv := "plain64"
	if f.IVGenAlg != nil {
		iv = string(*f.IVGenAlg)
	}
	switch mode {
	case "xts":
		keyBytes *= 2
		if iv == "essiv" {
			return o, fmt.Errorf("Cipher mode 'xts' with ivgen 'essiv' is not supported by blockd")
		}
	case "cbc":
	default:
		return o, fmt.Errorf("Cipher mode '%s' is not supported by blockd", mode)
	}
	if iv == "essiv" {
		h := "sha256"
		if f.IVGenHashAlg != nil {
			h = string(*f.IVGenHashAlg)
		}
		iv += ":" + h
	}
	o.Cipher, o.Mode, o.KeySize = "aes", mode+"-"+iv, keyBytes
	o.Hash = "sha256"
	if f.HashAlg != nil {
		o.Hash = string(*f.HashAlg)
	}
	o.Version = 1
	if f.LUKSVersion != nil {
		if *f.LUKSVersion != 1 && *f.LUKSVersion != 2 {
			return o, fmt.Errorf("luks-version must be 1 or 2")
		}
		o.Version = int(*f.LUKSVersion)
	}
	if f.PBKDF != nil {
		if o.Version == 1 && *f.PBKDF != "pbkdf2" {
			return o, fmt.Errorf("LUKS1 supports only the pbkdf2 key derivation")
		}
		o.KDF.Type = string(*f.PBKDF)
	}
	if f.SectorSize != nil {
		if o.Version == 1 && *f.SectorSize != 512 {
			return o, fmt.Errorf("LUKS1 supports only 512-byte sectors")
		}
		o.SectorSize = int(*f.SectorSize)
	}
	o.KDF.IterTime = luksfmt.DefaultIterTime
	if f.IterTime != nil {
		if *f.IterTime <= 0 {
			return o, fmt.Errorf("iter-time must be positive")
		}
		o.KDF.IterTime = time.Duration(*f.IterTime) * time.Millisecond
	}
	return o, nil
}
