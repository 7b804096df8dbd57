package keymem

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// smapsEntry returns the smaps fields of the mapping that starts at addr.
func smapsEntry(t *testing.T, addr uintptr) map[string]string {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var in bool
	out := map[string]string{}
	for sc.Scan() {
		line := sc.Text()
		if lo, _, ok := strings.Cut(strings.Fields(line)[0], "-"); ok && !strings.HasSuffix(strings.Fields(line)[0], ":") {
			start, err := strconv.ParseUint(lo, 16, 64)
			in = err == nil && uintptr(start) == addr
			continue
		}
		if in {
			k, v, _ := strings.Cut(line, ":")
			out[k] = strings.TrimSpace(v)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no mapping at %#x", addr)
	}
	return out
}

func TestAllocLockedAndFreed(t *testing.T) {
	b, err := Alloc(100)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 100 || cap(b) != 100 {
		t.Fatalf("len %d cap %d", len(b), cap(b))
	}
	if !bytes.Equal(b, make([]byte, 100)) {
		t.Fatal("new memory is not zeroed")
	}
	copy(b, "volume key material")
	addr := uintptr(unsafe.Pointer(&b[0]))
	e := smapsEntry(t, addr)
	if !strings.Contains(e["VmFlags"], "dd") {
		t.Errorf("mapping not excluded from core dumps: VmFlags %q", e["VmFlags"])
	}
	if IsLocked(b) {
		if e["Locked"] == "0 kB" || !strings.Contains(e["VmFlags"], "lo") {
			t.Errorf("IsLocked but smaps says Locked %q, VmFlags %q", e["Locked"], e["VmFlags"])
		}
	} else {
		t.Logf("mlock not permitted here; memory unlocked")
	}
	if a, _ := Stats(); a < 100 {
		t.Errorf("Stats allocated %d", a)
	}
	// Free wipes before unmapping.
	var seen []byte
	munmap = func(m []byte) error { seen = append([]byte(nil), m...); return unix.Munmap(m) }
	defer func() { munmap = unix.Munmap }()
	Free(b)
	if len(seen) == 0 || !bytes.Equal(seen, make([]byte, len(seen))) {
		t.Fatal("memory not wiped before munmap")
	}
	if a, l := Stats(); a != 0 || l != 0 {
		t.Errorf("Stats after Free: %d allocated, %d locked", a, l)
	}
	// Foreign slices are wiped, not unmapped.
	x := []byte("heap secret")
	Free(x)
	if !bytes.Equal(x, make([]byte, len(x))) {
		t.Fatal("Free did not wipe a heap slice")
	}
	Free(nil)
	if z, err := Alloc(0); err != nil || len(z) != 0 {
		t.Fatalf("Alloc(0): %v %v", z, err)
	}
}

// TestMlockFailureWarnsOnce degrades to unlocked memory with one warning.
func TestMlockFailureWarnsOnce(t *testing.T) {
	mlock = func([]byte) error { return unix.EPERM }
	defer func() { mlock = unix.Mlock }()
	warnOnce = sync.Once{}
	var logs bytes.Buffer
	l := logrus.New()
	l.SetOutput(&logs)
	SetLogger(logrus.NewEntry(l))
	defer SetLogger(logrus.NewEntry(logrus.StandardLogger()))
	for i := 0; i < 3; i++ {
		b, err := Alloc(32)
		if err != nil {
			t.Fatal(err)
		}
		if IsLocked(b) {
			t.Fatal("IsLocked with a failing mlock")
		}
		Free(b)
	}
	if n := strings.Count(logs.String(), "cannot lock key memory"); n != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "operation not permitted") {
		t.Errorf("warning without the cause: %s", logs.String())
	}
}

func TestManyAllocations(t *testing.T) {
	var bufs [][]byte
	for i := 0; i < 64; i++ {
		b, err := Alloc(64 + i)
		if err != nil {
			t.Fatal(err)
		}
		copy(b, fmt.Sprint(i))
		bufs = append(bufs, b)
	}
	for i, b := range bufs {
		if !strings.HasPrefix(string(b), fmt.Sprint(i)) {
			t.Fatalf("buffer %d overwritten", i)
		}
		Free(b[:1]) // a re-slice from the first byte frees the whole buffer
	}
	if a, _ := Stats(); a != 0 {
		t.Fatalf("%d bytes still allocated", a)
	}
	if _, err := Alloc(-1); err == nil {
		t.Fatal("Alloc(-1) succeeded")
	}
}
