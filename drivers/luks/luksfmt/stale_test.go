package luksfmt

import (
	"context"
	"slices"
	"testing"
)

// TestStaleCopyRecoveredBeforeUpdate: an update interrupted between the two
// LUKS2 copies leaves the secondary one behind. The next update must bring
// it up to date before it rewrites the primary: if that update is
// interrupted too, inside the primary copy, readers fall back to the
// secondary, which must show the last completed state, not the older one.
// Here the first, interrupted update erased keyslot 1 (its material is
// wiped); the stale secondary still lists it.
func TestStaleCopyRecoveredBeforeUpdate(t *testing.T) {
	base, h0, key := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(2)})
	defer Wipe(key)
	if _, err := h0.AddKey(base, key, 1, passB, fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	// Interrupt the erase of keyslot 1 at each write until the primary
	// copy says it is gone while the secondary still lists it.
	var stale *memDev
	for k := 1; k < 64 && stale == nil; k++ {
		dev := base.snapshot()
		h := reopen(t, dev)
		dev.failAfter = k
		if err := h.KillSlot(dev, 1); err == nil {
			t.Fatal("the erase finished before the secondary copy was written")
		}
		after := reopen(t, dev.snapshot())
		if !slices.Contains(after.ActiveSlots(), 1) && after.v2.states[1] != CopyOK {
			stale = dev.snapshot()
		}
	}
	if stale == nil {
		t.Fatal("no interruption point left the secondary copy behind")
	}
	// Now add keyslot 2, interrupted at every write.
	probe := stale.snapshot()
	if _, err := reopen(t, probe).AddKey(probe, key, 2, []byte("third passphrase"), fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	writes := probe.writes
	for k := 1; k <= writes; k++ {
		dev := stale.snapshot()
		h := reopen(t, dev)
		dev.failAfter = k
		if _, err := h.AddKey(dev, key, 2, []byte("third passphrase"), fastKDF(KDFPBKDF2)); err == nil {
			t.Fatalf("write %d/%d failed but the update succeeded", k, writes)
		}
		after := reopen(t, dev.snapshot())
		if slices.Contains(after.ActiveSlots(), 1) {
			t.Fatalf("interrupted at write %d/%d: the erased keyslot 1 is back (the header fell back to a stale copy)", k, writes)
		}
		if kk, _, err := after.Unlock(context.Background(), passA, AnySlot, KDFLimits{}); err != nil {
			t.Fatalf("interrupted at write %d/%d: the main passphrase no longer opens: %v", k, writes, err)
		} else {
			Wipe(kk)
		}
	}
}
