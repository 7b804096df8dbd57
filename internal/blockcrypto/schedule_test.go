package blockcrypto

import (
	"encoding/binary"
	"encoding/hex"
	"testing"
)

func TestSbox(t *testing.T) {
	var seen [256]bool
	for x := 0; x < 256; x++ {
		seen[sbox(byte(x))] = true
	}
	for x, ok := range seen {
		if !ok {
			t.Fatalf("sbox is not a permutation: %#02x never produced", x)
		}
	}
	// FIPS-197 Figure 7.
	for in, want := range map[byte]byte{0x00: 0x63, 0x01: 0x7c, 0x10: 0xca, 0x53: 0xed, 0x9a: 0xb8, 0xc9: 0xdd, 0xff: 0x16} {
		if got := sbox(in); got != want {
			t.Errorf("sbox(%#02x) = %#02x, want %#02x", in, got, want)
		}
	}
}

func TestInvMixColumn(t *testing.T) {
	// FIPS-197 section 5.1.3 / common MixColumns test columns, inverted.
	for _, tc := range []struct{ mixed, col uint32 }{
		{0x8e4da1bc, 0xdb135345},
		{0x9fdc589d, 0xf20a225c},
		{0x01010101, 0x01010101},
		{0xd5d5d7d6, 0xd4d4d4d5},
		{0x4d7ebdf8, 0x2d26314c},
	} {
		if got := invMixColumn(tc.mixed); got != tc.col {
			t.Errorf("invMixColumn(%08x) = %08x, want %08x", tc.mixed, got, tc.col)
		}
	}
}

// TestExpandKeyFIPS197 checks words of the key expansions in FIPS-197
// Appendix A.
func TestExpandKeyFIPS197(t *testing.T) {
	for _, tc := range []struct {
		key   string
		words map[int]uint32
	}{
		{"2b7e151628aed2a6abf7158809cf4f3c", map[int]uint32{
			4: 0xa0fafe17, 5: 0x88542cb1, 6: 0x23a33939, 7: 0x2a6c7605,
			40: 0xd014f9a8, 41: 0xc9ee2589, 42: 0xe13f0cc8, 43: 0xb6630ca6}},
		{"8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", map[int]uint32{
			6: 0xfe0c91f7, 7: 0x2402f5a5, 51: 0x01002202}},
		{"603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", map[int]uint32{
			8: 0x9ba35411, 9: 0x8e6925af, 12: 0xa8b09c1a, 59: 0x706c631e}},
	} {
		key, _ := hex.DecodeString(tc.key)
		var s schedule
		if !s.expandKey(key) {
			t.Fatalf("expandKey(%d bytes) failed", len(key))
		}
		if want := len(key)/4 + 6; s.rounds != want {
			t.Errorf("%d-byte key: rounds %d, want %d", len(key), s.rounds, want)
		}
		for i, want := range tc.words {
			if got := binary.BigEndian.Uint32(s.enc[4*i:]); got != want {
				t.Errorf("%d-byte key: w[%d] = %08x, want %08x", len(key), i, got, want)
			}
		}
		// The decryption schedule starts with the last round key and ends
		// with the first, and holds InvMixColumns of the others.
		r := s.rounds
		if string(s.dec[:16]) != string(s.enc[16*r:16*r+16]) || string(s.dec[16*r:16*r+16]) != string(s.enc[:16]) {
			t.Errorf("%d-byte key: dec schedule ends do not match enc", len(key))
		}
		for round := 1; round < r; round++ {
			for j := 0; j < 4; j++ {
				e := binary.BigEndian.Uint32(s.enc[16*(r-round)+4*j:])
				d := binary.BigEndian.Uint32(s.dec[16*round+4*j:])
				if invMixColumn(e) != d {
					t.Fatalf("%d-byte key: dec round %d word %d", len(key), round, j)
				}
			}
		}
	}
	var s schedule
	for _, n := range []int{0, 8, 15, 17, 31, 33, 64} {
		if s.expandKey(make([]byte, n)) {
			t.Errorf("expandKey accepted a %d-byte key", n)
		}
	}
}
