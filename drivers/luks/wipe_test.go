package luks

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockd/drivers/file"
	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
	"blockd/internal/blockcrypto"
	"blockd/internal/testutil"
)

// recordingSecrets hands out copies of one passphrase and keeps them, so
// the test can check that the driver wiped every copy it was given.
type recordingSecrets struct {
	pass   string
	mu     sync.Mutex
	copies [][]byte
}

func (r *recordingSecrets) Get(id string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b := []byte(r.pass)
	r.copies = append(r.copies, b)
	return b, nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return len(b) > 0
}

// fieldBytes returns the memory of the unexported field name of *v (for a
// pointer field, the memory it points to; nil when it is nil).
func fieldBytes(v any, name string) []byte {
	f := reflect.ValueOf(v).Elem().FieldByName(name)
	switch f.Kind() {
	case reflect.Slice:
		return *(*[]byte)(unsafe.Pointer(f.UnsafeAddr()))
	case reflect.Pointer:
		p := *(*unsafe.Pointer)(unsafe.Pointer(f.UnsafeAddr()))
		if p == nil {
			return nil
		}
		return unsafe.Slice((*byte)(p), f.Type().Elem().Size())
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(f.UnsafeAddr())), f.Type().Size())
}

// mapped reports whether the page holding b[0] is mapped (mincore fails
// with ENOMEM for unmapped memory).
func mapped(b []byte) bool {
	page := uintptr(os.Getpagesize())
	var vec [1]byte
	addr := uintptr(unsafe.Pointer(&b[0])) &^ (page - 1)
	_, _, e := unix.Syscall(unix.SYS_MINCORE, addr, page, uintptr(unsafe.Pointer(&vec[0])))
	return e != unix.ENOMEM
}

func openWipeNode(t *testing.T, version int) (*graph.Graph, *recordingSecrets, []byte) {
	t.Helper()
	pass := "wipe me " + strconv.Itoa(version)
	img, key := luksImage(t, version, pass)
	st := &recordingSecrets{pass: pass}
	g := graph.New(st, file.Driver(), Driver())
	js := `{"driver":"luks","node-name":"disk","key-secret":"s","file":{"driver":"file","filename":"` + img + `"}}`
	if _, err := g.Add(context.Background(), testutil.Tree(t, js), false); err != nil {
		t.Fatal(err)
	}
	return g, st, key
}

// TestKeysWipedOnClose checks that closing a luks node releases the volume
// key copy and the expanded round keys its cipher holds (they live in
// internal/keymem memory, which is zeroed and unmapped on release), that
// the cipher refuses further use, and that every passphrase copy the
// driver fetched (open, amend) was wiped after use.
func TestKeysWipedOnClose(t *testing.T) {
	for _, version := range []int{1, 2} {
		t.Run(strconv.Itoa(version), func(t *testing.T) {
			g, st, key := openWipeNode(t, version)
			n := g.Lookup("disk").Node().(*node)
			c := n.cipher
			keyCopy := fieldBytes(c, "key")
			k1, k2 := fieldBytes(c, "k1"), fieldBytes(c, "k2")
			if !bytes.Equal(keyCopy, key) || allZero(k1) || allZero(k2) {
				t.Fatal("the cipher does not hold the volume key where the test looks for it")
			}
			// Exercise the data path and an amend (which unlocks again).
			be, err := g.NewBackend("disk", "test", graph.PermRead|graph.PermWrite, graph.PermAll)
			if err != nil {
				t.Fatal(err)
			}
			buf := bytes.Repeat([]byte{0x5a}, 64<<10)
			if err := be.WriteAt(context.Background(), buf, 0, 0); err != nil {
				t.Fatal(err)
			}
			g.ReleaseBackend(be)
			iter := int64(1)
			if err := n.Amend(context.Background(), &AmendOptions{State: "active", NewSecret: new(string), IterTime: &iter, PBKDF: ptr(qcrypto.PBKDFAlg("pbkdf2"))}, false); err != nil {
				t.Fatal(err)
			}
			if err := g.Del("disk"); err != nil {
				t.Fatal(err)
			}
			// The memory is unmapped now; only its addresses may be used.
			if mapped(keyCopy) || mapped(k1) || mapped(k2) {
				t.Error("the memory of the volume key copy or the round keys is still mapped after Close")
			}
			if fieldBytes(c, "key") != nil || fieldBytes(c, "k1") != nil || fieldBytes(c, "k2") != nil {
				t.Error("the cipher still references its key memory after Close")
			}
			if err := c.Encrypt(buf[:512], buf[:512], 0, 512); !errors.Is(err, blockcrypto.ErrWiped) {
				t.Errorf("Encrypt after Close: %v, want ErrWiped", err)
			}
			st.mu.Lock()
			defer st.mu.Unlock()
			if len(st.copies) < 3 {
				t.Fatalf("the driver fetched %d passphrase copies, expected at least 3 (open, amend old and new)", len(st.copies))
			}
			for i, p := range st.copies {
				if !allZero(p) {
					t.Errorf("passphrase copy %d was not wiped: %q", i, p)
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestKeyResidueInMemory scans the process's writable memory for the
// volume key after a node was opened, used and closed, and reports every
// copy still there. Go's collector does not clear freed memory, so a copy
// found here was left in a buffer nobody wiped (a KDF or AF-merge
// temporary, a crypto/aes key schedule, ...). The copies are reported, not
// failed on: the buffers belong to packages outside this driver (see
// docs/testing.md); BLOCKD_STRICT_KEY_RESIDUE=1 makes them failures.
func TestKeyResidueInMemory(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs /proc/self/maps")
	}
	for _, version := range []int{1, 2} {
		t.Run(strconv.Itoa(version), func(t *testing.T) {
			g, _, key := openWipeNode(t, version)
			probe := append([]byte(nil), key[:16]...)
			luksfmt.Wipe(key)
			be, err := g.NewBackend("disk", "test", graph.PermRead|graph.PermWrite, graph.PermAll)
			if err != nil {
				t.Fatal(err)
			}
			buf := bytes.Repeat([]byte{0x33}, 1<<20)
			if err := be.WriteAt(context.Background(), buf, 0, 0); err != nil {
				t.Fatal(err)
			}
			g.ReleaseBackend(be)
			if err := g.Del("disk"); err != nil {
				t.Fatal(err)
			}
			g.Close()
			runtime.GC()
			// The probe itself is one hit; split it so the scan does not
			// find the needle it searches with.
			needle := probe
			found := scanMemory(t, needle)
			luksfmt.Wipe(probe)
			// One hit is the needle (probe) itself.
			if found > 1 {
				msg := "copies of the volume key remain in memory after Close: " + strconv.Itoa(found-1)
				if os.Getenv("BLOCKD_STRICT_KEY_RESIDUE") == "1" {
					t.Error(msg)
				} else {
					t.Log(msg)
				}
			} else {
				t.Logf("no copy of the volume key remains in memory after Close (%d hits)", found)
			}
		})
	}
}

// scanMemory counts occurrences of needle in the process's readable,
// writable private mappings.
func scanMemory(t *testing.T, needle []byte) int {
	maps, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Skip(err)
	}
	defer maps.Close()
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skip(err)
	}
	defer mem.Close()
	count := 0
	sc := bufio.NewScanner(maps)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || !strings.HasPrefix(fields[1], "rw") {
			continue
		}
		if len(fields) >= 6 && strings.HasPrefix(fields[5], "[v") { // [vvar], [vsyscall]
			continue
		}
		lo, hi, _ := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		const chunk = 1 << 20
		buf := make([]byte, chunk+len(needle))
		for off := start; off < end; off += chunk {
			n := min(uint64(len(buf)), end-off)
			k, _ := mem.ReadAt(buf[:n], int64(off))
			count += bytes.Count(buf[:k], needle)
		}
		clear(buf)
	}
	return count
}
