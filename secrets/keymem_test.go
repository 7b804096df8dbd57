package secrets

import (
	"bufio"
	"bytes"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"blockd/internal/keymem"
)

// readMem reads the memory b points at through /proc/self/mem, so that
// memory which was unmapped can be looked at without a fault: mapped is
// false when the range is no longer mapped.
func readMem(t *testing.T, b []byte) (data []byte, mapped bool) {
	t.Helper()
	if len(b) == 0 {
		return nil, false
	}
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skipf("no /proc/self/mem: %v", err)
	}
	defer f.Close()
	out := make([]byte, len(b))
	n, err := f.ReadAt(out, int64(uintptr(unsafe.Pointer(&b[0]))))
	if err != nil || n != len(out) {
		return nil, false
	}
	return out, true
}

// vmFlags returns the VmFlags of the mapping that contains b's first byte
// ("" when none does).
func vmFlags(t *testing.T, b []byte) string {
	t.Helper()
	addr := uint64(uintptr(unsafe.Pointer(&b[0])))
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(fields[0], "-"); ok && !strings.HasSuffix(fields[0], ":") {
			start, err1 := strconv.ParseUint(lo, 16, 64)
			end, err2 := strconv.ParseUint(hi, 16, 64)
			in = err1 == nil && err2 == nil && start <= addr && addr < end
			continue
		}
		if in && fields[0] == "VmFlags:" {
			return strings.Join(fields[1:], " ")
		}
	}
	return ""
}

// settledStats collects garbage until no more key memory is released by
// the cleanups of stores that earlier tests dropped, and returns the bytes
// still allocated.
func settledStats() int64 {
	last, _ := keymem.Stats()
	for stable := 0; stable < 3; {
		runtime.GC()
		time.Sleep(5 * time.Millisecond)
		a, _ := keymem.Stats()
		if a == last {
			stable++
		} else {
			stable, last = 0, a
		}
	}
	return last
}

// isKeyMemory reports whether b lies in a keymem mapping: anonymous memory
// excluded from core dumps (and locked, when mlock is permitted).
func isKeyMemory(t *testing.T, b []byte) bool {
	t.Helper()
	flags := " " + vmFlags(t, b) + " "
	if !strings.Contains(flags, " dd ") {
		return false
	}
	return !keymem.IsLocked(b) || strings.Contains(flags, " lo ")
}

// TestSecretsInKeyMemory checks that the store keeps every secret (raw,
// base64, decrypted) in key memory, hands out copies in key memory, and
// that deleting the secrets and freeing the copies releases all of it.
func TestSecretsInKeyMemory(t *testing.T) {
	before := settledStats()
	var s Store
	if err := s.Add(Options{ID: "raw", Data: ptr("correct horse")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(Options{ID: "master", Data: ptr(b64(masterKey)), Format: "base64"}); err != nil {
		t.Fatal(err)
	}
	ct := b64(encrypt(t, masterKey, testIV, []byte(marker)))
	if err := s.Add(Options{ID: "enc", Data: &ct, Format: "base64", KeyID: "master", IV: b64(testIV)}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"raw": "correct horse", "master": string(masterKey), "enc": marker}
	s.mu.RLock()
	stored := map[string][]byte{}
	for id, b := range s.secrets {
		stored[id] = b
	}
	s.mu.RUnlock()
	for id, w := range want {
		b := stored[id]
		if string(b) != w {
			t.Fatalf("%s: stored %q, want %q", id, b, w)
		}
		if !isKeyMemory(t, b) {
			t.Errorf("%s: the store's copy is not in key memory (VmFlags %q)", id, vmFlags(t, b))
		}
	}
	if a, _ := keymem.Stats(); a < before+3*int64(os.Getpagesize()) {
		t.Fatalf("keymem holds %d bytes after adding 3 secrets (%d before)", a, before)
	}

	// Copies are key memory of their own; Free releases them.
	mid, _ := keymem.Stats()
	got, err := s.Get("enc")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != marker || !isKeyMemory(t, got) || &got[0] == &stored["enc"][0] {
		t.Fatalf("Get returned %q, key memory %v, shared with the store %v", got, isKeyMemory(t, got), &got[0] == &stored["enc"][0])
	}
	utf, err := s.GetUTF8("raw")
	if err != nil || string(utf) != "correct horse" || !isKeyMemory(t, utf) {
		t.Fatalf("GetUTF8: %q %v, key memory %v", utf, err, err == nil && isKeyMemory(t, utf))
	}
	if a, _ := keymem.Stats(); a <= mid {
		t.Fatalf("copies not allocated from keymem: %d bytes, %d before", a, mid)
	}
	keymem.Free(got)
	keymem.Free(utf)
	if a, _ := keymem.Stats(); a != mid {
		t.Fatalf("freeing the copies left %d bytes, want %d", a, mid)
	}
	if b, mapped := readMem(t, got); mapped && bytes.Contains(b, []byte(marker)) {
		t.Fatal("a freed copy still holds the secret")
	}

	// A failed Get (not UTF-8) allocates nothing lasting.
	if err := s.Add(Options{ID: "bin", Data: ptr("\xff\xfe")}); err != nil {
		t.Fatal(err)
	}
	mid, _ = keymem.Stats()
	if _, err := s.GetUTF8("bin"); err == nil {
		t.Fatal("GetUTF8 of invalid UTF-8 succeeded")
	}
	if a, _ := keymem.Stats(); a != mid {
		t.Fatalf("a failed GetUTF8 left %d bytes of key memory (%d before)", a-mid, mid)
	}

	for _, id := range s.IDs() {
		if err := s.Delete(id); err != nil {
			t.Fatal(err)
		}
	}
	if a, _ := keymem.Stats(); a != before {
		t.Fatalf("keymem holds %d bytes after deleting every secret, %d before", a, before)
	}
	for id, b := range stored {
		if m, mapped := readMem(t, b); mapped && bytes.Contains(m, []byte(want[id])) {
			t.Errorf("%s: deleted secret still in memory", id)
		}
	}
}

// TestDroppedStoreReleasesKeyMemory: a Store that is dropped with secrets
// in it releases their key memory once it is garbage collected.
func TestDroppedStoreReleasesKeyMemory(t *testing.T) {
	before := settledStats()
	func() {
		s := new(Store)
		for _, id := range []string{"a", "b", "c"} {
			if err := s.Add(Options{ID: id, Data: ptr("dropped " + id)}); err != nil {
				t.Fatal(err)
			}
		}
		if a, _ := keymem.Stats(); a <= before {
			t.Fatalf("nothing allocated: %d bytes", a)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.GC()
		if a, _ := keymem.Stats(); a == before {
			return
		} else if time.Now().After(deadline) {
			t.Fatalf("keymem still holds %d bytes of a dropped store", a-before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
