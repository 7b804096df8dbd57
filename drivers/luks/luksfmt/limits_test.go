package luksfmt

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"
)

// hostileHeader makes a LUKS2 header with keyslot 0 (passA) edited by edit
// and, when second, keyslot 1 (passB) left as created.
func hostileHeader(t *testing.T, typ string, second bool, edit func(string) string) *Header {
	t.Helper()
	dev, h, key := create(t, CreateOptions{Version: 2, KDF: fastKDF(typ), MetadataSize: 65536, KeyslotsSize: 2 << 20})
	if second {
		if _, err := h.AddKey(dev, key, 1, passB, fastKDF(typ)); err != nil {
			t.Fatal(err)
		}
	}
	text := getLUKS2JSON(dev, 0)
	i := strings.Index(text, `"keyslots":{"0":`)
	edited := text[:i] + edit(text[i:])
	if edited == text {
		t.Fatal("edit did not change the json")
	}
	setLUKS2JSON(t, dev, edited)
	return reopen(t, dev)
}

// Costs only hostile or damaged headers have.
var (
	argon2Mem4G     = repl(`"memory":32`, `"memory":4194304`)
	argon2Passes1K  = repl(`"time":4,"memory":32`, `"time":1024,"memory":1048576`)
	pbkdf2Iter2to28 = repl(`"type":"pbkdf2","hash":"sha256","iterations":1000`, `"type":"pbkdf2","hash":"sha512","iterations":268435456`)
)

// TestKDFLimitsRefuseHostileCosts: keyslots whose derivation would take
// gigabytes or minutes are refused quickly, without allocating, with an
// error that names the limit and the option raising it.
func TestKDFLimitsRefuseHostileCosts(t *testing.T) {
	tests := []struct {
		name, typ string
		edit      func(string) string
		msg       string
		raised    KDFLimits // the error then changes to raisedMsg
		raisedMsg string
	}{
		{"argon2 memory 4 GiB", KDFArgon2id, argon2Mem4G,
			"keyslot 0: argon2id memory cost 4194304 KiB exceeds the limit of 1048576 KiB (raise it with --max-kdf-memory)",
			KDFLimits{MaxMemoryKiB: 4 << 20, MaxTime: time.Second}, "over the limit of 1s (raise it with --max-kdf-time)"},
		{"argon2 1 GiB x 1024 passes", KDFArgon2i, argon2Passes1K,
			"keyslot 0: argon2i (1024 passes over 1048576 KiB, 1 threads) would take about",
			KDFLimits{MaxMemoryKiB: 512 << 10}, "exceeds the limit of 524288 KiB"},
		{"pbkdf2 2^28 iterations", KDFPBKDF2, pbkdf2Iter2to28,
			"keyslot 0: pbkdf2 (sha512, 268435456 iterations) would take about",
			KDFLimits{MaxTime: time.Millisecond}, "over the limit of 1ms"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := hostileHeader(t, tc.typ, false, tc.edit)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, _, err := h.Unlock(context.Background(), passA, AnySlot, KDFLimits{})
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrKDFLimit) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Unlock = %v, want ErrKDFLimit with %q", err, tc.msg)
			}
			if !strings.Contains(err.Error(), "(raise it with --max-kdf-") {
				t.Fatalf("Unlock = %v, want the option named", err)
			}
			// Calibration (once per process) takes tens of ms and 4 MiB.
			if took > 2*time.Second {
				t.Fatalf("refusing took %v", took)
			}
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 32<<20 {
				t.Fatalf("refusing allocated %d MiB", grew>>20)
			}
			_, _, err = h.Unlock(context.Background(), passA, 0, tc.raised)
			if !errors.Is(err, ErrKDFLimit) || !strings.Contains(err.Error(), tc.raisedMsg) {
				t.Fatalf("Unlock with %+v = %v, want ErrKDFLimit with %q", tc.raised, err, tc.raisedMsg)
			}
		})
	}
}

// TestKDFLimitsSkipKeyslot: a keyslot over the limits is skipped, another
// one opens; its error is reported only when no keyslot opens.
func TestKDFLimitsSkipKeyslot(t *testing.T) {
	h := hostileHeader(t, KDFPBKDF2, true, pbkdf2Iter2to28)
	if _, slot, err := h.Unlock(context.Background(), passB, AnySlot, KDFLimits{}); err != nil || slot != 1 {
		t.Fatalf("Unlock(B) = slot %d, %v; want keyslot 1", slot, err)
	}
	_, _, err := h.Unlock(context.Background(), passC, AnySlot, KDFLimits{})
	if !errors.Is(err, ErrKDFLimit) || !strings.Contains(err.Error(), "keyslot 0: ") {
		t.Fatalf("Unlock(wrong) = %v, want keyslot 0's ErrKDFLimit", err)
	}
	if _, err := h.MatchSlots(context.Background(), passB, KDFLimits{}); !errors.Is(err, ErrKDFLimit) {
		t.Fatalf("MatchSlots = %v, want ErrKDFLimit", err)
	}
}

// TestKDFLimitsAdmitDefaults: cryptsetup's default argon2id cost (1 GiB,
// 4 threads, calibrated to 2 s) and a PBKDF2 keyslot calibrated to 10 s are
// within the default limits (checked, not derived).
func TestKDFLimitsAdmitDefaults(t *testing.T) {
	it, err := pbkdf2Iterations(hashAlgs["sha256"], 64, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pb := kdfParams{typ: KDFPBKDF2, hash: "sha256", iterations: it, salt: make([]byte, saltSize)}
	if err := checkCost("keyslot 0", &pb, 64, pbkdf2Cost{"sha256", 1 << 17, 32}, KDFLimits{}); err != nil {
		t.Errorf("pbkdf2 at 10 s: %v", err)
	}
	// 1 GiB, 4 threads: the time cost a 2 s calibration gives here.
	perKiB := argon2Rate()
	passes := uint32(max(4, 2e9/(perKiB*(1<<20)/float64(min(4, runtime.GOMAXPROCS(0))))))
	a := kdfParams{typ: KDFArgon2id, iterations: passes, memoryKiB: 1 << 20, parallel: 4, salt: make([]byte, saltSize)}
	if err := checkCost("keyslot 0", &a, 64, pbkdf2Cost{"sha256", 1 << 17, 32}, KDFLimits{}); err != nil {
		t.Errorf("argon2id 1 GiB x %d: %v", passes, err)
	}
}

// TestUnlockCancel: a derivation under way returns within 100 ms of its
// context being cancelled, for PBKDF2 (which stops) and argon2 (which
// finishes in the background).
func TestUnlockCancel(t *testing.T) {
	tests := []struct {
		name, typ string
		edit      func(string) string
	}{
		{"pbkdf2", KDFPBKDF2, pbkdf2Iter2to28},
		// 64 MiB x 200 passes: seconds, not minutes, in the background.
		{"argon2id", KDFArgon2id, repl(`"time":4,"memory":32`, `"time":200,"memory":65536`)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := hostileHeader(t, tc.typ, false, tc.edit)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				_, _, err := h.Unlock(ctx, passA, AnySlot, KDFLimits{MaxTime: time.Hour})
				done <- err
			}()
			select {
			case err := <-done:
				t.Fatalf("Unlock ended before cancel: %v", err)
			case <-time.After(300 * time.Millisecond):
			}
			cancel()
			start := time.Now()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("Unlock = %v, want context.Canceled", err)
				}
				if d := time.Since(start); d > 100*time.Millisecond {
					t.Fatalf("Unlock returned %v after cancel", d)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Unlock did not return after cancel")
			}
		})
	}
}
