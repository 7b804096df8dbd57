package luksfmt

import (
	"bufio"
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"blockd/internal/keymem"
)

// keyMemWatch records every key-memory allocation and release this package
// makes, replacing allocKey and freeKey for the duration of a test.
type keyMemWatch struct {
	t     *testing.T
	mu    sync.Mutex
	live  map[uintptr]int // address -> size, allocated and not yet freed
	sizes []int           // sizes of every allocation, in order
	bad   []string        // allocations outside key memory
}

func watchKeyMem(t *testing.T) *keyMemWatch {
	w := &keyMemWatch{t: t, live: map[uintptr]int{}}
	allocKey = func(n int) ([]byte, error) {
		b, err := keymem.Alloc(n)
		if err != nil || n == 0 {
			return b, err
		}
		flags := mappingFlags(t, uintptr(unsafe.Pointer(&b[0])))
		w.mu.Lock()
		defer w.mu.Unlock()
		w.live[uintptr(unsafe.Pointer(&b[0]))] = n
		w.sizes = append(w.sizes, n)
		if !strings.Contains(" "+flags+" ", " dd ") || keymem.IsLocked(b) && !strings.Contains(" "+flags+" ", " lo ") {
			w.bad = append(w.bad, strconv.Itoa(n)+" bytes with VmFlags "+flags)
		}
		return b, nil
	}
	freeKey = func(b []byte) {
		if cap(b) > 0 {
			w.mu.Lock()
			delete(w.live, uintptr(unsafe.Pointer(&b[:1][0])))
			w.mu.Unlock()
		}
		keymem.Free(b)
	}
	t.Cleanup(func() { allocKey, freeKey = keymem.Alloc, keymem.Free })
	return w
}

// reset forgets the allocation history (not the live set).
func (w *keyMemWatch) reset() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sizes = nil
}

// check fails unless exactly the buffers in keep are still allocated, and
// every allocation was key memory.
func (w *keyMemWatch) check(what string, keep ...[]byte) {
	w.t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, b := range w.bad {
		w.t.Errorf("%s: allocation outside key memory: %s", what, b)
	}
	w.bad = nil
	want := map[uintptr]bool{}
	for _, b := range keep {
		a := uintptr(unsafe.Pointer(&b[0]))
		want[a] = true
		if _, ok := w.live[a]; !ok {
			w.t.Errorf("%s: a returned key (%d bytes) is not key memory this package allocated", what, len(b))
		}
	}
	for a, n := range w.live {
		if !want[a] {
			w.t.Errorf("%s: %d bytes of key memory were not freed", what, n)
		}
	}
}

// has reports whether an allocation of n bytes was made since reset.
func (w *keyMemWatch) has(n int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.sizes {
		if s == n {
			return true
		}
	}
	return false
}

// mappingFlags returns the VmFlags of the mapping holding addr.
func mappingFlags(t *testing.T, addr uintptr) string {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(fields[0], "-"); ok && !strings.HasSuffix(fields[0], ":") {
			start, err1 := strconv.ParseUint(lo, 16, 64)
			end, err2 := strconv.ParseUint(hi, 16, 64)
			in = err1 == nil && err2 == nil && start <= uint64(addr) && uint64(addr) < end
			continue
		}
		if in && fields[0] == "VmFlags:" {
			return strings.Join(fields[1:], " ")
		}
	}
	return ""
}

// readBack reads len(b) bytes at b's address through /proc/self/mem; mapped
// is false once the memory is unmapped.
func readBack(t *testing.T, addr uintptr, n int) (data []byte, mapped bool) {
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skipf("no /proc/self/mem: %v", err)
	}
	defer f.Close()
	data = make([]byte, n)
	if k, err := f.ReadAt(data, int64(addr)); err != nil || k != n {
		return nil, false
	}
	return data, true
}

// TestUnlockUsesKeyMemory follows every key-memory buffer through Create,
// Unlock (PBKDF2 and argon2id keyslots, LUKS1 and LUKS2), AddKey,
// ChangeKey, MatchSlots and RemoveKey: the KDF output, the keyslot area
// (AF material), the AF accumulator and the recovered volume key must come
// from internal/keymem, everything but the returned key must be released
// before the call returns, and Wipe must release the key, after which its
// memory no longer holds it.
func TestUnlockUsesKeyMemory(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		kdf     string
	}{{"luks1", 1, KDFPBKDF2}, {"luks2-pbkdf2", 2, KDFPBKDF2}, {"luks2-argon2id", 2, KDFArgon2id}} {
		t.Run(tc.name, func(t *testing.T) {
			w := watchKeyMem(t)
			dev, h, key := create(t, CreateOptions{Version: tc.version, KDF: fastKDF(tc.kdf), KeyslotsSize: smallKeyslots(tc.version)})
			w.check("Create", key)
			keyLen := len(key)
			area := afSectors(keyLen, stripes) * sectorSize
			if !w.has(keyLen) || !w.has(area) {
				t.Errorf("Create: no key-memory volume key (%d bytes) or AF area (%d bytes) among %v", keyLen, area, w.sizes)
			}
			Wipe(key)
			w.check("Wipe")

			h = reopen(t, dev)
			w.reset()
			got, slot, err := h.Unlock(context.Background(), passA, AnySlot, KDFLimits{})
			if err != nil || slot != 0 {
				t.Fatalf("Unlock: slot %d, %v", slot, err)
			}
			w.check("Unlock", got)
			if !w.has(keyLen) || !w.has(area) {
				t.Errorf("Unlock: no key-memory volume key (%d bytes) or AF area (%d bytes) among %v", keyLen, area, w.sizes)
			}
			if n := len(w.sizes); n < 4 {
				t.Errorf("Unlock made %d key-memory allocations, want KDF output, area, accumulator and key: %v", n, w.sizes)
			}
			// A wrong passphrase releases everything too.
			if _, _, err := h.Unlock(context.Background(), passD, AnySlot, KDFLimits{}); err == nil {
				t.Fatal("wrong passphrase unlocked")
			}
			w.check("failed Unlock", got)

			if _, err := h.AddKey(dev, got, AnySlot, passB, fastKDF(tc.kdf)); err != nil {
				t.Fatal(err)
			}
			w.check("AddKey", got)
			if _, err := h.ChangeKey(dev, passB, passC, fastKDF(tc.kdf)); err != nil {
				t.Fatal(err)
			}
			w.check("ChangeKey", got)
			if m, err := h.MatchSlots(context.Background(), passC, KDFLimits{}); err != nil || len(m) != 1 {
				t.Fatalf("MatchSlots: %v %v", m, err)
			}
			w.check("MatchSlots", got)
			if _, err := h.RemoveKey(dev, passC); err != nil {
				t.Fatal(err)
			}
			w.check("RemoveKey", got)

			addr, probe := uintptr(unsafe.Pointer(&got[0])), append([]byte(nil), got...)
			Wipe(got)
			w.check("Wipe of the unlocked key")
			if b, mapped := readBack(t, addr, len(probe)); mapped && string(b) == string(probe) {
				t.Error("the volume key is still in memory after Wipe")
			}
			clear(probe)
		})
	}
}

// TestWipeHeapSlices: Wipe zeroes slices that are not key memory.
func TestWipeHeapSlices(t *testing.T) {
	b := []byte("a passphrase on the heap")
	Wipe(b)
	for _, c := range b {
		if c != 0 {
			t.Fatalf("Wipe left %q", b)
		}
	}
	Wipe(nil)
}
