package blockcrypto

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"runtime"
	"testing"
)

// Tests of EncryptUnits/DecryptUnits: sectors whose IV numbers advance by
// sectorSize/ivUnit per sector (LUKS2 with 4 KiB sectors: 8 per sector).

// refUnits is the reference for a run with IV unit unit: each sector on its
// own through golang.org/x/crypto/xts or crypto/cipher's CBC (refXTS,
// refCBC), numbered first + k*ss/unit.
func refUnits(t testing.TB, spec Spec, key, src []byte, first uint64, ss, unit int, enc bool) []byte {
	t.Helper()
	out := make([]byte, 0, len(src))
	step := uint64(ss / unit)
	for k := 0; k*ss < len(src); k++ {
		sec := src[k*ss : (k+1)*ss]
		num := first + uint64(k)*step
		switch spec.Mode {
		case "xts-plain64", "xts-plain":
			out = append(out, refXTS(t, key, sec, num, ss, spec.Mode == "xts-plain", enc)...)
		case "cbc-plain", "cbc-plain64":
			out = append(out, refCBC(t, key, spec.Mode[4:], sec, num, ss, enc)...)
		case "cbc-essiv:sha256":
			out = append(out, refCBC(t, key, "essiv", sec, num, ss, enc)...)
		default:
			t.Fatalf("no reference for %v", spec)
		}
	}
	return out
}

// perSector does a run one sector per Encrypt/Decrypt call, which is how
// a caller had to do sectors with a different IV unit before EncryptUnits.
func perSector(t testing.TB, c *Cipher, src []byte, first uint64, ss, unit int, enc bool) []byte {
	t.Helper()
	out := make([]byte, len(src))
	for i := 0; i < len(src); i += ss {
		num := first + uint64(i/unit)
		var err error
		if enc {
			err = c.Encrypt(out[i:i+ss], src[i:i+ss], num, ss)
		} else {
			err = c.Decrypt(out[i:i+ss], src[i:i+ss], num, ss)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// checkUnits checks a batch against the reference and the per-sector
// calls, out of place and in place, both ways.
func checkUnits(t *testing.T, c *Cipher, key, plain []byte, first uint64, ss, unit int) {
	t.Helper()
	want := refUnits(t, c.spec, key, plain, first, ss, unit, true)
	if ps := perSector(t, c, plain, first, ss, unit, true); !bytes.Equal(ps, want) {
		t.Fatalf("%v %s: per-sector calls differ from the reference at byte %d", c.impl, c.spec.Mode, firstDiff(ps, want))
	}
	ct := make([]byte, len(plain))
	if err := c.EncryptUnits(ct, plain, first, ss, unit); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ct, want) {
		t.Fatalf("%v %s: EncryptUnits %d bytes, ss %d, unit %d, first %#x: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, unit, first, firstDiff(ct, want))
	}
	pt := make([]byte, len(plain))
	if err := c.DecryptUnits(pt, ct, first, ss, unit); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pt, plain) {
		t.Fatalf("%v %s: DecryptUnits %d bytes, ss %d, unit %d: mismatch at byte %d",
			c.impl, c.spec.Mode, len(plain), ss, unit, firstDiff(pt, plain))
	}
	if ps := perSector(t, c, ct, first, ss, unit, false); !bytes.Equal(ps, plain) {
		t.Fatalf("%v %s: per-sector decrypt of the batch's output: mismatch at byte %d", c.impl, c.spec.Mode, firstDiff(ps, plain))
	}
	buf := append([]byte(nil), plain...)
	if err := c.EncryptUnits(buf, buf, first, ss, unit); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, want) {
		t.Fatalf("%v %s: in-place EncryptUnits: mismatch at byte %d", c.impl, c.spec.Mode, firstDiff(buf, want))
	}
	if err := c.DecryptUnits(buf, buf, first, ss, unit); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, plain) {
		t.Fatalf("%v %s: in-place DecryptUnits: mismatch at byte %d", c.impl, c.spec.Mode, firstDiff(buf, plain))
	}
}

var unitSpecs = []struct {
	spec Spec
	keys []int
}{
	{Spec{"aes", "xts-plain64"}, []int{32, 64}},
	{Spec{"aes", "xts-plain"}, []int{64}},
	{Spec{"aes", "cbc-essiv:sha256"}, []int{32}},
	{Spec{"aes", "cbc-plain64"}, []int{16}},
	{Spec{"aes", "cbc-plain"}, []int{32}},
}

func TestUnitsMatchPerSector(t *testing.T) {
	layouts := []struct{ ss, unit int }{
		{4096, 512}, {2048, 512}, {1024, 512}, {512, 512}, {4096, 1024}, {4096, 4096},
		{48, 16}, {4080, 16}, {4096, 1}, {512, 128},
	}
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(11, uint64(impl)))
		for _, us := range unitSpecs {
			for _, keyLen := range us.keys {
				key := randBytes(r, keyLen)
				c := mustNew(t, us.spec, key, impl)
				for _, l := range layouts {
					// Run lengths around the 16-sector IV batches.
					for _, n := range []int{1, 2, 15, 16, 17, 33} {
						first := interestingFirst(r)
						checkUnits(t, c, key, randBytes(r, n*l.ss), first, l.ss, l.unit)
					}
				}
			}
		}
	})
}

// TestUnitsPlainWrap runs 4 KiB sectors in 512-byte units across the plain
// IV's 32-bit wrap and the 64-bit wrap of the sector number.
func TestUnitsPlainWrap(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(12, uint64(impl)))
		for _, mode := range []string{"xts-plain", "xts-plain64", "cbc-plain"} {
			key := randBytes(r, 64)
			if mode == "cbc-plain" {
				key = key[:32]
			}
			c := mustNew(t, Spec{"aes", mode}, key, impl)
			for _, first := range []uint64{0xffffffff - 8*5, 0xffffffff - 3, ^uint64(0) - 8*5, ^uint64(0) - 2} {
				checkUnits(t, c, key, randBytes(r, 20*4096), first, 4096, 512)
			}
		}
	})
}

// TestUnitsParallel sends batches through the split across goroutines,
// with parts that start mid-run (first + lo*step).
func TestUnitsParallel(t *testing.T) {
	defer func(old, oldProcs int) {
		parallelMin = old
		runtime.GOMAXPROCS(oldProcs)
	}(parallelMin, runtime.GOMAXPROCS(4))
	parallelMin = 8192
	forEachImpl(t, func(t *testing.T, impl implKind) {
		r := rand.New(rand.NewPCG(13, uint64(impl)))
		for _, us := range unitSpecs {
			key := randBytes(r, us.keys[0])
			c := mustNew(t, us.spec, key, impl)
			for _, n := range []int{2, 3, 5, 17, 64} {
				checkUnits(t, c, key, randBytes(r, n*4096), interestingFirst(r), 4096, 512)
			}
		}
	})
}

func TestUnitsErrors(t *testing.T) {
	c := mustNew(t, Spec{"aes", "xts-plain64"}, make([]byte, 64), defaultImpl)
	buf := make([]byte, 8192)
	for _, tc := range []struct{ ss, unit int }{{4096, 0}, {4096, -512}, {4096, 3000}, {512, 4096}, {4096, 8192}} {
		if err := c.EncryptUnits(buf, buf, 0, tc.ss, tc.unit); !errors.Is(err, ErrBadLength) {
			t.Errorf("EncryptUnits(ss %d, unit %d) = %v, want ErrBadLength", tc.ss, tc.unit, err)
		}
		if err := c.DecryptUnits(buf, buf, 0, tc.ss, tc.unit); !errors.Is(err, ErrBadLength) {
			t.Errorf("DecryptUnits(ss %d, unit %d) = %v, want ErrBadLength", tc.ss, tc.unit, err)
		}
	}
	if err := c.EncryptUnits(buf[:4608], buf[:4608], 0, 4096, 512); !errors.Is(err, ErrBadLength) {
		t.Errorf("partial sector: %v, want ErrBadLength", err)
	}
	c.Wipe()
	if err := c.EncryptUnits(buf, buf, 0, 4096, 512); !errors.Is(err, ErrWiped) {
		t.Errorf("after Wipe: %v, want ErrWiped", err)
	}
}

// TestSplitNoAllocations checks that requests large enough to be split
// across goroutines allocate nothing (once the helpers exist).
func TestSplitNoAllocations(t *testing.T) {
	if testing.CoverMode() != "" || raceEnabled {
		t.Skip("allocation counts differ under coverage or the race detector")
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(2, runtime.GOMAXPROCS(0))))
	forEachImpl(t, func(t *testing.T, impl implKind) {
		c := mustNew(t, Spec{"aes", "xts-plain64"}, make([]byte, 64), impl)
		buf := make([]byte, 1<<20)
		for _, tc := range []struct{ ss, unit int }{{512, 512}, {4096, 512}, {4096, 4096}} {
			allocs := testing.AllocsPerRun(50, func() {
				if err := c.EncryptUnits(buf, buf, 7, tc.ss, tc.unit); err != nil {
					t.Fatal(err)
				}
				if err := c.DecryptUnits(buf, buf, 7, tc.ss, tc.unit); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Errorf("1 MiB in %d-byte sectors, IV unit %d: %v allocations per call", tc.ss, tc.unit, allocs)
			}
		}
	})
}

// FuzzUnits compares EncryptUnits of every implementation with the
// per-sector x/crypto reference for random keys, sector sizes, IV units
// (any divisor of the sector size) and sector numbers.
func FuzzUnits(f *testing.F) {
	f.Add([]byte("key"), uint64(0), uint16(0xff), uint8(9), uint8(0), make([]byte, 4*4096))
	f.Add([]byte{0xff, 0}, uint64(0xfffffff0), uint16(0x1ff), uint8(3), uint8(1), make([]byte, 3*4096))
	f.Add([]byte{1, 2, 3}, ^uint64(0)-20, uint16(0x27f), uint8(1), uint8(2), make([]byte, 2*2048))
	f.Fuzz(func(t *testing.T, keySeed []byte, first uint64, ssUnits uint16, unitSel, specSel uint8, data []byte) {
		us := unitSpecs[int(specSel)%len(unitSpecs)]
		key, ss, buf := fuzzInput(keySeed, us.keys, ssUnits, data)
		var divs []int
		for d := 1; d <= ss; d++ {
			if ss%d == 0 {
				divs = append(divs, d)
			}
		}
		unit := divs[int(unitSel)%len(divs)]
		want := refUnits(t, us.spec, key, buf, first, ss, unit, true)
		for _, impl := range supportedImpls() {
			c := mustNew(t, us.spec, key, impl)
			got := make([]byte, len(buf))
			if err := c.EncryptUnits(got, buf, first, ss, unit); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%v %s ss %d unit %d: encrypt mismatch at byte %d", impl, us.spec.Mode, ss, unit, firstDiff(got, want))
			}
			if err := c.DecryptUnits(got, got, first, ss, unit); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, buf) {
				t.Fatalf("%v %s ss %d unit %d: in-place decrypt mismatch at byte %d", impl, us.spec.Mode, ss, unit, firstDiff(got, buf))
			}
		}
	})
}

// TestSplitConcurrent has many goroutines split requests at once, so that
// helpers move between requests and pooled splits are reused while other
// requests are in flight.
func TestSplitConcurrent(t *testing.T) {
	defer func(old, oldProcs int) {
		parallelMin = old
		runtime.GOMAXPROCS(oldProcs)
	}(parallelMin, runtime.GOMAXPROCS(4))
	parallelMin = 8192
	r := rand.New(rand.NewPCG(14, 14))
	key := randBytes(r, 64)
	c := mustNew(t, Spec{"aes", "xts-plain64"}, key, defaultImpl)
	plain := randBytes(r, 256<<10)
	want := refUnits(t, c.spec, key, plain, 1000, 4096, 512, true)
	errc := make(chan error, 8)
	for g := 0; g < 8; g++ {
		go func() {
			buf := make([]byte, len(plain))
			for i := 0; i < 30; i++ {
				n := len(plain) >> (i % 4) // 256, 128, 64 and 32 KiB
				copy(buf, plain[:n])
				if err := c.EncryptUnits(buf[:n], buf[:n], 1000, 4096, 512); err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(buf[:n], want[:n]) {
					errc <- errors.New("concurrent split encrypt mismatch")
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
}
