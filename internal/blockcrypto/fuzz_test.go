package blockcrypto

import (
	"bytes"
	"testing"
)

// fuzzInput turns fuzzer bytes into a key of one of the given sizes, a
// sector size (a multiple of 16 up to 4096) and a whole number of sectors
// of data.
func fuzzInput(keySeed []byte, keySizes []int, ssUnits uint16, data []byte) (key []byte, ss int, buf []byte) {
	keyLen := keySizes[int(ssUnits>>8)%len(keySizes)]
	key = make([]byte, keyLen)
	for i := range key {
		if len(keySeed) > 0 {
			key[i] = keySeed[i%len(keySeed)] ^ byte(i/len(keySeed))
		}
	}
	ss = 16 * (1 + int(ssUnits&0xff)%256)
	n := len(data) / ss
	if n == 0 {
		n = 1
	}
	buf = make([]byte, n*ss)
	copy(buf, data)
	return key, ss, buf
}

// FuzzXTS compares every implementation with golang.org/x/crypto/xts on
// random keys, sector numbers, sector sizes and lengths.
func FuzzXTS(f *testing.F) {
	f.Add([]byte("key"), uint64(0), uint16(31), false, make([]byte, 512))
	f.Add([]byte{0xff, 0}, uint64(0xfffffffe), uint16(0x1ff), true, make([]byte, 4096))
	f.Add([]byte{1, 2, 3}, ^uint64(0), uint16(0x200), false, make([]byte, 48))
	f.Fuzz(func(t *testing.T, keySeed []byte, first uint64, ssUnits uint16, plain bool, data []byte) {
		key, ss, buf := fuzzInput(keySeed, []int{32, 48, 64}, ssUnits, data)
		mode := "xts-plain64"
		if plain {
			mode = "xts-plain"
		}
		want := refXTS(t, key, buf, first, ss, plain, true)
		for _, impl := range supportedImpls() {
			c := mustNew(t, Spec{"aes", mode}, key, impl)
			got := make([]byte, len(buf))
			if err := c.Encrypt(got, buf, first, ss); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%v: encrypt mismatch at byte %d", impl, firstDiff(got, want))
			}
			if err := c.Decrypt(got, got, first, ss); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, buf) {
				t.Fatalf("%v: in-place decrypt mismatch at byte %d", impl, firstDiff(got, buf))
			}
		}
	})
}

// FuzzCBC does the same for the CBC modes against crypto/cipher.
func FuzzCBC(f *testing.F) {
	f.Add([]byte("key"), uint64(0), uint16(31), uint8(0), make([]byte, 512))
	f.Add([]byte{0xff, 0}, uint64(0xfffffffe), uint16(0x1ff), uint8(2), make([]byte, 4096))
	f.Fuzz(func(t *testing.T, keySeed []byte, first uint64, ssUnits uint16, iv uint8, data []byte) {
		key, ss, buf := fuzzInput(keySeed, []int{16, 24, 32}, ssUnits, data)
		ivgen := []string{"plain", "plain64", "essiv"}[iv%3]
		mode := "cbc-" + ivgen
		if ivgen == "essiv" {
			mode += ":sha256"
		}
		want := refCBC(t, key, ivgen, buf, first, ss, true)
		for _, impl := range supportedImpls() {
			c := mustNew(t, Spec{"aes", mode}, key, impl)
			got := make([]byte, len(buf))
			if err := c.Encrypt(got, buf, first, ss); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%v %s: encrypt mismatch at byte %d", impl, mode, firstDiff(got, want))
			}
			if err := c.Decrypt(got, got, first, ss); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, buf) {
				t.Fatalf("%v %s: in-place decrypt mismatch at byte %d", impl, mode, firstDiff(got, buf))
			}
		}
	})
}
