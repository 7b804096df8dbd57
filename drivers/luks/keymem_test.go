package luks

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"blockd/drivers/file"
	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
	"blockd/internal/keymem"
	"blockd/internal/testutil"
	"blockd/secrets"
)

// handout is one secret copy the store gave the driver.
type handout struct {
	addr   uintptr
	n      int
	keyMem bool
	flags  string
}

// watchedStore is a real secrets.Store that records where every copy it
// hands out lives.
type watchedStore struct {
	*secrets.Store
	t    *testing.T
	mu   sync.Mutex
	outs []handout
}

func (w *watchedStore) Get(id string) ([]byte, error) {
	b, err := w.Store.Get(id)
	if err != nil || len(b) == 0 {
		return b, err
	}
	addr := uintptr(unsafe.Pointer(&b[0]))
	flags := kmVMFlags(w.t, addr)
	w.mu.Lock()
	w.outs = append(w.outs, handout{addr: addr, n: len(b), keyMem: strings.Contains(" "+flags+" ", " dd "), flags: flags})
	w.mu.Unlock()
	return b, nil
}

// kmVMFlags returns the VmFlags of the mapping that holds addr.
func kmVMFlags(t *testing.T, addr uintptr) string {
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

// kmRead reads n bytes at addr through /proc/self/mem; mapped is false
// once the memory is unmapped.
func kmRead(t *testing.T, addr uintptr, n int) (data []byte, mapped bool) {
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

// kmSettled collects garbage until cleanups of earlier tests' objects stop
// releasing key memory, and returns the bytes still allocated.
func kmSettled() int64 {
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

// TestKeyMemoryReleased runs a luks node's whole key life cycle (open,
// I/O, x-blockdev-amend adding and erasing a keyslot, close) on a real
// secrets.Store: every passphrase copy the driver gets is key memory and is
// released (unmapped) after use, and once the node is closed and the
// secrets deleted, no key memory is left allocated: the passphrases, the
// KDF and AF buffers and every volume key copy were all wiped and unmapped.
func TestKeyMemoryReleased(t *testing.T) {
	for _, version := range []int{1, 2} {
		t.Run(strconv.Itoa(version), func(t *testing.T) {
			pass, newPass := "key memory "+strconv.Itoa(version), "second passphrase"
			img, key := luksImage(t, version, pass)
			luksfmt.Wipe(key)

			before := kmSettled()
			st := &watchedStore{Store: &secrets.Store{}, t: t}
			for id, v := range map[string]string{"s": pass, "n": newPass} {
				if err := st.Add(secrets.Options{ID: id, Data: &v}); err != nil {
					t.Fatal(err)
				}
			}
			g := graph.New(st, file.Driver(), Driver())
			js := `{"driver":"luks","node-name":"disk","key-secret":"s","file":{"driver":"file","filename":"` + img + `"}}`
			if _, err := g.Add(context.Background(), testutil.Tree(t, js), false); err != nil {
				t.Fatal(err)
			}
			n := g.Lookup("disk").Node().(*node)
			be, err := g.NewBackend("disk", "test", graph.PermRead|graph.PermWrite, graph.PermAll)
			if err != nil {
				t.Fatal(err)
			}
			buf := bytes.Repeat([]byte{0x6b}, 64<<10)
			if err := be.WriteAt(context.Background(), buf, 0, 0); err != nil {
				t.Fatal(err)
			}
			g.ReleaseBackend(be)
			iter := int64(1)
			newID, slot := "n", int64(3)
			if err := n.Amend(context.Background(), &AmendOptions{State: "active", NewSecret: &newID, Keyslot: &slot, IterTime: &iter, PBKDF: ptr(qcrypto.PBKDFAlg("pbkdf2"))}, false); err != nil {
				t.Fatal(err)
			}
			if err := n.Amend(context.Background(), &AmendOptions{State: "inactive", OldSecret: &newID}, false); err != nil {
				t.Fatal(err)
			}
			if err := g.Del("disk"); err != nil {
				t.Fatal(err)
			}
			g.Close()

			st.mu.Lock()
			outs := append([]handout(nil), st.outs...)
			st.mu.Unlock()
			if len(outs) < 4 {
				t.Fatalf("the driver fetched %d passphrase copies, expected at least 4 (open, amend old and new, erase)", len(outs))
			}
			for i, o := range outs {
				if !o.keyMem {
					t.Errorf("passphrase copy %d is not key memory (VmFlags %q)", i, o.flags)
				}
				if b, mapped := kmRead(t, o.addr, o.n); mapped && (bytes.Contains(b, []byte(pass)) || bytes.Contains(b, []byte(newPass))) {
					t.Errorf("passphrase copy %d was not released: %q", i, b)
				}
			}
			for _, id := range st.IDs() {
				if err := st.Delete(id); err != nil {
					t.Fatal(err)
				}
			}
			if after := kmSettled(); after != before {
				t.Errorf("%d bytes of key memory left allocated after close (%d before, %d after)", after-before, before, after)
			}
		})
	}
}
