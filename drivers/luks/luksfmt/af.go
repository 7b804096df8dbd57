package luksfmt

import (
	"crypto/rand"
	"encoding/binary"
	"hash"
)

// The anti-forensic information splitter of the LUKS specification (and
// cryptsetup's lib/luks1/af.c): a key of n bytes is stored as stripes*n
// bytes, stripes-1 random blocks and one block that is the key XORed with a
// hash-diffusion chain over the random blocks. Losing any part of the stored
// material (by wiping a few sectors) makes the key unrecoverable.

// stripes is the only stripe count cryptsetup reads and writes.
const stripes = 4000

// afSectors is the size in 512-byte sectors of the split material for a key
// of keyLen bytes (cryptsetup's AF_split_sectors).
func afSectors(keyLen, stripes int) int {
	return (keyLen*stripes + 511) / 512
}

// diffuse replaces buf with H(0||buf[0:d]) || H(1||buf[d:2d]) || ..., the
// last block truncated, where the counter is a big-endian uint32 and d the
// digest size.
func diffuse(newHash func() hash.Hash, buf []byte) {
	h := newHash()
	ds := h.Size()
	var ctr [4]byte
	var sum [64]byte
	for i := 0; i*ds < len(buf); i++ {
		blk := buf[i*ds : min((i+1)*ds, len(buf))]
		h.Reset()
		binary.BigEndian.PutUint32(ctr[:], uint32(i))
		h.Write(ctr[:])
		h.Write(blk)
		s := h.Sum(sum[:0])
		copy(blk, s)
	}
	clear(sum[:])
	h.Reset()
}

// afSplit fills dst (at least len(key)*stripes bytes) with the split form
// of key.
func afSplit(newHash func() hash.Hash, key, dst []byte, stripes int) error {
	n := len(key)
	acc := keyBuf(n)
	defer freeKey(acc)
	if _, err := rand.Read(dst[:n*(stripes-1)]); err != nil {
		return err
	}
	for i := 0; i < stripes-1; i++ {
		xorBytes(acc, dst[i*n:(i+1)*n], acc)
		diffuse(newHash, acc)
	}
	xorBytes(dst[(stripes-1)*n:stripes*n], key, acc)
	return nil
}

// afMerge recovers a key of len(key) bytes from its split form src.
func afMerge(newHash func() hash.Hash, src, key []byte, stripes int) {
	n := len(key)
	acc := keyBuf(n)
	defer freeKey(acc)
	for i := 0; i < stripes-1; i++ {
		xorBytes(acc, src[i*n:(i+1)*n], acc)
		diffuse(newHash, acc)
	}
	xorBytes(key, src[(stripes-1)*n:stripes*n], acc)
}

func xorBytes(dst, a, b []byte) {
	for i := range dst {
		dst[i] = a[i] ^ b[i]
	}
}
