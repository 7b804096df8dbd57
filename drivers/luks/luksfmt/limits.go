package luksfmt

import (
	"fmt"
	"math"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/argon2"

	"blockd/internal/qapi"
)

// KDFLimits bound what unlocking one keyslot may cost on this machine. A
// keyslot over them is not tried: Unlock reports it with ErrKDFLimit (when
// no keyslot within them opens) before allocating or computing anything.
// The zero value means the defaults.
type KDFLimits struct {
	// MaxMemoryKiB bounds the argon2 memory cost; 0 means
	// DefaultMaxKDFMemoryKiB. It cannot raise the format limit,
	// MaxArgon2MemoryKiB.
	MaxMemoryKiB uint32
	// MaxTime bounds the estimated time of one keyslot's key derivation
	// plus the check of its result against the volume key digest, from a
	// measurement of this CPU; 0 means DefaultMaxKDFTime.
	MaxTime time.Duration
}

// Default KDF limits. They admit every header cryptsetup 2.6 and QEMU 7.2
// make with their defaults:
//
//   - Memory: cryptsetup's LUKS2 default is argon2id with at most 1 GiB
//     (less on machines with under 2 GiB of RAM); QEMU and LUKS1 use PBKDF2,
//     which needs none. A larger cost comes only from an explicit
//     --pbkdf-memory (up to 4 GiB).
//   - Time: cryptsetup and QEMU calibrate one unlock to take 2 s (the
//     default iter-time) on the machine that made the header. 30 s admits
//     such a header on a machine 15 times slower, or an iter-time of 10 s
//     made on a machine 3 times faster, while refusing the costs that only
//     hostile or damaged headers have: PBKDF2 at the format limit of 2^28
//     iterations (about 50 s here with SHA-256, longer with SHA-512) or
//     argon2 at 1 GiB × 1024 passes (minutes). With derivations cancellable
//     (Unlock stops within milliseconds of its context), a slow allowed
//     unlock ties up nothing a client cannot take back.
const (
	DefaultMaxKDFMemoryKiB = 1024 * 1024
	DefaultMaxKDFTime      = 30 * time.Second
)

// Option names the limits' errors point to: blockd and blockd-img take
// them on their command lines.
const (
	maxMemoryOption = "--max-kdf-memory"
	maxTimeOption   = "--max-kdf-time"
)

// withDefaults fills in zero fields.
func (l KDFLimits) withDefaults() KDFLimits {
	if l.MaxMemoryKiB == 0 {
		l.MaxMemoryKiB = DefaultMaxKDFMemoryKiB
	}
	if l.MaxTime == 0 {
		l.MaxTime = DefaultMaxKDFTime
	}
	return l
}

// limitError is a keyslot over the KDFLimits.
type limitError struct{ msg string }

func (e *limitError) Error() string { return e.msg }

func (e *limitError) Is(target error) bool {
	return target == ErrKDFLimit
}

// pbkdf2Cost is one PBKDF2 computation: a keyslot's or a digest's.
type pbkdf2Cost struct {
	hash       string
	iterations uint32
	keyLen     int
}

// checkCost applies lim to a keyslot whose derivation is p (keyLen bytes of
// output) and whose result is checked against digest. name is "keyslot N".
// Nothing large is allocated: memory is compared first, and the time
// estimate needs at most a few MiB for calibrating argon2.
func checkCost(name string, p *kdfParams, keyLen int, digest pbkdf2Cost, lim KDFLimits) error {
	lim = lim.withDefaults()
	if err := p.check(); err != nil {
		return err
	}
	if p.typ != KDFPBKDF2 && p.memoryKiB > lim.MaxMemoryKiB {
		return &limitError{fmt.Sprintf("%s: %s memory cost %d KiB exceeds the limit of %d KiB (raise it with %s)",
			name, p.typ, p.memoryKiB, lim.MaxMemoryKiB, maxMemoryOption)}
	}
	procs := max(1, runtime.GOMAXPROCS(0))
	var est time.Duration
	if p.typ == KDFPBKDF2 {
		d, err := pbkdf2Estimate(pbkdf2Cost{p.hash, p.iterations, keyLen}, procs)
		if err != nil {
			return err
		}
		est = d
	} else {
		// Argon2's lanes run in parallel; each pass fills the memory.
		lanes := uint64(min(int(p.parallel), procs))
		work := float64(p.iterations) * float64(p.memoryKiB) / float64(lanes)
		est = time.Duration(work * argon2Rate())
	}
	d, err := pbkdf2Estimate(digest, 1)
	if err != nil {
		return err
	}
	est += d
	if est > lim.MaxTime {
		return &limitError{fmt.Sprintf("%s: %s would take about %v to unlock on this machine, over the limit of %v (raise it with %s)",
			name, p.describe(), est.Round(time.Second), lim.MaxTime, maxTimeOption)}
	}
	return nil
}

// describe names a keyslot's KDF and cost for messages.
func (p *kdfParams) describe() string {
	if p.typ == KDFPBKDF2 {
		return fmt.Sprintf("pbkdf2 (%s, %d iterations)", p.hash, p.iterations)
	}
	return fmt.Sprintf("%s (%d passes over %d KiB, %d threads)", p.typ, p.iterations, p.memoryKiB, p.parallel)
}

// pbkdf2Estimate is the time c takes with its output blocks spread over
// procs threads, as pbkdf2Into does.
func pbkdf2Estimate(c pbkdf2Cost, procs int) (time.Duration, error) {
	h, err := lookupHash(c.hash)
	if err != nil {
		return 0, err
	}
	hs := h().Size()
	blocks := (c.keyLen + hs - 1) / hs
	rounds := (blocks + procs - 1) / procs
	perIter, err := pbkdf2IterCost(c.hash)
	if err != nil {
		return 0, err
	}
	return time.Duration(float64(c.iterations) * float64(rounds) * perIter), nil
}

// calibration holds this machine's measured KDF costs, measured once per
// process (a few tens of milliseconds each) when first needed.
var calibration struct {
	mu     sync.Mutex         // protects the fields below
	pbkdf2 map[string]float64 // hash name -> ns per iteration of one output block
	argon2 float64            // ns per KiB per pass, one lane
}

// calibrationRun is how long one calibration measures: enough to be within
// a few tens of percent, which the generous limits absorb.
const calibrationRun = 20 * time.Millisecond

// pbkdf2IterCost returns the measured cost in ns of one PBKDF2 iteration
// of one output block with hash (the calibration keyslot creation uses,
// over a shorter run).
func pbkdf2IterCost(hash string) (float64, error) {
	calibration.mu.Lock()
	defer calibration.mu.Unlock()
	if c, ok := calibration.pbkdf2[hash]; ok {
		return c, nil
	}
	h, err := lookupHash(hash)
	if err != nil {
		return 0, err
	}
	perSec, err := pbkdf2Rate(h, h().Size(), calibrationRun)
	if err != nil {
		return 0, err
	}
	if calibration.pbkdf2 == nil {
		calibration.pbkdf2 = map[string]float64{}
	}
	c := 1e9 / perSec
	calibration.pbkdf2[hash] = c
	return c, nil
}

// argon2Rate returns the measured cost in ns of one argon2id pass over one
// KiB with one lane (argon2i costs the same), measured with 4 MiB.
func argon2Rate() float64 {
	calibration.mu.Lock()
	defer calibration.mu.Unlock()
	if calibration.argon2 != 0 {
		return calibration.argon2
	}
	const memKiB = 4 * 1024
	pw, salt := []byte("foobarfo"), make([]byte, saltSize)
	for t := uint32(1); ; t *= 2 {
		// argon2 runs its lane on another goroutine, so this is wall time:
		// a loaded machine makes the estimate larger, never smaller.
		start := time.Now()
		clear(argon2.IDKey(pw, salt, t, memKiB, 1, 32))
		d := time.Since(start)
		if d >= calibrationRun || t >= 1<<10 {
			calibration.argon2 = float64(d.Nanoseconds()) / (float64(t) * memKiB)
			return calibration.argon2
		}
	}
}

// SetMaxMemory sets MaxMemoryKiB from a byte count with an optional k, M, G
// suffix (powers of 1024), as --max-kdf-memory takes it: at least 1 MiB, at
// most the format limit of 4 GiB.
func (l *KDFLimits) SetMaxMemory(s string) error {
	n, err := qapi.ParseSize(s)
	if err != nil {
		return fmt.Errorf("%s %q: %v", maxMemoryOption, s, err)
	}
	if n < 1<<20 || n > MaxArgon2MemoryKiB*1024 {
		return fmt.Errorf("%s %q: must be between 1M and 4G", maxMemoryOption, s)
	}
	l.MaxMemoryKiB = uint32(n / 1024)
	return nil
}

// SetMaxTime sets MaxTime from a duration such as "90s" or "5m", or a number
// of seconds, as --max-kdf-time takes it.
func (l *KDFLimits) SetMaxTime(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		secs, err2 := strconv.ParseFloat(s, 64)
		if err2 != nil || math.IsNaN(secs) || secs > 1e9 {
			return fmt.Errorf("%s %q: not a duration (such as 90s or 5m) or a number of seconds", maxTimeOption, s)
		}
		d = time.Duration(secs * float64(time.Second))
	}
	if d <= 0 {
		return fmt.Errorf("%s %q: must be positive", maxTimeOption, s)
	}
	l.MaxTime = d
	return nil
}
