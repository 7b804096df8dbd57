package luksfmt

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// TestHostileLUKS2JSON edits valid LUKS2 metadata (checksums recomputed)
// into things Open must refuse with a clear error and without large
// allocations or long computations.
func TestHostileLUKS2JSON(t *testing.T) {
	// 64 KiB metadata leaves room for large edits; a 1 MiB keyslots area
	// keeps the device small (each case copies it).
	base, _, _ := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFArgon2id), MetadataSize: 65536, KeyslotsSize: 1 << 20})
	pbBase, _, _ := create(t, CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2), KeyslotsSize: smallKeyslots(2)})
	tests := []struct {
		name   string
		pbkdf2 bool // start from the pbkdf2 header
		edit   func(string) string
		want   error
		msg    string
	}{
		{"argon2 memory above 4 GiB", false, repl(`"memory":32`, `"memory":5000000`), ErrUnsupported, "memory cost"},
		{"argon2 absurd time", false, repl(`"time":4`, `"time":4294967295`), ErrUnsupported, "exceeds the limit"},
		{"argon2 zero threads", false, repl(`"cpus":1`, `"cpus":0`), ErrCorrupt, "thread"},
		{"argon2 float memory", false, repl(`"memory":32`, `"memory":32.5`), ErrCorrupt, "memory"},
		{"argon2 extra kdf member", false, repl(`"cpus":1,`, `"cpus":1,"hash":"sha256",`), ErrCorrupt, "exactly"},
		{"pbkdf2 absurd iterations", true, repl(`"iterations":1000,"salt"`, `"iterations":4294967295,"salt"`), ErrUnsupported, "iteration"},
		{"pbkdf2 negative iterations", true, repl(`"iterations":1000,"salt"`, `"iterations":-1,"salt"`), ErrCorrupt, "iterations"},
		{"unknown kdf", true, repl(`"type":"pbkdf2","hash"`, `"type":"scrypt","hash"`), ErrUnsupported, "scrypt"},
		{"unknown af hash", false, repl(`"stripes":4000,"hash":"sha256"`, `"stripes":4000,"hash":"whirlpool"`), ErrUnsupported, "whirlpool"},
		{"af stripes", false, repl(`"stripes":4000`, `"stripes":2000`), ErrUnsupported, "stripes"},
		{"huge key size", false, repl(`"key_size":64,"af"`, `"key_size":100000,"af"`), ErrUnsupported, "key size"},
		{"area beyond keyslots area", false, repl(`"offset":"131072"`, `"offset":"99999998976"`), ErrCorrupt, "outside"},
		{"area size overflow", false, repl(`"size":"258048"`, `"size":"18446744073709551615"`), ErrCorrupt, "outside"},
		{"area size beyond uint64", false, repl(`"size":"258048"`, `"size":"184467440737095516150"`), ErrCorrupt, "range"},
		{"area too small", false, repl(`"size":"258048"`, `"size":"4096"`), ErrCorrupt, "smaller"},
		{"area in the header", false, repl(`"offset":"131072"`, `"offset":"65536"`), ErrCorrupt, "outside"},
		{"json_size mismatch", false, repl(`"json_size":"61440"`, `"json_size":"4190208"`), ErrCorrupt, "json_size"},
		{"keyslots_size huge", false, repl(`"keyslots_size":"1048576"`, `"keyslots_size":"999999995904"`), ErrCorrupt, "keyslots_size"},
		{"keyslots_size unaligned", false, repl(`"keyslots_size":"1048576"`, `"keyslots_size":"1052671"`), ErrCorrupt, "keyslots_size"},
		{"segment inside header", false, repl(`"offset":"16777216"`, `"offset":"4096"`), ErrCorrupt, "inside"},
		{"segment sector size", false, repl(`"sector_size":512`, `"sector_size":1000`), ErrCorrupt, "sector size"},
		{"segment size zero", false, repl(`"size":"dynamic"`, `"size":"0"`), ErrCorrupt, "size"},
		{"segment iv_tweak", false, repl(`"iv_tweak":"0"`, `"iv_tweak":"-1"`), ErrCorrupt, "iv_tweak"},
		{"segment integrity", false, repl(`"sector_size":512}`, `"sector_size":512,"integrity":{"type":"hmac(sha256)","journal_encryption":"none","journal_integrity":"none"}}`), ErrUnsupported, "integrity"},
		{"segment type", false, repl(`"type":"crypt"`, `"type":"linear"`), ErrUnsupported, "linear"},
		{"capi cipher", false, repl(`"encryption":"aes-xts-plain64","sector_size"`, `"encryption":"capi:xts(aes)-plain64","sector_size"`), ErrUnsupported, "capi"},
		{"two segments", false, func(s string) string {
			return strings.Replace(s, `"sector_size":512}}`, `"sector_size":512},"1":{"type":"crypt","offset":"33554432","iv_tweak":"0","size":"dynamic","encryption":"aes-xts-plain64","sector_size":512}}`, 1)
		}, ErrUnsupported, "segments"},
		{"reencrypt keyslot", false, repl(`{"type":"luks2","key_size"`, `{"type":"reencrypt","key_size"`), ErrUnsupported, "reencrypt"},
		{"unknown keyslot type", false, repl(`{"type":"luks2","key_size"`, `{"type":"luks3","key_size"`), ErrUnsupported, "luks3"},
		{"online reencrypt requirement", false, repl(`"config":{`, `"config":{"requirements":{"mandatory":["online-reencrypt-v2"]},`), ErrUnsupported, "online-reencrypt-v2"},
		{"requirements not an array", false, repl(`"config":{`, `"config":{"requirements":{"mandatory":"x"},`), ErrCorrupt, "mandatory"},
		{"duplicate member", false, repl(`"tokens":{}`, `"tokens":{},"tokens":{}`), ErrCorrupt, "duplicate"},
		{"digest references missing keyslot", false, repl(`"keyslots":["0"]`, `"keyslots":["0","7"]`), ErrCorrupt, "missing keyslot"},
		{"keyslot without digest", false, repl(`"keyslots":["0"]`, `"keyslots":[]`), ErrCorrupt, "digests"},
		{"token references missing keyslot", false, repl(`"tokens":{}`, `"tokens":{"0":{"type":"x","keyslots":["3"]}}`), ErrCorrupt, "token 0"},
		{"token without type", false, repl(`"tokens":{}`, `"tokens":{"0":{"keyslots":[]}}`), ErrCorrupt, "token 0"},
		{"non-canonical keyslot id", false, repl(`"keyslots":{"0":`, `"keyslots":{"00":`), ErrCorrupt, "keyslot id"},
		{"keyslot id out of range", false, repl(`"keyslots":{"0":`, `"keyslots":{"32":`), ErrCorrupt, "keyslot id"},
		{"digest salt", false, func(s string) string {
			i := strings.Index(s, `"digests"`)
			return s[:i] + strings.Replace(s[i:], `"salt":"`, `"salt":"AAAA`, 1)
		}, ErrCorrupt, "salt"},
		{"digest not base64", false, func(s string) string {
			i := strings.Index(s, `"digest":"`)
			return s[:i] + `"digest":"!!` + s[i+len(`"digest":"`):]
		}, ErrCorrupt, "base64"},
		{"missing config", false, repl(`"config":{`, `"configX":{`), ErrCorrupt, "config"},
		{"not an object", false, func(string) string { return `["keyslots"]` }, ErrCorrupt, "json"},
		{"truncated json", false, func(s string) string { return s[:len(s)/2] }, ErrCorrupt, "json"},
		{"leading space", false, func(s string) string { return " " + s }, ErrCorrupt, "'{'"},
		{"deep nesting", false, repl(`"tokens":{}`, `"tokens":{},"x":`+strings.Repeat("[", 11000)+strings.Repeat("]", 11000)), ErrCorrupt, "json"},
		{"unaligned area", false, repl(`"offset":"131072"`, `"offset":"32769"`), ErrCorrupt, "aligned"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := base
			if tc.pbkdf2 {
				src = pbBase
			}
			dev := src.snapshot()
			text := getLUKS2JSON(dev, 0)
			edited := tc.edit(text)
			if edited == text {
				t.Fatal("edit did not change the json")
			}
			setLUKS2JSON(t, dev, edited)
			_, err := Open(dev, dev.size())
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Open = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}
}

func repl(old, new string) func(string) string {
	return func(s string) string { return strings.Replace(s, old, new, 1) }
}

func TestHostileLUKS2Binary(t *testing.T) {
	base, _, _ := create(t, CreateOptions{Version: 2, KeyslotsSize: smallKeyslots(2)})
	tests := []struct {
		name string
		edit func(d *memDev)
		want error
	}{
		{"huge hdr_size in both copies", func(d *memDev) {
			binary.BigEndian.PutUint64(d.b[off2HdrSize:], 1<<40)
			binary.BigEndian.PutUint64(d.b[16384+off2HdrSize:], 1<<40)
		}, ErrCorrupt},
		{"hdr_offset mismatch in both copies", func(d *memDev) {
			binary.BigEndian.PutUint64(d.b[off2HdrOffset:], 512)
			binary.BigEndian.PutUint64(d.b[16384+off2HdrOffset:], 512)
		}, ErrCorrupt},
		{"unknown checksum algorithm in both copies", func(d *memDev) {
			copy(d.b[off2CsumAlg:], "md5\x00\x00\x00")
			copy(d.b[16384+off2CsumAlg:], "md5\x00\x00\x00")
		}, ErrCorrupt},
		{"version 3", func(d *memDev) {
			d.b[off2Version+1] = 3
			d.b[16384+off2Version+1] = 3
		}, ErrUnsupported},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev := base.snapshot()
			tc.edit(dev)
			if _, err := Open(dev, dev.size()); !errors.Is(err, tc.want) {
				t.Fatalf("Open = %v, want %v", err, tc.want)
			}
			if _, err := Open(dev, -1); !errors.Is(err, tc.want) {
				t.Fatalf("Open(unknown size) = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestHostileLUKS1 edits a valid phdr into headers Open must refuse.
func TestHostileLUKS1(t *testing.T) {
	base, _, _ := create(t, CreateOptions{})
	slot := func(i, field int) int { return offKeyblock + i*keyblockLen + field }
	put32 := func(off int, v uint32) func(d *memDev) {
		return func(d *memDev) { binary.BigEndian.PutUint32(d.b[off:], v) }
	}
	tests := []struct {
		name string
		edit func(d *memDev)
		size int64
		want error
		msg  string
	}{
		{"key size zero", put32(offKeyBytes, 0), 0, ErrCorrupt, "key size"},
		{"huge key size", put32(offKeyBytes, 1<<30), 0, ErrUnsupported, "key size"},
		{"stripes", put32(slot(3, 44), 1), 0, ErrCorrupt, "stripes"},
		{"keyslot over the header", put32(slot(0, 40), 1), 0, ErrCorrupt, "overlaps the header"},
		{"overlapping keyslots", put32(slot(1, 40), 9), 0, ErrCorrupt, "overlaps keyslot"},
		{"payload inside keyslots", put32(offPayloadOffset, 100), 0, ErrCorrupt, "payload"},
		{"keyslot beyond a huge device", put32(slot(7, 40), 0xfffffff0), 0, ErrCorrupt, "payload"},
		{"unsupported hash", func(d *memDev) { copy(d.b[offHashSpec:], "whirlpool\x00") }, 0, ErrUnsupported, "whirlpool"},
		{"digest iterations zero", put32(offMKDigestIter, 0), 0, ErrCorrupt, "iteration"},
		{"digest iterations absurd", put32(offMKDigestIter, 0xffffffff), 0, ErrUnsupported, "iteration"},
		{"keyslot iterations absurd", put32(slot(0, 4), 0xffffffff), 0, ErrUnsupported, "iteration"},
		{"device too small", func(*memDev) {}, 2000000, ErrCorrupt, "too small"},
		{"version 7", func(d *memDev) { d.b[7] = 7 }, 0, ErrUnsupported, "version 7"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev := base.snapshot()
			tc.edit(dev)
			size := tc.size
			if size == 0 {
				size = dev.size()
			}
			_, err := Open(dev, size)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Open = %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
		})
	}
}

// TestLUKS1InvalidSlotState: a keyslot whose state is neither enabled nor
// disabled is treated as cryptsetup does: not unlockable, not reusable.
func TestLUKS1InvalidSlotState(t *testing.T) {
	dev, _, key := create(t, CreateOptions{})
	binary.BigEndian.PutUint32(dev.b[offKeyblock+1*keyblockLen:], 0xcafe)
	h := reopen(t, dev)
	if got := h.ActiveSlots(); len(got) != 1 || got[0] != 0 {
		t.Fatalf("ActiveSlots = %v", got)
	}
	if _, err := h.AddKey(dev, key, 1, passB, fastKDF(KDFPBKDF2)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("AddKey into an invalid keyslot: %v", err)
	}
	if n, err := h.AddKey(dev, key, AnySlot, passB, fastKDF(KDFPBKDF2)); err != nil || n != 2 {
		t.Fatalf("AddKey: %d %v", n, err)
	}
}
