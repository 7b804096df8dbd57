package luksfmt

import (
	"context"
	"crypto/subtle"
	"fmt"
	"hash"
	"runtime"
	"time"

	"golang.org/x/crypto/argon2"
)

// KDF names as they appear in LUKS2 headers.
const (
	KDFPBKDF2   = "pbkdf2"
	KDFArgon2i  = "argon2i"
	KDFArgon2id = "argon2id"
)

// Limits applied to headers being read. They keep a hostile or damaged
// header from exhausting memory or tying up a CPU for hours; legitimate
// headers (cryptsetup and QEMU, even with long iteration times) stay far
// below them.
const (
	// MaxArgon2MemoryKiB is cryptsetup's maximum argon2 memory cost, 4 GiB.
	MaxArgon2MemoryKiB = 4 * 1024 * 1024
	// MaxArgon2Work bounds time cost × memory cost (in KiB): 4 GiB × 1024
	// passes.
	MaxArgon2Work = uint64(MaxArgon2MemoryKiB) * 1024
	// MaxPBKDF2Iterations bounds PBKDF2 iteration counts (keyslots and
	// digests), about a minute or two of CPU time per attempt.
	MaxPBKDF2Iterations = 1 << 28
	// MaxKeySize bounds volume and keyslot key sizes in bytes (4096 bits);
	// no cipher LUKS supports uses more than 512 bits.
	MaxKeySize = 512
)

// Limits applied when creating keyslots (cryptsetup's minimums).
const (
	minPBKDF2Iterations = 1000
	minArgon2Time       = 4
	minArgon2MemoryKiB  = 32
	maxArgon2Parallel   = 4
	// defaultArgon2MaxMemoryKiB is cryptsetup's default memory cost limit
	// for the benchmark, 1 GiB.
	defaultArgon2MaxMemoryKiB = 1024 * 1024
	// minArgon2BenchMemoryKiB is the memory cost the benchmark starts from.
	minArgon2BenchMemoryKiB = 64 * 1024
	// DefaultIterTime is the default KDF target time (cryptsetup's and
	// QEMU's 2 seconds).
	DefaultIterTime = 2 * time.Second
	// digestIterTime is the PBKDF2 time spent on the volume key digest
	// (cryptsetup's LUKS_MKD_ITERATIONS_MS).
	digestIterTime = 125 * time.Millisecond
)

// KDF chooses the key derivation for a new keyslot.
type KDF struct {
	// Type is KDFPBKDF2, KDFArgon2i or KDFArgon2id. Empty means PBKDF2 for
	// LUKS1 and argon2id for LUKS2. LUKS1 supports only PBKDF2.
	Type string
	// Hash is the PBKDF2 hash and, for LUKS2, the AF splitter hash; empty
	// means the header's hash (LUKS1 always uses the header's hash).
	Hash string
	// IterTime is the time one unlock of the keyslot should cost on this
	// machine; the KDF is benchmarked to find its parameters. Zero means
	// DefaultIterTime. Ignored when Iterations is set.
	IterTime time.Duration
	// Iterations, when non-zero, skips the benchmark: it is the PBKDF2
	// iteration count (at least 1000) or the argon2 time cost (at least 4).
	// The volume key digest of a new header then uses 1000 iterations, as
	// cryptsetup's --pbkdf-force-iterations does.
	Iterations uint32
	// MemoryKiB is the argon2 memory cost: with Iterations set, the exact
	// value (at least 32); otherwise the benchmark's maximum (default 1 GiB,
	// at most half the physical memory).
	MemoryKiB uint32
	// Parallel is the argon2 thread count (default and maximum: 4, at most
	// the number of CPUs).
	Parallel uint32
}

// kdfParams are the parameters of one keyslot's key derivation.
type kdfParams struct {
	typ        string // KDFPBKDF2, KDFArgon2i, KDFArgon2id
	hash       string // pbkdf2 only
	iterations uint32 // pbkdf2 iterations or argon2 time cost
	memoryKiB  uint32 // argon2 only
	parallel   uint32 // argon2 only
	salt       []byte
}

// check applies the read limits.
func (p *kdfParams) check() error {
	switch p.typ {
	case KDFPBKDF2:
		if _, err := lookupHash(p.hash); err != nil {
			return err
		}
		if p.iterations < 1 {
			return fmt.Errorf("%w: pbkdf2 iteration count is zero", ErrCorrupt)
		}
		if p.iterations > MaxPBKDF2Iterations {
			return fmt.Errorf("%w: pbkdf2 iteration count %d exceeds the limit of %d", ErrUnsupported, p.iterations, MaxPBKDF2Iterations)
		}
	case KDFArgon2i, KDFArgon2id:
		if p.iterations < 1 || p.parallel < 1 {
			return fmt.Errorf("%w: %s time or thread count is zero", ErrCorrupt, p.typ)
		}
		if p.parallel > 255 {
			return fmt.Errorf("%w: %s thread count %d", ErrUnsupported, p.typ, p.parallel)
		}
		if uint64(p.memoryKiB) < 8*uint64(p.parallel) {
			return fmt.Errorf("%w: %s memory cost %d KiB is below 8 KiB per thread", ErrCorrupt, p.typ, p.memoryKiB)
		}
		if p.memoryKiB > MaxArgon2MemoryKiB {
			return fmt.Errorf("%w: %s memory cost %d KiB exceeds the limit of %d KiB", ErrUnsupported, p.typ, p.memoryKiB, MaxArgon2MemoryKiB)
		}
		if uint64(p.iterations)*uint64(p.memoryKiB) > MaxArgon2Work {
			return fmt.Errorf("%w: %s cost (time %d, memory %d KiB) exceeds the limit", ErrUnsupported, p.typ, p.iterations, p.memoryKiB)
		}
	default:
		return fmt.Errorf("%w: kdf %q", ErrUnsupported, p.typ)
	}
	if len(p.salt) != saltSize {
		return fmt.Errorf("%w: kdf salt is %d bytes, want %d", ErrCorrupt, len(p.salt), saltSize)
	}
	return nil
}

// derive runs the KDF. The result is key memory; the caller releases it
// with freeKey. When ctx is done it returns ctx's error within about a
// millisecond: PBKDF2 stops, argon2 (which cannot be interrupted) runs to
// its end in the background and its output is wiped there.
func (p *kdfParams) derive(ctx context.Context, passphrase []byte, keyLen int) ([]byte, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	if p.typ == KDFPBKDF2 {
		h, err := lookupHash(p.hash)
		if err != nil {
			return nil, err
		}
		out := keyBuf(keyLen)
		if err := pbkdf2Into(ctx, out, h, passphrase, p.salt, int(p.iterations)); err != nil {
			freeKey(out)
			return nil, err
		}
		return out, nil
	}
	return p.argon2(ctx, passphrase, keyLen)
}

// argon2Running admits one argon2 derivation at a time, so that derivations
// abandoned by cancelled callers (and still running in the background)
// cannot pile up their memory: at most one KDFLimits.MaxMemoryKiB is in use.
var argon2Running = make(chan struct{}, 1)

// argon2 runs argon2i or argon2id on its own goroutine and returns when it
// ends or ctx is done. The passphrase is copied to key memory the goroutine
// owns, since the caller may wipe its copy as soon as this returns.
func (p *kdfParams) argon2(ctx context.Context, passphrase []byte, keyLen int) ([]byte, error) {
	select {
	case argon2Running <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	pw := keyBuf(len(passphrase))
	copy(pw, passphrase)
	typ, salt, t, m, par := p.typ, p.salt, p.iterations, p.memoryKiB, uint8(p.parallel)
	done := make(chan []byte, 1)
	go func() {
		defer func() { <-argon2Running }()
		var heap []byte
		if typ == KDFArgon2i {
			heap = argon2.Key(pw, salt, t, m, par, uint32(keyLen))
		} else {
			heap = argon2.IDKey(pw, salt, t, m, par, uint32(keyLen))
		}
		freeKey(pw)
		// x/crypto/argon2 returns its own slice (and keeps its work
		// memory on the heap); move the output to key memory.
		out := keyBuf(keyLen)
		copy(out, heap)
		clear(heap)
		done <- out
	}()
	select {
	case out := <-done:
		return out, nil
	case <-ctx.Done():
		go func() { freeKey(<-done) }()
		return nil, ctx.Err()
	}
}

// newKDFParams resolves options into parameters for a new keyslot with a
// fresh salt, benchmarking unless iterations are forced. defType and
// defHash apply when opts leaves them empty; keyLen is the derived key size.
func newKDFParams(opts KDF, defType, defHash string, keyLen int) (*kdfParams, error) {
	p := &kdfParams{typ: opts.Type, hash: opts.Hash}
	if p.typ == "" {
		p.typ = defType
	}
	if p.hash == "" {
		p.hash = defHash
	}
	if opts.IterTime < 0 {
		return nil, fmt.Errorf("%w: negative iteration time", ErrInvalidArgument)
	}
	target := opts.IterTime
	if target == 0 {
		target = DefaultIterTime
	}
	salt, err := randomBytes(saltSize)
	if err != nil {
		return nil, err
	}
	p.salt = salt
	switch p.typ {
	case KDFPBKDF2:
		h, err := lookupHash(p.hash)
		if err != nil {
			return nil, err
		}
		if opts.MemoryKiB != 0 || opts.Parallel != 0 {
			return nil, fmt.Errorf("%w: memory cost and threads do not apply to pbkdf2", ErrInvalidArgument)
		}
		if opts.Iterations != 0 {
			if opts.Iterations < minPBKDF2Iterations {
				return nil, fmt.Errorf("%w: pbkdf2 iterations must be at least %d", ErrInvalidArgument, minPBKDF2Iterations)
			}
			p.iterations = opts.Iterations
		} else {
			it, err := pbkdf2Iterations(h, keyLen, target)
			if err != nil {
				return nil, err
			}
			p.iterations = it
		}
	case KDFArgon2i, KDFArgon2id:
		if _, err := lookupHash(p.hash); err != nil {
			return nil, err
		}
		p.hash = "" // not part of an argon2 keyslot
		par := opts.Parallel
		if par == 0 {
			par = maxArgon2Parallel
		}
		if par > maxArgon2Parallel {
			return nil, fmt.Errorf("%w: argon2 threads must be at most %d", ErrInvalidArgument, maxArgon2Parallel)
		}
		par = min(par, uint32(max(1, runtime.NumCPU())))
		p.parallel = par
		if opts.Iterations != 0 {
			if opts.Iterations < minArgon2Time {
				return nil, fmt.Errorf("%w: argon2 time cost must be at least %d", ErrInvalidArgument, minArgon2Time)
			}
			if opts.MemoryKiB < minArgon2MemoryKiB || opts.MemoryKiB > MaxArgon2MemoryKiB {
				return nil, fmt.Errorf("%w: argon2 memory cost must be between %d and %d KiB", ErrInvalidArgument, minArgon2MemoryKiB, MaxArgon2MemoryKiB)
			}
			p.iterations = opts.Iterations
			p.memoryKiB = max(opts.MemoryKiB, 8*par)
		} else {
			maxMem := opts.MemoryKiB
			if maxMem == 0 {
				maxMem = defaultArgon2MaxMemoryKiB
				if phys := physMemoryKiB(); phys >= 128*1024 && phys/2 < uint64(maxMem) {
					maxMem = uint32(phys / 2)
				}
			}
			if maxMem < minArgon2MemoryKiB || maxMem > MaxArgon2MemoryKiB {
				return nil, fmt.Errorf("%w: argon2 memory cost must be between %d and %d KiB", ErrInvalidArgument, minArgon2MemoryKiB, MaxArgon2MemoryKiB)
			}
			t, m, err := argon2Params(p.typ, par, maxMem, keyLen, target)
			if err != nil {
				return nil, err
			}
			p.iterations, p.memoryKiB = t, m
		}
	default:
		return nil, fmt.Errorf("%w: unknown kdf %q", ErrInvalidArgument, p.typ)
	}
	return p, nil
}

// pbkdf2Iterations benchmarks PBKDF2 with hash h and returns the iteration
// count costing target time (at least 1000), like cryptsetup's
// crypt_pbkdf_check: run growing iteration counts until one takes long
// enough to measure, then extrapolate. The clock is the thread's CPU time
// where available, so a loaded machine does not weaken the result.
func pbkdf2Iterations(h func() hash.Hash, keyLen int, target time.Duration) (uint32, error) {
	perSec, err := pbkdf2Rate(h, keyLen, 200*time.Millisecond)
	if err != nil {
		return 0, err
	}
	it := perSec * target.Seconds()
	if it > float64(^uint32(0)) {
		return 0, fmt.Errorf("%w: pbkdf2 iteration count for %v overflows", ErrInvalidArgument, target)
	}
	return max(uint32(it), minPBKDF2Iterations), nil
}

// pbkdf2Rate measures PBKDF2 iterations per second (of keyLen bytes of
// output, computed serially), over at least minRun of CPU time.
func pbkdf2Rate(h func() hash.Hash, keyLen int, minRun time.Duration) (float64, error) {
	pw := []byte("foobarfo")
	salt := []byte("0123456789abcdef")
	iter := 1 << 12
	for step := 0; step < 16; step++ {
		clock := startClock()
		k := pbkdf2Key(h, pw, salt, iter, keyLen)
		d := clock.elapsed()
		clear(k)
		if d >= minRun {
			return float64(iter) / d.Seconds(), nil
		}
		switch {
		case d <= minRun/8:
			iter <<= 4
		case d <= minRun/4:
			iter <<= 3
		case d <= minRun/2:
			iter <<= 2
		default:
			iter <<= 1
		}
	}
	return 0, fmt.Errorf("%w: pbkdf2 benchmark did not converge", ErrInvalidArgument)
}

// argon2Params finds (time, memory) costing target wall time with par
// threads, starting from time 4 and 64 MiB (less if maxMem is lower) and
// preferring memory over time, as cryptsetup's crypt_argon2_check does.
func argon2Params(typ string, par, maxMem uint32, keyLen int, target time.Duration) (uint32, uint32, error) {
	const (
		benchMin     = 250 * time.Millisecond
		benchMinFast = 10 * time.Millisecond
	)
	minMem := uint32(minArgon2BenchMemoryKiB)
	if minMem > maxMem {
		minMem = maxMem
	}
	if minMem < 8*par {
		minMem = 8 * par
	}
	if maxMem < minMem {
		return 0, 0, fmt.Errorf("%w: argon2 memory cost too low for %d threads", ErrInvalidArgument, par)
	}
	measure := func(t, m uint32) time.Duration {
		p := kdfParams{typ: typ, iterations: t, memoryKiB: m, parallel: par, salt: make([]byte, saltSize)}
		start := time.Now()
		k, _ := p.derive(context.Background(), []byte("foobarfo"), keyLen)
		freeKey(k)
		return max(time.Since(start), time.Millisecond)
	}
	t, m := uint32(minArgon2Time), minMem
	var d time.Duration
	for step := 0; ; step++ {
		if step > 32 {
			return 0, 0, fmt.Errorf("%w: argon2 benchmark did not converge", ErrInvalidArgument)
		}
		d = measure(t, m)
		if d >= benchMin {
			break
		}
		if m == maxMem {
			if d < benchMinFast {
				t *= 16
			} else {
				n := uint32(uint64(t) * uint64(benchMin) / uint64(d))
				if n == t {
					break
				}
				t = n
			}
		} else {
			if d < benchMinFast {
				m = min(m*16, maxMem)
			} else {
				n := uint32(min(uint64(m)*uint64(benchMin)/uint64(d), uint64(maxMem)))
				if n == m {
					break
				}
				m = n
			}
		}
	}
	lo, hi := target*95/100, target*110/100
	for step := 0; step < 16; step++ {
		nt, nm, final := nextArgon2Params(t, m, minArgon2Time, minMem, maxMem, d, target)
		t, m = nt, nm
		if final {
			break
		}
		d = measure(t, m)
		if d >= lo && d <= hi {
			break
		}
	}
	return t, m, nil
}

// nextArgon2Params is cryptsetup's next_argon2_params: scale time first when
// decreasing and memory first when increasing.
func nextArgon2Params(t, m, minT, minM, maxM uint32, d, target time.Duration) (uint32, uint32, bool) {
	ms, tms := uint64(max(d.Milliseconds(), 1)), uint64(max(target.Milliseconds(), 1))
	ot, om := t, m
	if ms > tms {
		nt := uint32(uint64(t) * tms / ms)
		if nt < minT {
			nm := uint64(t) * uint64(m) * tms / (uint64(minT) * ms)
			t = minT
			if nm < uint64(minM) {
				return t, minM, true
			}
			m = uint32(nm)
		} else {
			t = nt
		}
	} else {
		nm := uint64(m) * tms / ms
		switch {
		case nm > uint64(maxM):
			nt := uint64(t) * uint64(m) * tms / (uint64(maxM) * ms)
			m = maxM
			if nt <= uint64(minT) {
				return minT, m, true
			}
			t = uint32(min(nt, uint64(^uint32(0))))
		case nm < uint64(minM):
			return t, minM, true
		default:
			m = uint32(nm)
		}
	}
	return t, m, t == ot && m == om
}

// constantTimeEqual compares two digests without leaking timing.
func constantTimeEqual(a, b []byte) bool {
	return subtle.ConstantTimeCompare(a, b) == 1
}
