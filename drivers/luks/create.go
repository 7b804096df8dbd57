package luks

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"blockd/drivers/luks/luksfmt"
	"blockd/graph"
)

type cipherAlg string

func (cipherAlg) EnumValues() []string {
	return []string{"aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4"}
}

type cipherMode string

func (cipherMode) EnumValues() []string { return []string{"ecb", "cbc", "xts", "ctr"} }

type ivgenAlg string

func (ivgenAlg) EnumValues() []string { return []string{"plain", "plain64", "essiv"} }

type hashAlg string

func (hashAlg) EnumValues() []string {
	return []string{"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3"}
}

type preallocMode string

func (preallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

type pbkdfAlg string

func (pbkdfAlg) EnumValues() []string { return []string{"pbkdf2", "argon2i", "argon2id"} }

// LUKSFields are QCryptoBlockCreateOptionsLUKS, plus blockd's extensions
// luks-version, pbkdf and sector-size. They are shared with qcow2's
// encrypt options.
type LUKSFields struct {
	KeySecret    *string     `json:"key-secret,omitempty"`
	CipherAlg    *cipherAlg  `json:"cipher-alg,omitempty"`
	CipherMode   *cipherMode `json:"cipher-mode,omitempty"`
	IVGenAlg     *ivgenAlg   `json:"ivgen-alg,omitempty"`
	IVGenHashAlg *hashAlg    `json:"ivgen-hash-alg,omitempty"`
	HashAlg      *hashAlg    `json:"hash-alg,omitempty"`
	IterTime     *int64      `json:"iter-time,omitempty"`
	// Extensions.
	LUKSVersion *int64    `json:"luks-version,omitempty"`
	PBKDF       *pbkdfAlg `json:"pbkdf,omitempty"`
	SectorSize  *int64    `json:"sector-size,omitempty"`
}

// CreateOptions is BlockdevCreateOptionsLUKS (QEMU 9.0: file optional,
// header).
type CreateOptions struct {
	File   *graph.Ref `json:"file,omitempty"`
	Header *graph.Ref `json:"header,omitempty"`
	LUKSFields
	Size          uint64        `json:"size"`
	Preallocation *preallocMode `json:"preallocation,omitempty"`
}

// FormatOptions turns the QAPI fields into luksfmt options (without the
// passphrase).
func (f *LUKSFields) FormatOptions() (luksfmt.CreateOptions, error) {
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

func create(ctx context.Context, cc *graph.CreateContext, v any) error {
	opts := v.(*CreateOptions)
	if opts.File == nil && opts.Header == nil {
		return errors.New("Either the parameter 'header' or 'file' must be specified")
	}
	prealloc := graph.PreallocOff
	if opts.Preallocation != nil {
		prealloc = graph.Prealloc(*opts.Preallocation)
	}
	if prealloc != graph.PreallocOff && opts.File == nil {
		return errors.New("Parameter 'preallocation' requires 'file'")
	}
	if prealloc == graph.PreallocMetadata {
		prealloc = graph.PreallocOff
	}
	if opts.KeySecret == nil {
		return errors.New("Parameter 'key-secret' is required for cipher")
	}
	fo, err := opts.FormatOptions()
	if err != nil {
		return err
	}
	file, err := cc.Open(opts.File, "file")
	if err != nil {
		return err
	}
	header, err := cc.Open(opts.Header, "header")
	if err != nil {
		return err
	}
	pass, err := cc.Secret(*opts.KeySecret)
	if err != nil {
		return err
	}
	defer luksfmt.Wipe(pass)
	fo.Passphrase = pass
	fo.Detached = header != nil
	meta := file
	if header != nil {
		meta = header
	}
	hdr, key, err := luksfmt.Create(ChildIO{Ctx: ctx, Child: meta}, fo)
	if err != nil {
		return err
	}
	luksfmt.Wipe(key)
	// Like QEMU (truncate with exact=false), devices grow to what the
	// volume needs but are never shrunk.
	if header != nil {
		if err := grow(ctx, header, hdr.HeaderSize(), graph.PreallocOff); err != nil {
			return err
		}
		if err := header.Flush(ctx); err != nil {
			return err
		}
		if file != nil {
			if err := grow(ctx, file, int64(opts.Size), prealloc); err != nil {
				return err
			}
		}
	} else if err := grow(ctx, file, hdr.PayloadOffset()+int64(opts.Size), prealloc); err != nil {
		return err
	}
	if file != nil {
		return file.Flush(ctx)
	}
	return nil
}

func grow(ctx context.Context, c *graph.Child, size int64, prealloc graph.Prealloc) error {
	if c.Size() >= size {
		return nil
	}
	return c.Truncate(ctx, size, prealloc)
}
