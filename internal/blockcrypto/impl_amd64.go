//go:build amd64 && !purego

package blockcrypto

import "golang.org/x/sys/cpu"

// Assembly kernels (aes_amd64.s). rk points at a schedule's enc or dec
// round keys; rounds is 10, 12 or 14; ss is the sector size in bytes, a
// multiple of 16; tweaks and ivs hold 16 bytes per sector.

//go:noescape
func xtsEncAESNI(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)

//go:noescape
func xtsDecAESNI(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)

//go:noescape
func xtsEncVAES(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)

//go:noescape
func xtsDecVAES(rk *byte, rounds int, dst, src, tweaks *byte, nsect, ss int)

// The *1 variants do a single sector and encrypt its tweak themselves with
// the tweak key's round keys tk.

//go:noescape
func xtsEncAESNI1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)

//go:noescape
func xtsDecAESNI1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)

//go:noescape
func xtsEncVAES1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)

//go:noescape
func xtsDecVAES1(rk *byte, rounds int, tk, dst, src *byte, sector uint64, ss int)

//go:noescape
func encBlocksAESNI(rk *byte, rounds int, dst, src *byte, n int)

//go:noescape
func encBlocksVAES(rk *byte, rounds int, dst, src *byte, n int)

//go:noescape
func cbcEncAESNI(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)

//go:noescape
func cbcDecAESNI(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)

//go:noescape
func cbcDecVAES(rk *byte, rounds int, dst, src, ivs *byte, nsect, ss int)

func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
func xgetbv() (eax, edx uint32)

// CPU features, detected once.
var hasAESNI, hasVAES = detectCPU()

func detectCPU() (aesni, vaes bool) {
	// The AES-NI XTS kernels make tweaks with PCLMULQDQ, which every CPU
	// with AES-NI also has.
	aesni = cpu.X86.HasAES && cpu.X86.HasSSE2 && cpu.X86.HasPCLMULQDQ
	// golang.org/x/sys/cpu only reports VAES and VPCLMULQDQ together with
	// AVX-512, but the VEX-encoded ymm forms used here need just AVX2, so
	// read CPUID leaf 7 (ECX bit 9 VAES, bit 10 VPCLMULQDQ) directly and
	// check that the OS saves ymm state (XCR0 bits 1 and 2).
	if !aesni || !cpu.X86.HasAVX2 || !cpu.X86.HasPCLMULQDQ || !cpu.X86.HasOSXSAVE {
		return aesni, false
	}
	if maxLeaf, _, _, _ := cpuid(0, 0); maxLeaf < 7 {
		return aesni, false
	}
	_, _, ecx7, _ := cpuid(7, 0)
	const vaesBit, vpclmulqdqBit = 1 << 9, 1 << 10
	if ecx7&vaesBit == 0 || ecx7&vpclmulqdqBit == 0 {
		return aesni, false
	}
	if xcr0, _ := xgetbv(); xcr0&6 != 6 {
		return aesni, false
	}
	return aesni, true
}

func bestImpl() implKind {
	switch {
	case hasVAES:
		return implVAES
	case hasAESNI:
		return implAESNI
	}
	return implPortable
}

// supportedImpls lists the implementations this CPU can run, best last.
func supportedImpls() []implKind {
	s := []implKind{implPortable}
	if hasAESNI {
		s = append(s, implAESNI)
	}
	if hasVAES {
		s = append(s, implVAES)
	}
	return s
}

// ivBatch is how many sectors' tweaks or IVs are made in one go. The VAES
// block kernel encrypts 16 blocks at a time, so a batch of 16 costs about as
// much as one block.
const ivBatch = 16

// cryptAsm does a run of whole sectors with the assembly kernels: batches of
// up to ivBatch sectors whose tweaks (XTS) or IVs (CBC) are made together,
// or a single fused call when the run is one XTS sector. Sector k of the run
// has IV number first + k*step.
func (c *Cipher) cryptAsm(dst, src []byte, first, step uint64, ss int, enc bool) {
	vaes := c.impl == implVAES
	if c.mode == modeXTS && len(src) == ss {
		// One sector: the tweak is encrypted inside the kernel.
		sec, tk, d, s := c.ivSector(first), &c.k2.enc[0], &dst[0], &src[0]
		switch {
		case vaes && enc:
			xtsEncVAES1(&c.k1.enc[0], c.k1.rounds, tk, d, s, sec, ss)
		case vaes:
			xtsDecVAES1(&c.k1.dec[0], c.k1.rounds, tk, d, s, sec, ss)
		case enc:
			xtsEncAESNI1(&c.k1.enc[0], c.k1.rounds, tk, d, s, sec, ss)
		default:
			xtsDecAESNI1(&c.k1.dec[0], c.k1.rounds, tk, d, s, sec, ss)
		}
		return
	}
	var ivs [ivBatch * 16]byte
	for len(src) > 0 {
		k := min(len(src)/ss, ivBatch)
		c.putIVInputs(ivs[:], first, step, k)
		if c.mode == modeXTS || c.ivgen == ivESSIV {
			c.encryptIVs(&ivs, k, vaes)
		}
		n := k * ss
		d, s, iv := &dst[0], &src[0], &ivs[0]
		switch {
		case c.mode == modeXTS && vaes && enc:
			xtsEncVAES(&c.k1.enc[0], c.k1.rounds, d, s, iv, k, ss)
		case c.mode == modeXTS && vaes:
			xtsDecVAES(&c.k1.dec[0], c.k1.rounds, d, s, iv, k, ss)
		case c.mode == modeXTS && enc:
			xtsEncAESNI(&c.k1.enc[0], c.k1.rounds, d, s, iv, k, ss)
		case c.mode == modeXTS:
			xtsDecAESNI(&c.k1.dec[0], c.k1.rounds, d, s, iv, k, ss)
		case enc:
			cbcEncAESNI(&c.k1.enc[0], c.k1.rounds, d, s, iv, k, ss)
		case vaes:
			cbcDecVAES(&c.k1.dec[0], c.k1.rounds, d, s, iv, k, ss)
		default:
			cbcDecAESNI(&c.k1.dec[0], c.k1.rounds, d, s, iv, k, ss)
		}
		dst, src = dst[n:], src[n:]
		first += uint64(k) * step
	}
}

// encryptIVs encrypts the first k blocks of ivs with k2 in place. Whole
// batches are cheaper than a serial tail, so it encrypts a full kernel width
// (the unused blocks are scratch) unless there is only one block.
func (c *Cipher) encryptIVs(ivs *[ivBatch * 16]byte, k int, vaes bool) {
	n := k
	switch {
	case k == 1:
	case vaes:
		n = ivBatch
	default:
		n = (k + 7) &^ 7
	}
	if vaes {
		encBlocksVAES(&c.k2.enc[0], c.k2.rounds, &ivs[0], &ivs[0], n)
	} else {
		encBlocksAESNI(&c.k2.enc[0], c.k2.rounds, &ivs[0], &ivs[0], n)
	}
}
