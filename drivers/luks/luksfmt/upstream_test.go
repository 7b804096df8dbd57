package luksfmt

import (
	"bytes"
	"context"
	"crypto/sha1" //nolint:gosec // the upstream test states a sha1 checksum
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
)

// Tests against cryptsetup's upstream test images (read SOURCE.md in the
// upstream directory for what each one is). They are decompressed into a
// temporary directory at test time.

func TestUpstreamLUKS1Compat(t *testing.T) {
	tests := []struct {
		file       string
		pass       string
		sum        func([]byte) []byte
		want       string
		mode       string
		hash       string
		payloadOff int64
		keyOffset0 int64
	}{
		{
			file: "compatimage.img.xz", pass: "compatkey",
			sum:  func(b []byte) []byte { s := sha256.Sum256(b); return s[:] },
			want: "7428e8f2436882a07eb32765086f5c899474c08b5576f556b573d2aabdf923e8",
			mode: "cbc-essiv:sha256", hash: "sha256", payloadOff: 1032 * 512, keyOffset0: 8 * 512,
		},
		{
			// cryptsetup 1.0 layout: keyslots not aligned to 4096 bytes.
			file: "compatv10image.img.xz", pass: "compatkey",
			sum:  func(b []byte) []byte { s := sha1.Sum(b); return s[:] },
			want: "51b48c2471a7593ceaf14dc5e66bca86ed05f6cc",
			mode: "cbc-plain", hash: "sha1", payloadOff: 1010 * 512, keyOffset0: 2 * 512,
		},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			path := xzFile(t, tc.file)
			h := openFile(t, path)
			in := h.Info()
			if h.Version() != 1 || in.CipherAlg != "aes-128" || h.CipherSpec().Mode != tc.mode || in.HashAlg != tc.hash ||
				h.PayloadOffset() != tc.payloadOff || in.Slots[0].KeyOffset != tc.keyOffset0 || !in.Slots[0].Active || in.Slots[1].Active {
				t.Fatalf("unexpected header: %+v", in)
			}
			if _, _, err := h.Unlock(context.Background(), []byte("wrong"), AnySlot, KDFLimits{}); !errors.Is(err, ErrWrongPassphrase) || err.Error() != "Invalid password, cannot unlock any keyslot" {
				t.Fatalf("wrong passphrase: %v", err)
			}
			if _, _, err := h.Unlock(context.Background(), []byte(tc.pass), 1, KDFLimits{}); !errors.Is(err, ErrSlotInactive) {
				t.Fatalf("inactive slot: %v", err)
			}
			key, slot, err := h.Unlock(context.Background(), []byte(tc.pass), AnySlot, KDFLimits{})
			if err != nil || slot != 0 {
				t.Fatalf("Unlock: slot %d, %v", slot, err)
			}
			defer Wipe(key)
			pt := decryptPayload(t, h, key, path)
			if got := hex.EncodeToString(tc.sum(pt)); got != tc.want {
				t.Fatalf("plaintext checksum %s, want %s", got, tc.want)
			}
		})
	}
}

func TestUpstreamLUKS2Compat(t *testing.T) {
	path := xzFile(t, "compatimage2.img.xz")
	h := openFile(t, path)
	if h.Version() != 2 || h.PayloadOffset() != 4194304 || h.SectorSize() != 512 || h.KeySize() != 16 ||
		h.UUID() != "28632274-8c8a-493f-835b-da802e1c576b" || h.HeaderSize() != 4194304 {
		t.Fatalf("unexpected header: %+v", h.Info())
	}
	if err := h.Damage(); err != nil {
		t.Fatalf("Damage: %v", err)
	}
	in := h.Info()
	if len(in.Slots) != 2 || in.Slots[0].KDF != KDFPBKDF2 || in.Slots[1].KDF != KDFArgon2id || in.Slots[1].MemoryKiB != 65536 ||
		in.CipherAlg != "aes-128" || in.CipherMode != "cbc" || in.IVGenAlg != "essiv" || in.IVGenHashAlg != "sha256" {
		t.Fatalf("unexpected info: %+v", in)
	}
	var keys [][]byte
	for _, tc := range []struct {
		pass string
		slot int
	}{{"compatkey", 0}, {"0123456789abcdef", 1}} {
		key, slot, err := h.Unlock(context.Background(), []byte(tc.pass), AnySlot, KDFLimits{})
		if err != nil || slot != tc.slot {
			t.Fatalf("Unlock(%q): slot %d, %v", tc.pass, slot, err)
		}
		keys = append(keys, key)
	}
	if !bytes.Equal(keys[0], keys[1]) {
		t.Fatal("keyslots 0 and 1 give different volume keys")
	}
	if _, _, err := h.Unlock(context.Background(), []byte("compatkey"), 1, KDFLimits{}); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("keyslot 1 with keyslot 0's passphrase: %v", err)
	}
	if err := h.VerifyKey(keys[0]); err != nil {
		t.Fatal(err)
	}
	if pt := decryptPayload(t, h, keys[0], path); len(pt) != 512 {
		t.Fatalf("payload is %d bytes, want one sector", len(pt))
	}
}

// TestUpstreamLUKS1Images opens cryptsetup's LUKS1 image collection: images
// whose cipher and hash are supported unlock with the key file and contain
// a FAT file system with volume id DEAD-BABE; the others are refused with
// ErrUnsupported, at Open (whirlpool hash) or at Unlock (cipher).
func TestUpstreamLUKS1Images(t *testing.T) {
	files := xzTar(t, "luks1-images.tar.xz")
	pass, err := os.ReadFile(files["keyfile1"])
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for name, path := range files {
		if !strings.HasSuffix(name, ".img") {
			continue
		}
		n++
		t.Run(name, func(t *testing.T) {
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			h, err := Open(f, st.Size())
			if strings.Contains(name, "whirlpool") || strings.Contains(name, "wp256") {
				if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "whirlpool") {
					t.Fatalf("Open: %v, want ErrUnsupported for whirlpool", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			key, _, err := h.Unlock(context.Background(), pass, AnySlot, KDFLimits{})
			if !strings.HasPrefix(name, "luks1_aes-") || strings.Contains(name, "lrw") {
				if !errors.Is(err, ErrUnsupported) {
					t.Fatalf("Unlock: %v, want ErrUnsupported", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer Wipe(key)
			pt := decryptPayload(t, h, key, path)
			if !bytes.Equal(pt[510:512], []byte{0x55, 0xaa}) {
				t.Fatal("no boot sector signature in the plaintext")
			}
			id := []byte{0xbe, 0xba, 0xad, 0xde}
			if !bytes.Equal(pt[0x27:0x2b], id) && !bytes.Equal(pt[0x43:0x47], id) {
				t.Fatalf("FAT volume id is not DEAD-BABE: % x / % x", pt[0x27:0x2b], pt[0x43:0x47])
			}
		})
	}
	if n != 12 {
		t.Fatalf("found %d images, want 12", n)
	}
}

// TestUpstreamLUKS2MetadataSizes opens LUKS2 headers with every metadata
// size from 16 KiB to 4 MiB; they all hold the same volume key.
func TestUpstreamLUKS2MetadataSizes(t *testing.T) {
	files := xzTar(t, "luks2_mda_images.tar.xz")
	var first []byte
	for _, kib := range []int{16, 32, 64, 128, 256, 512, 1024, 2048, 4096} {
		name := "test_image_" + strconv.Itoa(kib)
		t.Run(name, func(t *testing.T) {
			h := openFile(t, files[name])
			in := h.Info()
			if h.Version() != 2 || h.PayloadOffset() != 12582912 || len(in.Slots) != 1 || in.Slots[0].KeyOffset != 8388608 {
				t.Fatalf("unexpected header: %+v", in)
			}
			if h.HeaderSize() != 12550144 {
				t.Fatalf("header size %d, want 12550144", h.HeaderSize())
			}
			key, _, err := h.Unlock(context.Background(), []byte("Qx3qn46vq0v"), AnySlot, KDFLimits{})
			if err != nil {
				t.Fatal(err)
			}
			defer Wipe(key)
			if first == nil {
				first = bytes.Clone(key)
			} else if !bytes.Equal(first, key) {
				t.Fatal("volume key differs from the 16 KiB image's")
			}
		})
	}
}

// TestUpstreamLUKS2Requirements: a header with unknown mandatory
// requirements is refused, naming them; the same header without them
// unlocks, and its tokens survive a rewrite.
func TestUpstreamLUKS2Requirements(t *testing.T) {
	files := xzTar(t, "luks2_header_requirements.tar.xz")
	f, err := os.Open(files["luks2_header_requirements"])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = Open(f, 4194304)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), `"req0", "req1"`) {
		t.Fatalf("Open: %v, want ErrUnsupported naming req0 and req1", err)
	}

	path := files["luks2_header_requirements_free"]
	h, w := openRW(t, path)
	key, slot, err := h.Unlock(context.Background(), []byte("blablabl"), AnySlot, KDFLimits{})
	if err != nil || slot != 0 {
		t.Fatalf("Unlock: %d %v", slot, err)
	}
	defer Wipe(key)
	before := tokensJSON(t, h)
	if !strings.Contains(before, `"luks2-keyring"`) || !strings.Contains(before, `"user_type"`) {
		t.Fatalf("tokens not found: %s", before)
	}
	n, err := h.AddKey(w, key, AnySlot, []byte("second"), fastKDF(KDFPBKDF2))
	if err != nil || n != 1 {
		t.Fatalf("AddKey: %d %v", n, err)
	}
	h2 := openFile(t, path)
	if got := tokensJSON(t, h2); got != before {
		t.Fatalf("tokens changed:\n%s\n%s", before, got)
	}
	if _, s, err := h2.Unlock(context.Background(), []byte("second"), AnySlot, KDFLimits{}); err != nil || s != 1 {
		t.Fatalf("Unlock new key: %d %v", s, err)
	}
	// Killing keyslot 0 removes it from the tokens that reference it.
	if err := h2.KillSlot(w, 0); err != nil {
		t.Fatal(err)
	}
	h3 := openFile(t, path)
	want := `{"0":{"type":"user_type","keyslots":[]},"1":{"type":"luks2-keyring","key_description":"cs_token_test:test_key0","keyslots":[]},"6":{"type":"luks2-reserved","keyslots":[]}}`
	if got := tokensJSON(t, h3); got != want {
		t.Fatalf("tokens after KillSlot:\n%s\nwant\n%s", got, want)
	}
}

func tokensJSON(t testing.TB, h *Header) string {
	t.Helper()
	h.mu.RLock()
	defer h.mu.RUnlock()
	return string(h.v2.meta.tokens.marshal())
}
