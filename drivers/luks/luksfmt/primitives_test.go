package luksfmt

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // RFC 6070 vectors
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"hash"
	"testing"
	"time"

	xpbkdf2 "golang.org/x/crypto/pbkdf2"
)

// TestPBKDF2Vectors checks the package's PBKDF2 against RFC 6070 (SHA-1)
// and RFC 7914 section 11 (SHA-256).
func TestPBKDF2Vectors(t *testing.T) {
	tests := []struct {
		h          func() hash.Hash
		pass, salt string
		iter, n    int
		want       string
	}{
		{sha1.New, "password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"},
		{sha1.New, "password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"},
		{sha1.New, "password", "salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"},
		{sha1.New, "passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25, "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"},
		{sha1.New, "pass\x00word", "sa\x00lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"},
		{sha256.New, "passwd", "salt", 1, 64, "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"},
		{sha256.New, "Password", "NaCl", 80000, 64, "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d"},
	}
	for _, tc := range tests {
		got := pbkdf2Key(tc.h, []byte(tc.pass), []byte(tc.salt), tc.iter, tc.n)
		if hex.EncodeToString(got) != tc.want {
			t.Errorf("pbkdf2(%q, %q, %d) = %x, want %s", tc.pass, tc.salt, tc.iter, got, tc.want)
		}
	}
}

// TestPBKDF2MatchesXCrypto compares with golang.org/x/crypto/pbkdf2 on
// passwords shorter and longer than the hash block and odd key lengths.
func TestPBKDF2MatchesXCrypto(t *testing.T) {
	for _, h := range []func() hash.Hash{sha1.New, sha256.New, sha512.New, sha512.New384, sha256.New224} {
		for _, plen := range []int{0, 1, 63, 64, 65, 128, 129, 300} {
			pass := make([]byte, plen)
			salt := make([]byte, 32)
			rand.Read(pass)
			rand.Read(salt)
			for _, n := range []int{1, 20, 32, 33, 64, 100} {
				want := xpbkdf2.Key(pass, salt, 7, n, h)
				if got := pbkdf2Key(h, pass, salt, 7, n); !bytes.Equal(got, want) {
					t.Fatalf("hash size %d, password %d bytes, key %d bytes: mismatch", h().Size(), plen, n)
				}
				// The parallel form (one goroutine per output block).
				got := keyBuf(n)
				pbkdf2Into(context.Background(), got, h, pass, salt, 7)
				if !bytes.Equal(got, want) {
					t.Fatalf("parallel: hash size %d, password %d bytes, key %d bytes: mismatch", h().Size(), plen, n)
				}
				freeKey(got)
			}
		}
	}
}

// TestAFMergeKnownAnswer checks the AF merge against values computed with an
// independent implementation (Python's hashlib, following cryptsetup's
// af.c), including a digest shorter than the key (sha1, 20 < 32 bytes).
func TestAFMergeKnownAnswer(t *testing.T) {
	src := make([]byte, 32*5)
	for i := range src {
		src[i] = byte((i*7 + 3) % 256)
	}
	for _, tc := range []struct{ hash, want string }{
		{"sha1", "940172d68ed8b5f266b370c897cf2eb23a6a02320a724776ab881de4043b9ab9"},
		{"sha256", "575ae1aafeb1b0f815314409d65caa4e5e412e46e219a0fdb25d8a7500f1ea58"},
		{"sha512", "d51868321b4963868837076dd318b971f769e0ceb3901df3f67a6b1cfbd18675"},
	} {
		hf, err := lookupHash(tc.hash)
		if err != nil {
			t.Fatal(err)
		}
		key := make([]byte, 32)
		afMerge(hf, src, key, 5)
		if hex.EncodeToString(key) != tc.want {
			t.Errorf("%s: merge = %x, want %s", tc.hash, key, tc.want)
		}
	}
}

// TestAFSplitMerge checks that split material merges back to the key and
// that destroying any single stripe makes the key unrecoverable.
func TestAFSplitMerge(t *testing.T) {
	for _, keyLen := range []int{16, 32, 64} {
		for _, name := range []string{"sha1", "sha256", "sha512"} {
			hf, _ := lookupHash(name)
			key := make([]byte, keyLen)
			rand.Read(key)
			buf := make([]byte, afSectors(keyLen, stripes)*sectorSize)
			if err := afSplit(hf, key, buf, stripes); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, keyLen)
			afMerge(hf, buf, got, stripes)
			if !bytes.Equal(got, key) {
				t.Fatalf("%s/%d: merge(split(key)) != key", name, keyLen)
			}
			for _, stripe := range []int{0, stripes / 2, stripes - 1} {
				damaged := bytes.Clone(buf)
				damaged[stripe*keyLen] ^= 1
				afMerge(hf, damaged, got, stripes)
				if bytes.Equal(got, key) {
					t.Fatalf("%s/%d: key survived damage to stripe %d", name, keyLen, stripe)
				}
			}
		}
	}
}

func TestKDFLimits(t *testing.T) {
	salt := make([]byte, saltSize)
	tests := []struct {
		name string
		p    kdfParams
		want error
	}{
		{"argon2 memory above 4 GiB", kdfParams{typ: KDFArgon2id, iterations: 4, memoryKiB: MaxArgon2MemoryKiB + 1, parallel: 1, salt: salt}, ErrUnsupported},
		{"argon2 absurd work", kdfParams{typ: KDFArgon2i, iterations: 1 << 31, memoryKiB: 1024, parallel: 1, salt: salt}, ErrUnsupported},
		{"argon2 zero time", kdfParams{typ: KDFArgon2id, iterations: 0, memoryKiB: 1024, parallel: 1, salt: salt}, ErrCorrupt},
		{"argon2 too little memory per thread", kdfParams{typ: KDFArgon2id, iterations: 4, memoryKiB: 16, parallel: 4, salt: salt}, ErrCorrupt},
		{"argon2 too many threads", kdfParams{typ: KDFArgon2id, iterations: 4, memoryKiB: 1 << 20, parallel: 256, salt: salt}, ErrUnsupported},
		{"pbkdf2 absurd iterations", kdfParams{typ: KDFPBKDF2, hash: "sha256", iterations: 1<<32 - 1, salt: salt}, ErrUnsupported},
		{"pbkdf2 unknown hash", kdfParams{typ: KDFPBKDF2, hash: "whirlpool", iterations: 1000, salt: salt}, ErrUnsupported},
		{"unknown kdf", kdfParams{typ: "scrypt", iterations: 1000, salt: salt}, ErrUnsupported},
		{"short salt", kdfParams{typ: KDFPBKDF2, hash: "sha256", iterations: 1000, salt: salt[:16]}, ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// derive must refuse before allocating or computing anything.
			if _, err := tc.p.derive(context.Background(), []byte("x"), 32); err == nil || !errors.Is(err, tc.want) {
				t.Fatalf("derive: %v, want %v", err, tc.want)
			}
		})
	}
}

func TestNewKDFParams(t *testing.T) {
	tests := []struct {
		name string
		opts KDF
		ok   bool
	}{
		{"forced pbkdf2", KDF{Type: KDFPBKDF2, Iterations: 1000}, true},
		{"pbkdf2 below minimum", KDF{Type: KDFPBKDF2, Iterations: 999}, false},
		{"pbkdf2 with memory", KDF{Type: KDFPBKDF2, Iterations: 1000, MemoryKiB: 32}, false},
		{"forced argon2id", KDF{Type: KDFArgon2id, Iterations: 4, MemoryKiB: 32, Parallel: 1}, true},
		{"argon2 time below minimum", KDF{Type: KDFArgon2id, Iterations: 3, MemoryKiB: 32}, false},
		{"argon2 memory below minimum", KDF{Type: KDFArgon2i, Iterations: 4, MemoryKiB: 31}, false},
		{"argon2 too many threads", KDF{Type: KDFArgon2i, Iterations: 4, MemoryKiB: 64, Parallel: 5}, false},
		{"unknown type", KDF{Type: "bcrypt", Iterations: 1000}, false},
		{"negative time", KDF{Type: KDFPBKDF2, IterTime: -1}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := newKDFParams(tc.opts, KDFPBKDF2, "sha256", 32)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if err == nil {
				if err := p.check(); err != nil {
					t.Fatalf("new params fail the read limits: %v", err)
				}
			}
		})
	}
}

// TestKDFCalibration runs the benchmarks with short targets and checks that
// the results land in the right range.
func TestKDFCalibration(t *testing.T) {
	if testing.Short() {
		t.Skip("benchmarks the KDFs")
	}
	p, err := newKDFParams(KDF{Type: KDFPBKDF2, IterTime: 100 * time.Millisecond}, KDFPBKDF2, "sha256", 64)
	if err != nil {
		t.Fatal(err)
	}
	if p.iterations < minPBKDF2Iterations {
		t.Fatalf("pbkdf2 iterations %d", p.iterations)
	}
	start := startClock()
	k, err := p.derive(context.Background(), []byte("x"), 64)
	if err != nil {
		t.Fatal(err)
	}
	clear(k)
	if d := start.elapsed(); d < 30*time.Millisecond || d > 400*time.Millisecond {
		t.Errorf("pbkdf2 calibrated for 100ms took %v", d)
	}
	a, err := newKDFParams(KDF{Type: KDFArgon2id, IterTime: 200 * time.Millisecond, MemoryKiB: 64 * 1024}, KDFArgon2id, "sha256", 64)
	if err != nil {
		t.Fatal(err)
	}
	if a.iterations < minArgon2Time || a.memoryKiB < minArgon2MemoryKiB || a.memoryKiB > 64*1024 || a.parallel < 1 {
		t.Fatalf("argon2 params %+v", a)
	}
}
