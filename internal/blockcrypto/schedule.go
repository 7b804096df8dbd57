package blockcrypto

// AES key expansion (FIPS-197 section 5.2) for the assembly kernels.
//
// The round keys are stored as bytes in the order AESENC/AESDEC expect: round
// key i is bytes enc[16*i:16*i+16], each 32-bit word w[4i+j] written
// big-endian, which is the same schedule crypto/aes computes. The decryption
// schedule is the "equivalent inverse cipher" one (FIPS-197 section 5.3.5):
// the encryption round keys in reverse order with InvMixColumns (AESIMC)
// applied to all but the first and last.
//
// Everything here runs once per New and is written without table lookups
// indexed by key bytes, so that key expansion has no key-dependent memory
// access pattern.

const maxRounds = 14

// schedule holds the expanded round keys of one AES key.
type schedule struct {
	enc    [16 * (maxRounds + 1)]byte
	dec    [16 * (maxRounds + 1)]byte
	rounds int // 10, 12 or 14; 0 when unset or wiped
}

// gfMul multiplies in GF(2^8) modulo x^8+x^4+x^3+x+1 in constant time.
func gfMul(a, b byte) byte {
	var p byte
	for i := 0; i < 8; i++ {
		p ^= -(b & 1) & a
		a = a<<1 ^ (-(a >> 7) & 0x1b)
		b >>= 1
	}
	return p
}

// sbox computes the AES S-box of x without a table: the multiplicative
// inverse x^254 followed by the affine map.
func sbox(x byte) byte {
	x2 := gfMul(x, x)
	x3 := gfMul(x2, x)
	x6 := gfMul(x3, x3)
	x12 := gfMul(x6, x6)
	x15 := gfMul(x12, x3)
	x30 := gfMul(x15, x15)
	x60 := gfMul(x30, x30)
	x120 := gfMul(x60, x60)
	x127 := gfMul(x120, gfMul(x6, x)) // x^120 * x^7
	inv := gfMul(x127, x127)          // x^254
	return inv ^ rotl8(inv, 1) ^ rotl8(inv, 2) ^ rotl8(inv, 3) ^ rotl8(inv, 4) ^ 0x63
}

func rotl8(x byte, n uint) byte { return x<<n | x>>(8-n) }

func subWord(w uint32) uint32 {
	return uint32(sbox(byte(w>>24)))<<24 | uint32(sbox(byte(w>>16)))<<16 |
		uint32(sbox(byte(w>>8)))<<8 | uint32(sbox(byte(w)))
}

// invMixColumn applies InvMixColumns to one column (a big-endian word).
func invMixColumn(w uint32) uint32 {
	a0, a1, a2, a3 := byte(w>>24), byte(w>>16), byte(w>>8), byte(w)
	b0 := gfMul(a0, 14) ^ gfMul(a1, 11) ^ gfMul(a2, 13) ^ gfMul(a3, 9)
	b1 := gfMul(a0, 9) ^ gfMul(a1, 14) ^ gfMul(a2, 11) ^ gfMul(a3, 13)
	b2 := gfMul(a0, 13) ^ gfMul(a1, 9) ^ gfMul(a2, 14) ^ gfMul(a3, 11)
	b3 := gfMul(a0, 11) ^ gfMul(a1, 13) ^ gfMul(a2, 9) ^ gfMul(a3, 14)
	return uint32(b0)<<24 | uint32(b1)<<16 | uint32(b2)<<8 | uint32(b3)
}

// expandKey fills s from a 16, 24 or 32 byte AES key. It reports false for
// any other key length.
func (s *schedule) expandKey(key []byte) bool {
	var nk int
	switch len(key) {
	case 16, 24, 32:
		nk = len(key) / 4
	default:
		return false
	}
	rounds := nk + 6
	n := 4 * (rounds + 1)
	var w [4 * (maxRounds + 1)]uint32
	for i := 0; i < nk; i++ {
		w[i] = uint32(key[4*i])<<24 | uint32(key[4*i+1])<<16 | uint32(key[4*i+2])<<8 | uint32(key[4*i+3])
	}
	rcon := byte(1)
	for i := nk; i < n; i++ {
		t := w[i-1]
		switch {
		case i%nk == 0:
			t = subWord(t<<8|t>>24) ^ uint32(rcon)<<24
			rcon = gfMul(rcon, 2)
		case nk > 6 && i%nk == 4:
			t = subWord(t)
		}
		w[i] = w[i-nk] ^ t
	}
	for i := 0; i < n; i++ {
		putWord(s.enc[4*i:], w[i])
	}
	// Equivalent inverse cipher: dec round r = InvMixColumns(enc round
	// rounds-r), except the first and last round keys, which are used as is.
	for r := 0; r <= rounds; r++ {
		src := rounds - r
		for j := 0; j < 4; j++ {
			x := w[4*src+j]
			if r != 0 && r != rounds {
				x = invMixColumn(x)
			}
			putWord(s.dec[16*r+4*j:], x)
		}
	}
	clear(w[:])
	s.rounds = rounds
	return true
}

func putWord(b []byte, w uint32) {
	_ = b[3]
	b[0], b[1], b[2], b[3] = byte(w>>24), byte(w>>16), byte(w>>8), byte(w)
}

// wipe zeroes the round keys.
func (s *schedule) wipe() {
	clear(s.enc[:])
	clear(s.dec[:])
	s.rounds = 0
}
