package blockcrypto

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/crypto/xts"
	"golang.org/x/sys/unix"

	"blockd/internal/keymem"
)

// forEachImpl runs f once per implementation this CPU supports, so the
// portable and AES-NI paths are covered on a VAES machine too.
func forEachImpl(t *testing.T, f func(t *testing.T, impl implKind)) {
	t.Helper()
	for _, impl := range supportedImpls() {
		t.Run(impl.String(), func(t *testing.T) { f(t, impl) })
	}
}

func mustNew(t testing.TB, spec Spec, key []byte, impl implKind) *Cipher {
	t.Helper()
	c, err := newCipher(spec, key, impl)
	if err != nil {
		t.Fatalf("newCipher(%v, %d-byte key, %v): %v", spec, len(key), impl, err)
	}
	t.Cleanup(c.Wipe)
	if c.impl != impl {
		t.Fatalf("impl = %v, want %v", c.impl, impl)
	}
	return c
}

// refXTS encrypts or decrypts a run of sectors with golang.org/x/crypto/xts.
func refXTS(t testing.TB, key, src []byte, first uint64, ss int, plain, enc bool) []byte {
	t.Helper()
	x, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(src))
	for i := 0; i < len(src); i += ss {
		sec := first + uint64(i/ss)
		if plain {
			sec &= 0xffffffff
		}
		if enc {
			x.Encrypt(out[i:i+ss], src[i:i+ss], sec)
		} else {
			x.Decrypt(out[i:i+ss], src[i:i+ss], sec)
		}
	}
	return out
}

// refCBC encrypts or decrypts a run of sectors with crypto/cipher's CBC and
// the dm-crypt IV generators.
func refCBC(t testing.TB, key []byte, ivgen string, src []byte, first uint64, ss int, enc bool) []byte {
	t.Helper()
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	var essiv cipher.Block
	if ivgen == "essiv" {
		h := sha256.Sum256(key)
		essiv, _ = aes.NewCipher(h[:])
	}
	out := make([]byte, len(src))
	for i := 0; i < len(src); i += ss {
		sec := first + uint64(i/ss)
		iv := make([]byte, 16)
		switch ivgen {
		case "plain":
			binary.LittleEndian.PutUint32(iv, uint32(sec))
		case "plain64":
			binary.LittleEndian.PutUint64(iv, sec)
		case "essiv":
			binary.LittleEndian.PutUint64(iv, sec)
			essiv.Encrypt(iv, iv)
		}
		if enc {
			cipher.NewCBCEncrypter(b, iv).CryptBlocks(out[i:i+ss], src[i:i+ss])
		} else {
			cipher.NewCBCDecrypter(b, iv).CryptBlocks(out[i:i+ss], src[i:i+ss])
		}
	}
	return out
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// interestingFirst returns starting sector numbers that exercise the plain
// IV's 32-bit wrap and 64-bit wrap as well as random ones.
func interestingFirst(r *rand.Rand) uint64 {
	switch r.IntN(5) {
	case 0:
		return uint64(r.IntN(100))
	case 1:
		return 0xffffffff - uint64(r.IntN(20))
	case 2:
		return ^uint64(0) - uint64(r.IntN(20))
	default:
		return r.Uint64()
	}
}

// checkRun compares Encrypt and Decrypt of c against want functions, both
// out of place and in place.
func checkRun(t *testing.T, c *Cipher, plain []byte, first uint64, ss int, wantCT []byte) {
	t.Helper()
	ct := make([]byte, len(plain))
	if err := c.Encrypt(ct, plain, first, ss); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ct, wantCT) {
		t.Fatalf("%v %s: encrypt %d bytes, ss %d, first %#x: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, first, firstDiff(ct, wantCT))
	}
	pt := make([]byte, len(plain))
	if err := c.Decrypt(pt, ct, first, ss); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pt, plain) {
		t.Fatalf("%v %s: decrypt %d bytes, ss %d, first %#x: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, first, firstDiff(pt, plain))
	}
	buf := append([]byte(nil), plain...)
	if err := c.Encrypt(buf, buf, first, ss); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, wantCT) {
		t.Fatalf("%v %s: in-place encrypt %d bytes, ss %d: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, firstDiff(buf, wantCT))
	}
	if err := c.Decrypt(buf, buf, first, ss); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, plain) {
		t.Fatalf("%v %s: in-place decrypt %d bytes, ss %d: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, firstDiff(buf, plain))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// Sector sizes: the LUKS ones, plus odd multiples of 16 that leave a tail
// after the 8- and 16-block batches.
var testSectorSizes = []int{16, 32, 48, 112, 128, 240, 256, 272, 496, 512, 1024, 2048, 4080, 4096}

func TestXTSMatchesReference(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(1, uint64(impl)))
		for _, keyLen := range []int{32, 48, 64} {
			for _, mode := range []string{"xts-plain64", "xts-plain"} {
				for iter := 0; iter < 40; iter++ {
					key := randBytes(r, keyLen)
					c := mustNew(t, Spec{"aes", mode}, key, impl)
					ss := testSectorSizes[r.IntN(len(testSectorSizes))]
					n := 1 + r.IntN(40)
					if ss >= 2048 {
						n = 1 + r.IntN(20)
					}
					first := interestingFirst(r)
					plain := randBytes(r, n*ss)
					want := refXTS(t, key, plain, first, ss, mode == "xts-plain", true)
					checkRun(t, c, plain, first, ss, want)
				}
			}
		}
	})
}

func TestXTSAllSectorSizesAndCounts(t *testing.T) {
	// Every multiple of 16 up to 512 bytes, and every run length around
	// the IV batch size, for each key size.
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(2, uint64(impl)))
		for _, keyLen := range []int{32, 48, 64} {
			key := randBytes(r, keyLen)
			c := mustNew(t, Spec{"aes", "xts-plain64"}, key, impl)
			for ss := 16; ss <= 512; ss += 16 {
				plain := randBytes(r, ss)
				first := r.Uint64()
				checkRun(t, c, plain, first, ss, refXTS(t, key, plain, first, ss, false, true))
			}
			for n := 1; n <= 3*16+1; n++ {
				plain := randBytes(r, n*512)
				first := r.Uint64()
				checkRun(t, c, plain, first, 512, refXTS(t, key, plain, first, 512, false, true))
			}
		}
	})
}

func TestCBCMatchesReference(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(3, uint64(impl)))
		for _, keyLen := range []int{16, 24, 32} {
			for _, ivgen := range []string{"plain", "plain64", "essiv"} {
				mode := "cbc-" + ivgen
				if ivgen == "essiv" {
					mode += ":sha256"
				}
				for iter := 0; iter < 30; iter++ {
					key := randBytes(r, keyLen)
					c := mustNew(t, Spec{"aes", mode}, key, impl)
					ss := testSectorSizes[r.IntN(len(testSectorSizes))]
					n := 1 + r.IntN(40)
					if ss >= 2048 {
						n = 1 + r.IntN(20)
					}
					first := interestingFirst(r)
					plain := randBytes(r, n*ss)
					want := refCBC(t, key, ivgen, plain, first, ss, true)
					checkRun(t, c, plain, first, ss, want)
				}
			}
		}
	})
}

func TestCBCAllSectorCounts(t *testing.T) {
	// Run lengths around the 8-sector groups of the CBC encrypt kernel and
	// the IV batch.
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(4, uint64(impl)))
		key := randBytes(r, 32)
		c := mustNew(t, Spec{"aes", "cbc-essiv:sha256"}, key, impl)
		for _, ss := range []int{16, 48, 512} {
			for n := 1; n <= 3*16+1; n++ {
				plain := randBytes(r, n*ss)
				first := r.Uint64()
				checkRun(t, c, plain, first, ss, refCBC(t, key, "essiv", plain, first, ss, true))
			}
		}
	})
}

// TestImplementationsAgree cross-checks the implementations against each
// other on large multi-batch requests (which also go through the parallel
// split).
func TestImplementationsAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	plain := randBytes(r, 1<<20)
	for _, spec := range []Spec{{"aes", "xts-plain64"}, {"aes", "cbc-essiv:sha256"}} {
		key := randBytes(r, 64)
		if spec.Mode != "xts-plain64" {
			key = key[:32]
		}
		var want []byte
		for _, impl := range supportedImpls() {
			c := mustNew(t, spec, key, impl)
			got := make([]byte, len(plain))
			if err := c.Encrypt(got, plain, 12345, 4096); err != nil {
				t.Fatal(err)
			}
			if want == nil {
				want = got
			} else if !bytes.Equal(got, want) {
				t.Fatalf("%v %v differs from portable at byte %d", spec, impl, firstDiff(got, want))
			}
		}
	}
}

func TestParallelSplit(t *testing.T) {
	defer func(old, oldProcs int) {
		parallelMin = old
		runtime.GOMAXPROCS(oldProcs)
	}(parallelMin, runtime.GOMAXPROCS(4))
	parallelMin = 4096
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(6, uint64(impl)))
		for _, mode := range []string{"xts-plain64", "xts-plain", "cbc-plain64"} {
			key := randBytes(r, 32)
			c := mustNew(t, Spec{"aes", mode}, key, impl)
			for _, n := range []int{8, 9, 17, 31, 64, 257} {
				plain := randBytes(r, n*512)
				first := interestingFirst(r)
				var want []byte
				if mode[:3] == "xts" {
					want = refXTS(t, key, plain, first, 512, mode == "xts-plain", true)
				} else {
					want = refCBC(t, key, "plain64", plain, first, 512, true)
				}
				checkRun(t, c, plain, first, 512, want)
			}
		}
	})
}

func TestConcurrentUse(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(7, uint64(impl)))
		key := randBytes(r, 64)
		c := mustNew(t, Spec{"aes", "xts-plain64"}, key, impl)
		plain := randBytes(r, 64*512)
		want := refXTS(t, key, plain, 99, 512, false, true)
		errc := make(chan error, 8)
		for g := 0; g < 8; g++ {
			go func() {
				out := make([]byte, len(plain))
				for i := 0; i < 20; i++ {
					if err := c.Encrypt(out, plain, 99, 512); err != nil {
						errc <- err
						return
					}
					if !bytes.Equal(out, want) {
						errc <- errors.New("concurrent encrypt mismatch")
						return
					}
				}
				errc <- nil
			}()
		}
		for g := 0; g < 8; g++ {
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestNoAllocations(t *testing.T) {
	if testing.CoverMode() != "" || raceEnabled {
		t.Skip("allocation counts differ under coverage or the race detector")
	}
	for _, spec := range []Spec{{"aes", "xts-plain64"}, {"aes", "cbc-essiv:sha256"}, {"aes", "cbc-plain"}} {
		t.Run(spec.Mode, func(t *testing.T) { testNoAllocations(t, spec) })
	}
}

func testNoAllocations(t *testing.T, spec Spec) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		c := mustNew(t, spec, make([]byte, 32), impl)
		buf := make([]byte, 64<<10)
		for _, tc := range []struct{ n, ss int }{{512, 512}, {4096, 512}, {4096, 4096}, {64 << 10, 4096}} {
			allocs := testing.AllocsPerRun(50, func() {
				if err := c.Encrypt(buf[:tc.n], buf[:tc.n], 7, tc.ss); err != nil {
					t.Fatal(err)
				}
				if err := c.Decrypt(buf[:tc.n], buf[:tc.n], 7, tc.ss); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Errorf("%d bytes in %d-byte sectors: %v allocations per call", tc.n, tc.ss, allocs)
			}
		}
	})
}

func TestErrors(t *testing.T) {
	key := make([]byte, 64)
	c, err := New(Spec{"aes", "xts-plain64"}, key)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for _, tc := range []struct {
		dst, src []byte
		ss       int
		want     error
	}{
		{buf, buf[:1000], 512, ErrBadLength},
		{buf, buf, 0, ErrBadLength},
		{buf, buf, -512, ErrBadLength},
		{buf, buf[:520], 520, ErrBadLength}, // not a multiple of 16
		{buf[:512], buf[:1024], 512, ErrBadLength},
		{buf[16:1040], buf[:1024], 512, ErrOverlap},
		{buf[:1024], buf[512:1536], 512, ErrOverlap},
	} {
		if err := c.Encrypt(tc.dst, tc.src, 0, tc.ss); !errors.Is(err, tc.want) {
			t.Errorf("Encrypt(len %d, len %d, ss %d) = %v, want %v", len(tc.dst), len(tc.src), tc.ss, err, tc.want)
		}
		if err := c.Decrypt(tc.dst, tc.src, 0, tc.ss); !errors.Is(err, tc.want) {
			t.Errorf("Decrypt(len %d, len %d, ss %d) = %v, want %v", len(tc.dst), len(tc.src), tc.ss, err, tc.want)
		}
	}
	// Empty requests and non-overlapping neighbours are fine.
	if err := c.Encrypt(nil, nil, 0, 512); err != nil {
		t.Errorf("empty request: %v", err)
	}
	if err := c.Encrypt(buf[:512], buf[512:1024], 0, 512); err != nil {
		t.Errorf("adjacent buffers: %v", err)
	}

	for _, tc := range []struct {
		spec   Spec
		keyLen int
	}{
		{Spec{"twofish", "xts-plain64"}, 64},
		{Spec{"aes", "xts-essiv:sha256"}, 64},
		{Spec{"aes", "xts-benbi"}, 64},
		{Spec{"aes", "xts-plain64:sha256"}, 64},
		{Spec{"aes", "xts-plain64"}, 16},
		{Spec{"aes", "xts-plain64"}, 40},
		{Spec{"aes", "cbc-essiv:sha1"}, 32},
		{Spec{"aes", "cbc-plain"}, 64},
		{Spec{"aes", "ecb"}, 32},
		{Spec{"aes", "ctr-plain64"}, 32},
	} {
		if _, err := New(tc.spec, make([]byte, tc.keyLen)); !errors.Is(err, ErrUnsupported) {
			t.Errorf("New(%v, %d-byte key) = %v, want ErrUnsupported", tc.spec, tc.keyLen, err)
		}
	}
}

func TestAccessors(t *testing.T) {
	spec := Spec{"aes", "xts-plain64"}
	c, err := New(spec, make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	if c.Spec() != spec || c.KeySize() != 64 || c.Implementation() != defaultImpl.String() {
		t.Errorf("Spec %v KeySize %d Implementation %q", c.Spec(), c.KeySize(), c.Implementation())
	}
}

func TestWipe(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		for _, spec := range []Spec{{"aes", "xts-plain64"}, {"aes", "cbc-essiv:sha256"}} {
			key := bytes.Repeat([]byte{0xa5}, 32)
			if spec.Mode == "xts-plain64" {
				key = bytes.Repeat([]byte{0xa5}, 64)
			}
			c := mustNew(t, spec, key, impl)
			buf := make([]byte, 512)
			if err := c.Encrypt(buf, buf, 0, 512); err != nil {
				t.Fatal(err)
			}
			// The key copy and the round keys are in the cipher's keymem
			// region, which is left out of core dumps and wiped on fork.
			if !bytes.Equal(c.key, key) {
				t.Fatalf("%v: key copy %x", spec, c.key)
			}
			if impl != implPortable && (c.k1.rounds == 0 || c.k2.rounds == 0) {
				t.Fatalf("%v: round keys not expanded", spec)
			}
			base := uintptr(unsafe.Pointer(&c.mem[0]))
			for name, p := range map[string]unsafe.Pointer{"key": unsafe.Pointer(&c.key[0]),
				"k1": unsafe.Pointer(c.k1), "k2": unsafe.Pointer(c.k2)} {
				if a := uintptr(p); a < base || a >= base+uintptr(len(c.mem)) {
					t.Fatalf("%v: %s at %#x, outside the key region %#x+%d", spec, name, a, base, len(c.mem))
				}
			}
			if flags := vmFlags(t, base); !strings.Contains(flags, "dd") || !strings.Contains(flags, "wf") {
				t.Errorf("%v: key region VmFlags %q, want dd (no dump) and wf (wipe on fork)", spec, flags)
			}
			if keymem.IsLocked(c.mem) && !strings.Contains(vmFlags(t, base), "lo") {
				t.Errorf("%v: key region reported locked but not mlocked", spec)
			}
			blocks := append([]cipher.Block(nil), c.blocks...)
			if impl == implPortable && len(blocks) != 2 {
				t.Fatalf("portable %v holds %d blocks, want 2", spec, len(blocks))
			}
			c.Wipe()
			if c.key != nil || c.k1 != nil || c.k2 != nil || c.mem != nil {
				t.Errorf("%v: key memory still referenced after Wipe", spec)
			}
			// keymem.Free zeroes the region before it unmaps it.
			if mapped(base) {
				t.Errorf("%v: key region still mapped after Wipe", spec)
			}
			for _, b := range blocks {
				if !allZero(blockMemory(b)) {
					t.Errorf("%v: crypto/aes round keys of %T not wiped", spec, b)
				}
			}
			if err := c.Encrypt(buf, buf, 0, 512); !errors.Is(err, ErrWiped) {
				t.Errorf("Encrypt after Wipe = %v, want ErrWiped", err)
			}
			c.Wipe() // again: nothing happens
			if err := c.Close(); err != nil {
				t.Errorf("Close after Wipe: %v", err)
			}
		}
	})
}

// TestDroppedCipherFreesKeyMemory checks that a cipher that is dropped
// without Wipe gives its key region back once collected.
func TestDroppedCipherFreesKeyMemory(t *testing.T) {
	c, err := New(Spec{"aes", "xts-plain64"}, make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	base := uintptr(unsafe.Pointer(&c.mem[0]))
	c = nil
	for i := 0; i < 50 && mapped(base); i++ {
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
	if mapped(base) {
		t.Fatal("the key region of an unreachable cipher is still mapped")
	}
}

// vmFlags returns the smaps VmFlags of the mapping that contains addr.
func vmFlags(t *testing.T, addr uintptr) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(f[0], "-"); ok && !strings.HasSuffix(f[0], ":") {
			start, err1 := strconv.ParseUint(lo, 16, 64)
			end, err2 := strconv.ParseUint(hi, 16, 64)
			in = err1 == nil && err2 == nil && uint64(addr) >= start && uint64(addr) < end
			continue
		}
		if in && f[0] == "VmFlags:" {
			return strings.Join(f[1:], " ")
		}
	}
	t.Fatalf("no mapping contains %#x", addr)
	return ""
}

// mapped reports whether the page at addr is mapped (mincore fails with
// ENOMEM for unmapped memory).
func mapped(addr uintptr) bool {
	page := uintptr(os.Getpagesize())
	var vec [1]byte
	_, _, e := unix.Syscall(unix.SYS_MINCORE, addr&^(page-1), page, uintptr(unsafe.Pointer(&vec[0])))
	return e != unix.ENOMEM
}

func TestWipeBlockTouchesRoundKeys(t *testing.T) {
	// The memory wipeBlock clears must be what the block encrypts with.
	b, err := aes.NewCipher(bytes.Repeat([]byte{1}, 32))
	if err != nil {
		t.Fatal(err)
	}
	mem := blockMemory(b)
	if len(mem) < 240 || allZero(mem) {
		t.Fatalf("crypto/aes block memory: %d bytes, zero %v", len(mem), allZero(mem))
	}
	wipeBlock(b)
	if !allZero(mem) {
		t.Fatal("block memory not zero after wipeBlock")
	}
}

// blockMemory returns the bytes wipeBlock clears, or nil if it would not
// touch b.
func blockMemory(b cipher.Block) []byte {
	v := reflect.ValueOf(b)
	if v.Kind() != reflect.Pointer || v.IsNil() || !pointerFree(v.Type().Elem()) {
		return nil
	}
	return unsafe.Slice((*byte)(v.UnsafePointer()), v.Type().Elem().Size())
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

func TestSpecStrings(t *testing.T) {
	// Every spec LUKS volumes commonly use is accepted with the right key sizes.
	for _, tc := range []struct {
		mode string
		keys []int
	}{
		{"xts-plain64", []int{32, 48, 64}},
		{"xts-plain", []int{32, 48, 64}},
		{"cbc-essiv:sha256", []int{16, 24, 32}},
		{"cbc-plain64", []int{16, 24, 32}},
		{"cbc-plain", []int{16, 24, 32}},
	} {
		for _, k := range tc.keys {
			if _, err := New(Spec{"aes", tc.mode}, make([]byte, k)); err != nil {
				t.Errorf("New(%s, %d): %v", tc.mode, k, err)
			}
		}
	}
}

func ExampleCipher_Encrypt() {
	key := make([]byte, 64) // a 512-bit aes-xts-plain64 volume key
	c, err := New(Spec{Cipher: "aes", Mode: "xts-plain64"}, key)
	if err != nil {
		panic(err)
	}
	defer c.Wipe()
	buf := make([]byte, 8*512) // sectors 100..107
	if err := c.Encrypt(buf, buf, 100, 512); err != nil {
		panic(err)
	}
	if err := c.Decrypt(buf, buf, 100, 512); err != nil {
		panic(err)
	}
	fmt.Println(allZero(buf))
	// Output: true
}
