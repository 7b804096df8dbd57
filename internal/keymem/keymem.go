// Package keymem allocates memory for key material (LUKS volume keys,
// expanded round keys, passphrases) outside the Go heap: private anonymous
// mappings that are locked into RAM with mlock so the kernel never writes
// them to swap, excluded from core dumps (MADV_DONTDUMP), zeroed in child
// processes after fork (MADV_WIPEONFORK), and wiped before they are
// unmapped. The garbage collector never copies or frees them, so the only
// copy of a key is the one the owner wipes with Free.
//
// When mlock is not permitted (RLIMIT_MEMLOCK, usually 8 MiB for
// unprivileged users, and no CAP_IPC_LOCK) the memory is still allocated,
// only unlocked, and a warning is logged once per process.
//
// Adoption (owners of those packages): internal/blockcrypto.New should
// copy the volume key into Alloc'd memory and keep its expanded schedules
// there too (one page holds the key and both schedules), Wipe calling Free;
// luksfmt's Unlock and the AF-merge and KDF buffers should come from Alloc;
// secrets.Store should keep secret data in Alloc'd memory and hand out
// copies from Alloc that callers Free instead of wiping heap slices.
package keymem

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Hooks for tests.
var (
	mlock   = unix.Mlock
	munlock = unix.Munlock
	munmap  = unix.Munmap
)

var (
	// mu protects regions, log and the counters.
	mu      sync.Mutex
	regions = map[uintptr]region{} // by the address of the first byte
	log     = logrus.NewEntry(logrus.StandardLogger())
	locked  int64 // bytes currently locked
	total   int64 // bytes currently allocated

	warnOnce sync.Once
)

type region struct {
	mem    []byte // the whole mapping
	locked bool
}

// SetLogger sets where the mlock warning goes (default: logrus's standard
// logger).
func SetLogger(e *logrus.Entry) {
	mu.Lock()
	defer mu.Unlock()
	log = e
}

// Alloc returns n zeroed bytes of locked memory outside the Go heap. The
// slice must be released with Free and must not be appended to.
func Alloc(n int) ([]byte, error) {
	if n < 0 {
		return nil, errors.New("keymem: negative size")
	}
	if n == 0 {
		return []byte{}, nil
	}
	page := os.Getpagesize()
	size := (n + page - 1) / page * page
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("keymem: mmap %d bytes: %w", size, err)
	}
	// Best effort: older kernels lack these advices.
	_ = unix.Madvise(mem, unix.MADV_DONTDUMP)
	_ = unix.Madvise(mem, unix.MADV_WIPEONFORK)
	r := region{mem: mem}
	if err := mlock(mem); err != nil {
		warnOnce.Do(func() {
			mu.Lock()
			l := log
			mu.Unlock()
			l.Warnf("keymem: cannot lock key memory in RAM (mlock: %v); keys may be written to swap. "+
				"Raise the locked-memory limit (ulimit -l) or grant CAP_IPC_LOCK", err)
		})
	} else {
		r.locked = true
	}
	mu.Lock()
	regions[uintptr(unsafe.Pointer(&mem[0]))] = r
	total += int64(size)
	if r.locked {
		locked += int64(size)
	}
	mu.Unlock()
	return mem[:n:n], nil
}

// Free wipes b and releases it. b must be a slice Alloc returned (a
// re-slice from its first byte is fine); other slices are only wiped.
func Free(b []byte) {
	if cap(b) == 0 {
		return
	}
	b = b[:cap(b)]
	clear(b)
	key := uintptr(unsafe.Pointer(&b[0]))
	mu.Lock()
	r, ok := regions[key]
	if ok {
		delete(regions, key)
		total -= int64(len(r.mem))
		if r.locked {
			locked -= int64(len(r.mem))
		}
	}
	mu.Unlock()
	if !ok {
		return
	}
	clear(r.mem)
	if r.locked {
		_ = munlock(r.mem)
	}
	_ = munmap(r.mem)
}

// IsLocked reports whether b (from Alloc) is locked in RAM.
func IsLocked(b []byte) bool {
	if cap(b) == 0 {
		return false
	}
	mu.Lock()
	defer mu.Unlock()
	return regions[uintptr(unsafe.Pointer(&b[:1][0]))].locked
}

// Stats returns the bytes allocated and the bytes locked now.
func Stats() (allocated, lockedBytes int64) {
	mu.Lock()
	defer mu.Unlock()
	return total, locked
}
