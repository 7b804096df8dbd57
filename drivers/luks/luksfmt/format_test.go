package luksfmt

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
)

var (
	passA = []byte("first passphrase")
	passB = []byte("second passphrase")
	passC = []byte("third ünïcode passphrase")
	passD = []byte("fourth")
)

// create makes a header on a new memDev.
func create(t testing.TB, opts CreateOptions) (*memDev, *Header, []byte) {
	t.Helper()
	if opts.Passphrase == nil {
		opts.Passphrase = passA
	}
	if opts.KDF == (KDF{}) {
		typ := KDFPBKDF2
		if opts.Version == 2 {
			typ = KDFArgon2id
		}
		opts.KDF = fastKDF(typ)
	}
	dev := &memDev{}
	h, key, err := Create(dev, opts)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return dev, h, key
}

func reopen(t testing.TB, dev *memDev) *Header {
	t.Helper()
	h, err := Open(dev, dev.size())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return h
}

func mustUnlock(t testing.TB, h *Header, pass []byte, wantSlot int, wantKey []byte) {
	t.Helper()
	key, slot, err := h.Unlock(context.Background(), pass, AnySlot, KDFLimits{})
	if err != nil {
		t.Fatalf("Unlock(%q): %v", pass, err)
	}
	if wantSlot >= 0 && slot != wantSlot {
		t.Fatalf("Unlock(%q) opened keyslot %d, want %d", pass, slot, wantSlot)
	}
	if wantKey != nil && !bytes.Equal(key, wantKey) {
		t.Fatalf("Unlock(%q) returned a different volume key", pass)
	}
	Wipe(key)
}

func mustFail(t testing.TB, h *Header, pass []byte) {
	t.Helper()
	if _, _, err := h.Unlock(context.Background(), pass, AnySlot, KDFLimits{}); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("Unlock(%q) = %v, want ErrWrongPassphrase", pass, err)
	}
}

func TestCreateLayouts(t *testing.T) {
	tests := []struct {
		name        string
		opts        CreateOptions
		payload     int64
		headerSize  int64
		keySize     int
		sectorSize  int
		slot0Offset int64
		info        Info // compared field by field where set
	}{
		{
			name: "luks1 qemu default", opts: CreateOptions{},
			payload: 2068480, headerSize: 2068480, keySize: 64, sectorSize: 512, slot0Offset: 4096,
			info: Info{CipherAlg: "aes-256", CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256", MasterKeyIters: 1000},
		},
		{
			name: "luks1 detached", opts: CreateOptions{Detached: true},
			payload: 0, headerSize: 2068480, keySize: 64, sectorSize: 512, slot0Offset: 4096,
		},
		{
			name: "luks1 aes-128 cbc-essiv sha1", opts: CreateOptions{Mode: "cbc-essiv:sha256", KeySize: 16, Hash: "sha1"},
			payload: 4096 + 8*65536, headerSize: 4096 + 8*65536, keySize: 16, sectorSize: 512, slot0Offset: 4096,
			info: Info{CipherAlg: "aes-128", CipherMode: "cbc", IVGenAlg: "essiv", IVGenHashAlg: "sha256", HashAlg: "sha1"},
		},
		{
			name: "luks1 explicit payload offset", opts: CreateOptions{PayloadOffset: 4 << 20},
			payload: 4 << 20, headerSize: 2068480, keySize: 64, sectorSize: 512, slot0Offset: 4096,
		},
		{
			name: "luks2 default", opts: CreateOptions{Version: 2},
			payload: 16 << 20, headerSize: 16 << 20, keySize: 64, sectorSize: 512, slot0Offset: 32768,
			info: Info{CipherAlg: "aes-256", CipherMode: "xts", IVGenAlg: "plain64", HashAlg: "sha256", MasterKeyIters: 1000, Version: 2},
		},
		{
			name: "luks2 pbkdf2 sha512", opts: CreateOptions{Version: 2, Hash: "sha512", KDF: fastKDF(KDFPBKDF2)},
			payload: 16 << 20, headerSize: 16 << 20, keySize: 64, sectorSize: 512, slot0Offset: 32768,
			info: Info{HashAlg: "sha512"},
		},
		{
			name: "luks2 argon2i cbc-plain64", opts: CreateOptions{Version: 2, Mode: "cbc-plain64", KDF: fastKDF(KDFArgon2i)},
			payload: 16 << 20, headerSize: 16 << 20, keySize: 32, sectorSize: 512, slot0Offset: 32768,
			info: Info{CipherAlg: "aes-256", CipherMode: "cbc", IVGenAlg: "plain64"},
		},
		{
			name: "luks2 detached 4096", opts: CreateOptions{Version: 2, Detached: true, SectorSize: 4096},
			payload: 0, headerSize: 16 << 20, keySize: 64, sectorSize: 4096, slot0Offset: 32768,
		},
		{
			name: "luks2 64k metadata", opts: CreateOptions{Version: 2, MetadataSize: 65536},
			payload: 16 << 20, headerSize: 16 << 20, keySize: 64, sectorSize: 512, slot0Offset: 131072,
		},
		{
			name: "luks2 4 MiB payload offset", opts: CreateOptions{Version: 2, PayloadOffset: 4 << 20, Label: "data", Subsystem: "blockd"},
			payload: 4 << 20, headerSize: 4 << 20, keySize: 64, sectorSize: 512, slot0Offset: 32768,
			info: Info{Label: "data", Subsystem: "blockd"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.UUID = "0A1B2C3D-0000-4000-8000-00000000CAFE"
			dev, created, key := create(t, tc.opts)
			for _, h := range []*Header{created, reopen(t, dev)} {
				if h.PayloadOffset() != tc.payload || h.HeaderSize() != tc.headerSize || h.KeySize() != tc.keySize || h.SectorSize() != tc.sectorSize {
					t.Fatalf("payload %d header %d key %d sector %d", h.PayloadOffset(), h.HeaderSize(), h.KeySize(), h.SectorSize())
				}
				if h.UUID() != "0a1b2c3d-0000-4000-8000-00000000cafe" {
					t.Fatalf("uuid %q", h.UUID())
				}
				in := h.Info()
				if in.Slots[0].KeyOffset != tc.slot0Offset || !in.Slots[0].Active || in.PayloadOffset != tc.payload {
					t.Fatalf("info %+v", in)
				}
				checkInfo(t, in, tc.info)
				if l, s := h.Label(); l != in.Label || s != in.Subsystem {
					t.Fatalf("Label() = %q %q, Info says %q %q", l, s, in.Label, in.Subsystem)
				}
				if err := h.Damage(); err != nil {
					t.Fatal(err)
				}
				mustUnlock(t, h, passA, 0, key)
				mustFail(t, h, passB)
			}
			if dev.size() != tc.headerSize {
				t.Fatalf("Create wrote %d bytes, want the header size %d", dev.size(), tc.headerSize)
			}
			if tc.opts.Version != 2 && tc.keySize == 64 {
				// QEMU's LUKS1 layout: keyslots at 4096 + n*258048.
				for i, s := range created.Info().Slots {
					if s.KeyOffset != 4096+int64(i)*258048 {
						t.Fatalf("keyslot %d at %d", i, s.KeyOffset)
					}
				}
			}
		})
	}
}

func checkInfo(t testing.TB, got, want Info) {
	t.Helper()
	gv, wv := reflect.ValueOf(got), reflect.ValueOf(want)
	for i := range wv.NumField() {
		if wv.Field(i).IsZero() {
			continue
		}
		if !reflect.DeepEqual(gv.Field(i).Interface(), wv.Field(i).Interface()) {
			t.Fatalf("Info.%s = %v, want %v", wv.Type().Field(i).Name, gv.Field(i).Interface(), wv.Field(i).Interface())
		}
	}
}

func TestCreateErrors(t *testing.T) {
	tests := []struct {
		name string
		opts CreateOptions
		want error
	}{
		{"version 3", CreateOptions{Version: 3}, ErrInvalidArgument},
		{"luks1 with argon2", CreateOptions{KDF: fastKDF(KDFArgon2id)}, ErrInvalidArgument},
		{"luks1 sector size", CreateOptions{SectorSize: 4096}, ErrInvalidArgument},
		{"luks1 payload inside header", CreateOptions{PayloadOffset: 4096}, ErrInvalidArgument},
		{"luks2 payload inside header", CreateOptions{Version: 2, PayloadOffset: 65536}, ErrInvalidArgument},
		{"luks2 sector size", CreateOptions{Version: 2, SectorSize: 1000}, ErrInvalidArgument},
		{"luks2 payload not sector aligned", CreateOptions{Version: 2, SectorSize: 4096, PayloadOffset: (16 << 20) + 512}, ErrInvalidArgument},
		{"luks2 metadata size", CreateOptions{Version: 2, MetadataSize: 20000}, ErrInvalidArgument},
		{"luks2 keyslots size", CreateOptions{Version: 2, KeyslotsSize: 1000}, ErrInvalidArgument},
		{"luks2 label too long", CreateOptions{Version: 2, Label: strings.Repeat("x", 48)}, ErrInvalidArgument},
		{"unsupported cipher", CreateOptions{Cipher: "serpent"}, ErrUnsupported},
		{"bad key size for xts", CreateOptions{KeySize: 40}, ErrUnsupported},
		{"unsupported hash", CreateOptions{Hash: "whirlpool"}, ErrUnsupported},
		{"key of the wrong size", CreateOptions{Key: make([]byte, 32)}, ErrInvalidArgument},
		{"bad uuid", CreateOptions{UUID: "not-a-uuid"}, ErrInvalidArgument},
		{"unaligned payload offset", CreateOptions{PayloadOffset: 3000000}, ErrInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.opts.KDF == (KDF{}) {
				tc.opts.KDF = fastKDF(KDFPBKDF2)
			}
			tc.opts.Passphrase = passA
			if _, _, err := Create(&memDev{}, tc.opts); !errors.Is(err, tc.want) {
				t.Fatalf("Create: %v, want %v", err, tc.want)
			}
		})
	}
}

func TestCreateWithKey(t *testing.T) {
	key := bytes.Repeat([]byte{0x11, 0x22}, 32)
	for _, v := range []int{1, 2} {
		dev, _, got := create(t, CreateOptions{Version: v, Key: key})
		if !bytes.Equal(got, key) {
			t.Fatalf("v%d: Create returned another key", v)
		}
		h := reopen(t, dev)
		mustUnlock(t, h, passA, 0, key)
		if err := h.VerifyKey(key); err != nil {
			t.Fatal(err)
		}
		if err := h.VerifyKey(make([]byte, 64)); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("VerifyKey(zero key) = %v", err)
		}
	}
}

func TestKeyslotLifecycle(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		kdf     KDF
	}{
		{"luks1", 1, fastKDF(KDFPBKDF2)},
		{"luks2 pbkdf2", 2, fastKDF(KDFPBKDF2)},
		{"luks2 argon2id", 2, fastKDF(KDFArgon2id)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, h, key := create(t, CreateOptions{Version: tc.version, KDF: tc.kdf, KeyslotsSize: smallKeyslots(tc.version)})
			if n, err := h.AddKey(dev, key, AnySlot, passB, tc.kdf); err != nil || n != 1 {
				t.Fatalf("AddKey B: %d %v", n, err)
			}
			if n, err := h.AddKey(dev, key, 5, passC, tc.kdf); err != nil || n != 5 {
				t.Fatalf("AddKey C: %d %v", n, err)
			}
			if _, err := h.AddKey(dev, key, 5, passD, tc.kdf); !errors.Is(err, ErrSlotActive) {
				t.Fatalf("AddKey into active slot: %v", err)
			}
			if _, err := h.AddKey(dev, make([]byte, len(key)), AnySlot, passD, tc.kdf); !errors.Is(err, ErrWrongKey) {
				t.Fatalf("AddKey with a wrong key: %v", err)
			}
			if _, err := h.AddKey(dev, key, h.MaxSlots(), passD, tc.kdf); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("AddKey out of range: %v", err)
			}

			h = reopen(t, dev)
			if got := h.ActiveSlots(); !slices.Equal(got, []int{0, 1, 5}) {
				t.Fatalf("ActiveSlots = %v", got)
			}
			mustUnlock(t, h, passA, 0, key)
			mustUnlock(t, h, passB, 1, key)
			mustUnlock(t, h, passC, 5, key)
			if _, _, err := h.Unlock(context.Background(), passC, 1, KDFLimits{}); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("Unlock(C, slot 1) = %v", err)
			}
			if _, _, err := h.Unlock(context.Background(), passC, 3, KDFLimits{}); !errors.Is(err, ErrSlotInactive) {
				t.Fatalf("Unlock(slot 3) = %v", err)
			}

			if n, err := h.AddKey(dev, key, AnySlot, passA, tc.kdf); err != nil || n != 2 {
				t.Fatalf("AddKey A again: %d %v", n, err)
			}
			if got, err := h.MatchSlots(context.Background(), passA, KDFLimits{}); err != nil || !slices.Equal(got, []int{0, 2}) {
				t.Fatalf("MatchSlots(A) = %v, %v", got, err)
			}

			n, err := h.ChangeKey(dev, passB, passD, tc.kdf)
			if err != nil {
				t.Fatalf("ChangeKey: %v", err)
			}
			want := 1 // LUKS2 keeps the keyslot id
			if tc.version == 1 {
				want = 3 // LUKS1 moves to the first free keyslot
			}
			if n != want {
				t.Fatalf("ChangeKey moved to keyslot %d, want %d", n, want)
			}
			h = reopen(t, dev)
			mustFail(t, h, passB)
			mustUnlock(t, h, passD, want, key)

			areaOff := h.Info().Slots[slices.IndexFunc(h.Info().Slots, func(s SlotInfo) bool { return s.ID == 5 })].KeyOffset
			before := bytes.Clone(dev.b[areaOff : areaOff+4096])
			if n, err := h.RemoveKey(dev, passC); err != nil || n != 5 {
				t.Fatalf("RemoveKey(C): %d %v", n, err)
			}
			if bytes.Equal(before, dev.b[areaOff:areaOff+4096]) {
				t.Fatal("keyslot material was not wiped")
			}
			if err := h.KillSlot(dev, 5); !errors.Is(err, ErrSlotInactive) {
				t.Fatalf("KillSlot(inactive) = %v", err)
			}
			h = reopen(t, dev)
			mustFail(t, h, passC)
			if err := h.KillSlot(dev, 2); err != nil {
				t.Fatal(err)
			}
			if got, err := h.MatchSlots(context.Background(), passA, KDFLimits{}); err != nil || !slices.Equal(got, []int{0}) {
				t.Fatalf("MatchSlots(A) after kill = %v, %v", got, err)
			}
			if err := h.Erase(dev); err != nil {
				t.Fatal(err)
			}
			h = reopen(t, dev)
			if got := h.ActiveSlots(); len(got) != 0 {
				t.Fatalf("ActiveSlots after Erase = %v", got)
			}
			mustFail(t, h, passA)
			mustFail(t, h, passD)
			// The header still holds the digest: the key can be re-added.
			if n, err := h.AddKey(dev, key, AnySlot, passB, tc.kdf); err != nil || n != 0 {
				t.Fatalf("AddKey after Erase: %d %v", n, err)
			}
			mustUnlock(t, reopen(t, dev), passB, 0, key)
		})
	}
}

func TestLUKS1SlotsFull(t *testing.T) {
	dev, h, key := create(t, CreateOptions{})
	for i := 1; i < 8; i++ {
		if _, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrNoFreeSlot) {
		t.Fatalf("AddKey on a full header: %v", err)
	}
	if _, err := h.ChangeKey(dev, passA, passC, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrNoFreeSlot) {
		t.Fatalf("ChangeKey on a full luks1 header: %v", err)
	}
	mustUnlock(t, reopen(t, dev), passA, 0, key)
}

func TestLUKS2KeyslotsAreaFull(t *testing.T) {
	// A 1 MiB payload offset leaves room for 3 keyslots of 258048 bytes.
	dev, h, key := create(t, CreateOptions{Version: 2, PayloadOffset: 1 << 20})
	for i := 1; i < 3; i++ {
		if _, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil {
			t.Fatalf("AddKey %d: %v", i, err)
		}
	}
	if _, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("AddKey with a full keyslots area: %v", err)
	}
	if _, err := h.ChangeKey(dev, passA, passC, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("ChangeKey with a full keyslots area: %v", err)
	}
	// Killing a keyslot frees its area for reuse.
	if err := h.KillSlot(dev, 1); err != nil {
		t.Fatal(err)
	}
	if n, err := h.ChangeKey(dev, passA, passC, fastKDF(KDFPBKDF2)); err != nil || n != 0 {
		t.Fatalf("ChangeKey: %d %v", n, err)
	}
	mustUnlock(t, reopen(t, dev), passC, 0, key)
}

// TestInterruptedUpdates fails each write of a keyslot update in turn and
// checks that the device still opens and that the old passphrase, or for
// ChangeKey the old or the new one, still unlocks it.
func TestInterruptedUpdates(t *testing.T) {
	type op struct {
		name string
		run  func(h *Header, dev *memDev, key []byte) error
		ok   [][]byte // at least one of these must unlock after a failure
	}
	ops := []op{
		{"AddKey", func(h *Header, dev *memDev, key []byte) error {
			_, err := h.AddKey(dev, key, AnySlot, passC, fastKDF(KDFPBKDF2))
			return err
		}, [][]byte{passA}},
		{"ChangeKey", func(h *Header, dev *memDev, key []byte) error {
			_, err := h.ChangeKey(dev, passB, passC, fastKDF(KDFPBKDF2))
			return err
		}, [][]byte{passB, passC}},
		{"KillSlot", func(h *Header, dev *memDev, key []byte) error {
			return h.KillSlot(dev, 1)
		}, [][]byte{passA}},
	}
	for _, v := range []int{1, 2} {
		base, h0, key := create(t, CreateOptions{Version: v, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(v)})
		if _, err := h0.AddKey(base, key, 1, passB, fastKDF(KDFPBKDF2)); err != nil {
			t.Fatal(err)
		}
		for _, o := range ops {
			t.Run(o.name+"/luks"+string(rune('0'+v)), func(t *testing.T) {
				probe := base.snapshot()
				if err := o.run(reopen(t, probe), probe, key); err != nil {
					t.Fatal(err)
				}
				writes := probe.writes
				if writes < 2 {
					t.Fatalf("update made only %d writes", writes)
				}
				for k := 1; k <= writes; k++ {
					dev := base.snapshot()
					h := reopen(t, dev)
					dev.failAfter = k
					if err := o.run(h, dev, key); !errors.Is(err, errInjected) {
						t.Fatalf("write %d/%d failed but the update returned %v", k, writes, err)
					}
					after := reopen(t, dev.snapshot())
					opened := false
					for _, p := range o.ok {
						if k, _, err := after.Unlock(context.Background(), p, AnySlot, KDFLimits{}); err == nil {
							Wipe(k)
							opened = true
						}
					}
					if !opened {
						t.Fatalf("after failing write %d/%d no expected passphrase opens the volume", k, writes)
					}
				}
			})
		}
	}
}

// setLUKS2JSON replaces the JSON text of both header copies and recomputes
// their checksums (sequence ids unchanged).
func setLUKS2JSON(t testing.TB, dev *memDev, text string) {
	t.Helper()
	hdrSize := int64(binary.BigEndian.Uint64(dev.b[off2HdrSize:]))
	for _, off := range []int64{0, hdrSize} {
		area := make([]byte, hdrSize-luks2BinLen)
		if len(text) > len(area) {
			t.Fatalf("json of %d bytes does not fit", len(text))
		}
		copy(area, text)
		bin := dev.b[off : off+luks2BinLen]
		sum, err := luks2Checksum("sha256", bin, area)
		if err != nil {
			t.Fatal(err)
		}
		copy(bin[off2Csum:], sum)
		copy(dev.b[off+luks2BinLen:], area)
	}
}

func getLUKS2JSON(dev *memDev, off int64) string {
	hdrSize := int64(binary.BigEndian.Uint64(dev.b[off2HdrSize:]))
	area := dev.b[off+luks2BinLen : off+hdrSize]
	return string(area[:bytes.IndexByte(area, 0)])
}

func TestLUKS2CopyDamage(t *testing.T) {
	base, h0, key := create(t, CreateOptions{Version: 2, KeyslotsSize: smallKeyslots(2)})
	older := base.snapshot()
	if _, err := h0.AddKey(base, key, AnySlot, passB, fastKDF(KDFArgon2id)); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		damage      func(d *memDev)
		states      [2]CopyState
		newKeyOpens bool
	}{
		{"primary checksum", func(d *memDev) { d.b[4096+5] ^= 1 }, [2]CopyState{CopyCorrupt, CopyOK}, true},
		{"primary wiped", func(d *memDev) { clear(d.b[:4096]) }, [2]CopyState{CopyCorrupt, CopyOK}, true},
		{"secondary magic", func(d *memDev) { d.b[16384] = 'X' }, [2]CopyState{CopyOK, CopyCorrupt}, true},
		{"secondary json", func(d *memDev) { d.b[16384+4096+1] = 'X' }, [2]CopyState{CopyOK, CopyCorrupt}, true},
		{"secondary older", func(d *memDev) { copy(d.b[16384:32768], older.b[16384:32768]) }, [2]CopyState{CopyOK, CopyObsolete}, true},
		{"primary older", func(d *memDev) { copy(d.b[:16384], older.b[:16384]) }, [2]CopyState{CopyObsolete, CopyOK}, true},
		{"primary json invalid", func(d *memDev) {
			// Valid checksum over invalid metadata.
			sec := getLUKS2JSON(d, 16384)
			setLUKS2JSON(t, d, strings.Replace(sec, `"keyslots_size"`, `"keyslots_sizeX"`, 1))
			copy(d.b[16384:32768], base.b[16384:32768])
		}, [2]CopyState{CopyCorrupt, CopyOK}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev := base.snapshot()
			tc.damage(dev)
			h := reopen(t, dev)
			if p, s := h.CopyStates(); [2]CopyState{p, s} != tc.states {
				t.Fatalf("CopyStates = %v %v, want %v", p, s, tc.states)
			}
			if err := h.Damage(); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Damage = %v", err)
			}
			mustUnlock(t, h, passA, 0, key)
			mustUnlock(t, h, passB, 1, key)
			if err := h.Repair(dev); err != nil {
				t.Fatal(err)
			}
			h = reopen(t, dev)
			if err := h.Damage(); err != nil {
				t.Fatalf("after Repair: %v", err)
			}
			if getLUKS2JSON(dev, 0) != getLUKS2JSON(dev, 16384) {
				t.Fatal("copies differ after Repair")
			}
			mustUnlock(t, h, passB, 1, key)
		})
	}
	t.Run("both copies damaged", func(t *testing.T) {
		dev := base.snapshot()
		dev.b[4096+5] ^= 1
		dev.b[16384+4096+5] ^= 1
		if _, err := Open(dev, dev.size()); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Open = %v, want ErrCorrupt", err)
		}
	})
	t.Run("not luks", func(t *testing.T) {
		for _, dev := range []*memDev{{b: make([]byte, 1<<20)}, {b: make([]byte, 100)}, {}} {
			if _, err := Open(dev, dev.size()); !errors.Is(err, ErrNotLUKS) {
				t.Fatalf("Open(%d zero bytes) = %v, want ErrNotLUKS", dev.size(), err)
			}
		}
	})
	t.Run("device too small", func(t *testing.T) {
		if _, err := Open(base, 1<<20); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "too small") {
			t.Fatalf("Open = %v", err)
		}
	})
}

// TestConcurrentUpdateDetected: a header opened before another update of
// the same device refuses to write (before touching any keyslot area).
func TestConcurrentUpdateDetected(t *testing.T) {
	for _, v := range []int{1, 2} {
		dev, _, key := create(t, CreateOptions{Version: v, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(v)})
		h1, h2, h3 := reopen(t, dev), reopen(t, dev), reopen(t, dev)
		if _, err := h1.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil {
			t.Fatal(err)
		}
		if _, err := h2.AddKey(dev, key, AnySlot, passC, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrConcurrentUpdate) {
			t.Fatalf("v%d: stale AddKey = %v, want ErrConcurrentUpdate", v, err)
		}
		if err := h3.KillSlot(dev, 0); !errors.Is(err, ErrConcurrentUpdate) {
			t.Fatalf("v%d: stale KillSlot = %v, want ErrConcurrentUpdate", v, err)
		}
		h := reopen(t, dev)
		mustUnlock(t, h, passA, 0, key)
		mustUnlock(t, h, passB, 1, key)
	}
}

func TestUnlockConcurrent(t *testing.T) {
	dev, h, key := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(2)})
	if _, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := passA
			if i%2 == 1 {
				p = passB
			}
			k, _, err := h.Unlock(context.Background(), p, AnySlot, KDFLimits{})
			if err != nil || !bytes.Equal(k, key) {
				t.Errorf("Unlock: %v", err)
			}
			_ = h.Info()
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, err := h.AddKey(dev, key, AnySlot, passC, fastKDF(KDFPBKDF2)); err != nil {
			t.Errorf("AddKey: %v", err)
		}
	}()
	wg.Wait()
}

func TestLUKS2Priority(t *testing.T) {
	dev, h, key := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(2)})
	if _, err := h.AddKey(dev, key, 3, passA, fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	text := getLUKS2JSON(dev, 0)
	// keyslot 3 preferred, keyslot 0 ignored
	text = strings.Replace(text, `"0":{"type":"luks2",`, `"0":{"type":"luks2","priority":0,`, 1)
	text = strings.Replace(text, `"3":{"type":"luks2",`, `"3":{"type":"luks2","priority":2,`, 1)
	setLUKS2JSON(t, dev, text)
	h = reopen(t, dev)
	if in := h.Info(); in.Slots[0].Priority != "ignore" || in.Slots[1].Priority != "prefer" || in.Slots[1].ID != 3 {
		t.Fatalf("priorities in Info: %+v", in.Slots)
	}
	mustUnlock(t, h, passA, 3, key)
	if err := h.KillSlot(dev, 3); err != nil {
		t.Fatal(err)
	}
	mustFail(t, h, passA) // only the ignored keyslot is left
	if k, s, err := h.Unlock(context.Background(), passA, 0, KDFLimits{}); err != nil || s != 0 || !bytes.Equal(k, key) {
		t.Fatalf("explicit Unlock of an ignored keyslot: %d %v", s, err)
	}
}

// TestPreserveUnknownJSON: members this package does not model survive
// keyslot updates unchanged; references to removed keyslots are dropped.
func TestPreserveUnknownJSON(t *testing.T) {
	dev, _, key := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2)})
	text := getLUKS2JSON(dev, 0)
	text = strings.Replace(text, `"tokens":{}`, `"tokens":{"4":{"type":"systemd-tpm2","keyslots":["0"],"tpm2-pcrs":[7],"x":"<&>\u00e9","n":1.5e3}}`, 1)
	text = strings.Replace(text, `"config":{`, `"config":{"flags":["allow-discards"],"x-cfg":{"a":[1,{"b":null}]},`, 1)
	text = strings.Replace(text, `"0":{"type":"luks2",`, `"0":{"type":"luks2","x-slot":true,`, 1)
	text = strings.TrimSuffix(text, "}") + `,"x-vendor":{"deep":[[[["v"]]]]}}`
	setLUKS2JSON(t, dev, text)

	h := reopen(t, dev)
	if n, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil || n != 1 {
		t.Fatalf("AddKey: %d %v", n, err)
	}
	after := getLUKS2JSON(dev, 0)
	for _, want := range []string{
		`"4":{"type":"systemd-tpm2","keyslots":["0"],"tpm2-pcrs":[7],"x":"<&>\u00e9","n":1.5e3}`,
		`"flags":["allow-discards"],"x-cfg":{"a":[1,{"b":null}]}`,
		`"x-slot":true`,
		`"x-vendor":{"deep":[[[["v"]]]]}`,
		`"keyslots":["0","1"],"segments":["0"]`,
	} {
		if !strings.Contains(after, want) {
			t.Fatalf("rewritten json lacks %s:\n%s", want, after)
		}
	}
	if getLUKS2JSON(dev, 16384) != after {
		t.Fatal("copies differ")
	}
	h = reopen(t, dev)
	if err := h.KillSlot(dev, 0); err != nil {
		t.Fatal(err)
	}
	after = getLUKS2JSON(dev, 0)
	if !strings.Contains(after, `"4":{"type":"systemd-tpm2","keyslots":[],"tpm2-pcrs":[7]`) || strings.Contains(after, "x-slot") ||
		!strings.Contains(after, `"keyslots":["1"],"segments":["0"]`) || !strings.Contains(after, `"x-vendor"`) {
		t.Fatalf("after KillSlot:\n%s", after)
	}
	var v any
	if err := json.Unmarshal([]byte(after), &v); err != nil {
		t.Fatal(err)
	}
}

func TestInfoJSON(t *testing.T) {
	_, h, _ := create(t, CreateOptions{})
	b, err := json.Marshal(h.Info())
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{
		`"cipher-alg":"aes-256"`, `"cipher-mode":"xts"`, `"ivgen-alg":"plain64"`, `"hash-alg":"sha256"`,
		`"payload-offset":2068480`, `"master-key-iters":1000`,
		`{"active":true,"iters":1000,"stripes":4000,"key-offset":4096,`,
		`{"active":false,"key-offset":262144,"keyslot":1}`,
	} {
		if !strings.Contains(s, want) {
			t.Fatalf("Info json lacks %s: %s", want, s)
		}
	}
	if strings.Contains(s, "ivgen-hash-alg") {
		t.Fatalf("ivgen-hash-alg reported for plain64: %s", s)
	}
}
