package luksfmt

import (
	"context"
	"crypto/sha1" //nolint:gosec // LUKS1 headers use sha1 for digests and the AF splitter
	"crypto/sha256"
	"crypto/sha512"
	"encoding"
	"encoding/binary"
	"fmt"
	"hash"
	"runtime"
	"strings"
	"sync"
)

// hashAlgs are the hashes usable for PBKDF2, the AF splitter and LUKS2 header
// checksums. cryptsetup also knows ripemd160, whirlpool and others; headers
// naming them are refused with ErrUnsupported.
var hashAlgs = map[string]func() hash.Hash{
	"sha1":   sha1.New,
	"sha224": sha256.New224,
	"sha256": sha256.New,
	"sha384": sha512.New384,
	"sha512": sha512.New,
}

// lookupHash returns the constructor for a LUKS hash spec (case-insensitive,
// as cryptsetup's crypto backends are).
func lookupHash(name string) (func() hash.Hash, error) {
	if h, ok := hashAlgs[strings.ToLower(name)]; ok {
		return h, nil
	}
	return nil, fmt.Errorf("%w: hash %q", ErrUnsupported, name)
}

// pbkdf2Key is PBKDF2 (RFC 8018) with HMAC over newHash, returned in a heap
// slice: for digests, whose output is public. Keys derived from secrets use
// pbkdf2Into with a key-memory destination.
// It runs serially: the KDF calibration measures with it, so that an
// iteration count means the time a serial implementation (cryptsetup,
// QEMU) spends.
func pbkdf2Key(newHash func() hash.Hash, password, salt []byte, iter, keyLen int) []byte {
	out, _ := pbkdf2KeyContext(context.Background(), newHash, password, salt, iter, keyLen)
	return out
}

// pbkdf2KeyContext is pbkdf2Key stopping with ctx's error when ctx is
// done (unlocking checks digests with it).
func pbkdf2KeyContext(ctx context.Context, newHash func() hash.Hash, password, salt []byte, iter, keyLen int) ([]byte, error) {
	out := make([]byte, keyLen)
	if err := pbkdf2Blocks(ctx, out, newHash, password, salt, iter, 1); err != nil {
		return nil, err
	}
	return out, nil
}

// pbkdf2Into is PBKDF2 into dst; the output blocks (one per hash size of
// output: two for a 512-bit XTS key with SHA-256) are independent chains,
// so they run on separate cores. Hand-written instead of
// golang.org/x/crypto/pbkdf2, which neither keeps its buffers in key
// memory nor computes blocks in parallel, nor stops when asked. When ctx is
// done it returns ctx's error within a few thousand iterations (about a
// millisecond) and dst holds no complete key.
func pbkdf2Into(ctx context.Context, dst []byte, newHash func() hash.Hash, password, salt []byte, iter int) error {
	hs := newHash().Size()
	nb := (len(dst) + hs - 1) / hs
	if nb == 1 || runtime.GOMAXPROCS(0) == 1 {
		return pbkdf2Blocks(ctx, dst, newHash, password, salt, iter, 1)
	}
	var wg sync.WaitGroup
	for b := 1; b < nb; b++ {
		part := dst[(b-1)*hs : b*hs]
		wg.Go(func() { _ = pbkdf2Blocks(ctx, part, newHash, password, salt, iter, uint32(b)) })
	}
	err := pbkdf2Blocks(ctx, dst[(nb-1)*hs:], newHash, password, salt, iter, uint32(nb))
	wg.Wait()
	if err == nil {
		err = ctx.Err() // another block may have stopped after this one ended
	}
	return err
}

// pbkdf2Poll is how many iterations pass between two looks at the context:
// about a millisecond with SHA-256, a cost lost in the noise.
const pbkdf2Poll = 4096

// pbkdf2Blocks writes PBKDF2 (RFC 8018) with HMAC over newHash into dst
// (len(dst) bytes of output), starting with output block first. Unlike golang.org/x/crypto/pbkdf2, which
// copies the password into an immutable string, it keeps every
// password-derived buffer in key memory (keyBuf) and wipes it (and resets
// the hash states) before returning, so only dst holds secret material.
// HMAC's inner and outer states are precomputed once and restored per
// iteration, two compressions per iteration like crypto/hmac. iter and
// len(dst) must be positive. It returns ctx's error, with dst incomplete,
// when ctx is done before the end.
func pbkdf2Blocks(ctx context.Context, dst []byte, newHash func() hash.Hash, password, salt []byte, iter int, first uint32) error {
	inner, outer := newHash(), newHash()
	bs, hs := inner.BlockSize(), inner.Size()

	// One key-memory buffer for the scratch: HMAC pad and key, U and T.
	scratch := keyBuf(2*bs + 2*hs)
	defer freeKey(scratch)
	pad, key := scratch[:bs:bs], scratch[bs:2*bs:2*bs]
	u, t := scratch[2*bs:2*bs+hs:2*bs+hs], scratch[2*bs+hs:]
	if len(password) > bs {
		inner.Write(password)
		inner.Sum(pad[:0])
		inner.Reset()
	} else {
		copy(pad, password)
	}
	copy(key, pad) // zero-padded HMAC key

	for i := range pad {
		pad[i] = key[i] ^ 0x36
	}
	inner.Write(pad)
	for i := range pad {
		pad[i] = key[i] ^ 0x5c
	}
	outer.Write(pad)

	im, iok := inner.(encoding.BinaryMarshaler)
	om, ook := outer.(encoding.BinaryMarshaler)
	iu, iuok := inner.(encoding.BinaryUnmarshaler)
	ou, ouok := outer.(encoding.BinaryUnmarshaler)
	var innerState, outerState []byte
	if iok && ook && iuok && ouok {
		var err1, err2 error
		innerState, err1 = im.MarshalBinary()
		outerState, err2 = om.MarshalBinary()
		if err1 != nil || err2 != nil {
			innerState, outerState = nil, nil
		}
	}
	defer func() {
		clear(innerState)
		clear(outerState)
		inner.Reset()
		outer.Reset()
	}()

	// prf computes HMAC(key, msg) into dst (len hs).
	prf := func(dst []byte, msg ...[]byte) {
		if innerState != nil {
			_ = iu.UnmarshalBinary(innerState)
			_ = ou.UnmarshalBinary(outerState)
		} else {
			inner.Reset()
			outer.Reset()
			for i := range pad {
				pad[i] = key[i] ^ 0x36
			}
			inner.Write(pad)
			for i := range pad {
				pad[i] = key[i] ^ 0x5c
			}
			outer.Write(pad)
		}
		for _, m := range msg {
			inner.Write(m)
		}
		s := inner.Sum(dst[:0])
		outer.Write(s)
		outer.Sum(dst[:0])
	}

	var ctr [4]byte
	for block, done := first, 0; done < len(dst); block++ {
		binary.BigEndian.PutUint32(ctr[:], block)
		prf(u, salt, ctr[:])
		copy(t, u)
		for n := 1; n < iter; n++ {
			if n%pbkdf2Poll == 0 && ctx.Err() != nil {
				return ctx.Err()
			}
			prf(u, u)
			for i := range t {
				t[i] ^= u[i]
			}
		}
		done += copy(dst[done:], t)
	}
	return nil
}
