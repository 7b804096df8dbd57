package luksfmt

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"
)

// Cross-checks with the real cryptsetup (2.6). No dm-crypt is needed: only
// luksFormat, luksDump, open --test-passphrase, luksAddKey, luksKillSlot,
// token import/export, convert and offline reencrypt are used. The tests
// skip when cryptsetup is missing, except with CI=true.

func cryptsetup(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cs := requireTool(t, "cryptsetup")
	out, err := exec.Command(cs, args...).CombinedOutput()
	return string(out), err
}

func mustCryptsetup(t testing.TB, args ...string) string {
	t.Helper()
	out, err := cryptsetup(t, args...)
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// csDump runs luksDump with debug output and fails if cryptsetup had to
// recover a header copy (which it does silently on writable files).
func csDump(t testing.TB, hdr string) string {
	t.Helper()
	out := mustCryptsetup(t, "luksDump", "--debug", hdr)
	for _, bad := range []string{"requires recovery", "checksum error", "validation failed", "Repairing"} {
		if strings.Contains(out, bad) {
			t.Fatalf("cryptsetup luksDump of %s reports %q:\n%s", filepath.Base(hdr), bad, out)
		}
	}
	return out
}

// csVolumeKey returns the volume key as cryptsetup decrypts it.
func csVolumeKey(t testing.TB, hdr, passFile string) []byte {
	t.Helper()
	vk := filepath.Join(t.TempDir(), "vk")
	mustCryptsetup(t, "luksDump", "-q", "--dump-volume-key", "--volume-key-file", vk, "--key-file", passFile, hdr)
	b, err := os.ReadFile(vk)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// csTestPass runs open --test-passphrase; slot < 0 means any keyslot.
func csTestPass(t testing.TB, hdr, data, passFile string, slot int) error {
	t.Helper()
	args := []string{"open", "--test-passphrase", "--key-file", passFile}
	if hdr != data {
		args = append(args, "--header", hdr)
	}
	if slot >= 0 {
		args = append(args, "--key-slot", strconv.Itoa(slot))
	}
	out, err := cryptsetup(t, append(args, data)...)
	if err != nil {
		return errors.New(strings.TrimSpace(out))
	}
	return nil
}

func openRWFile(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestPeerCryptsetupOpensOurs: headers made by Create pass cryptsetup's
// luksDump (without recovery) and open --test-passphrase, and cryptsetup
// finds the same volume key.
func TestPeerCryptsetupOpensOurs(t *testing.T) {
	requireTool(t, "cryptsetup")
	tests := []struct {
		name string
		opts CreateOptions
	}{
		{"luks1 qemu default", CreateOptions{}},
		{"luks1 detached", CreateOptions{Detached: true}},
		{"luks1 aes-128 cbc-essiv sha1", CreateOptions{Mode: "cbc-essiv:sha256", KeySize: 16, Hash: "sha1"}},
		{"luks1 aes-256 cbc-plain64 sha512", CreateOptions{Mode: "cbc-plain64", Hash: "sha512"}},
		{"luks2 argon2id", CreateOptions{Version: 2}},
		{"luks2 argon2i", CreateOptions{Version: 2, KDF: fastKDF(KDFArgon2i), Label: "blockd", Subsystem: "test"}},
		{"luks2 pbkdf2 sha512", CreateOptions{Version: 2, KDF: fastKDF(KDFPBKDF2), Hash: "sha512"}},
		{"luks2 detached 4096", CreateOptions{Version: 2, Detached: true, SectorSize: 4096}},
		{"luks2 64k metadata", CreateOptions{Version: 2, MetadataSize: 65536, PayloadOffset: 4 << 20}},
		{"luks2 cbc-essiv 128", CreateOptions{Version: 2, Mode: "cbc-essiv:sha256", KeySize: 16, KDF: fastKDF(KDFPBKDF2)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pw := writeFile(t, dir, "pw", passA)
			bad := writeFile(t, dir, "bad", passB)
			hdr := filepath.Join(dir, "hdr.img")
			data := hdr
			if tc.opts.Detached {
				data = filepath.Join(dir, "data.img")
				if err := os.WriteFile(data, make([]byte, 1<<20), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			f := openRWFile(t, hdr)
			tc.opts.Passphrase = passA
			if tc.opts.KDF == (KDF{}) {
				tc.opts.KDF = fastKDF(map[bool]string{true: KDFArgon2id, false: KDFPBKDF2}[tc.opts.Version == 2])
			}
			h, key, err := Create(f, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.opts.Detached {
				if err := f.Truncate(h.PayloadOffset() + 1<<20); err != nil {
					t.Fatal(err)
				}
			}
			dump := csDump(t, hdr)
			if !strings.Contains(dump, h.UUID()) || !strings.Contains(dump, "Version:       \t"+strconv.Itoa(h.Version())) {
				t.Fatalf("luksDump:\n%s", dump)
			}
			if err := csTestPass(t, hdr, data, pw, -1); err != nil {
				t.Fatalf("cryptsetup open --test-passphrase: %v", err)
			}
			if err := csTestPass(t, hdr, data, bad, -1); err == nil {
				t.Fatal("cryptsetup accepted a wrong passphrase")
			}
			if got := csVolumeKey(t, hdr, pw); !bytes.Equal(got, key) {
				t.Fatal("cryptsetup found a different volume key")
			}
			if h.Version() == 2 {
				var meta map[string]any
				if err := json.Unmarshal([]byte(mustCryptsetup(t, "luksDump", "--dump-json-metadata", hdr)), &meta); err != nil {
					t.Fatal(err)
				}
				if _, ok := meta["keyslots"].(map[string]any)["0"]; !ok {
					t.Fatalf("cryptsetup json metadata lacks keyslot 0: %v", meta)
				}
			}
		})
	}
}

var (
	reSector = regexp.MustCompile(`sector: (\d+) \[bytes\]`)
	reOffset = regexp.MustCompile(`offset: (\d+) \[bytes\]`)
	rePayOff = regexp.MustCompile(`Payload offset:\s+(\d+)`)
)

// TestPeerWeOpenCryptsetups: headers made by cryptsetup luksFormat open and
// unlock here to the volume key cryptsetup reports.
func TestPeerWeOpenCryptsetups(t *testing.T) {
	requireTool(t, "cryptsetup")
	fast2 := []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}
	tests := []struct {
		name     string
		detached bool
		args     []string
	}{
		{"luks1 xts sha256", false, []string{"--type", "luks1", "--pbkdf-force-iterations", "1000"}},
		{"luks1 cbc-essiv 256 sha1", false, []string{"--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha1", "--pbkdf-force-iterations", "1000"}},
		{"luks1 detached", true, []string{"--type", "luks1", "--pbkdf-force-iterations", "1000"}},
		{"luks2 pbkdf2", false, append([]string{"--type", "luks2"}, fast2...)},
		// Forced argon2 costs (cryptsetup's minimum): no benchmark in
		// cryptsetup, and unlocking stays cheap under the race detector.
		{"luks2 argon2id", false, []string{"--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-parallel", "1", "--pbkdf-force-iterations", "4"}},
		{"luks2 argon2i", false, []string{"--type", "luks2", "--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-parallel", "1", "--pbkdf-force-iterations", "4"}},
		{"luks2 detached 4096", true, append([]string{"--type", "luks2", "--sector-size", "4096"}, fast2...)},
		{"luks2 detached 512", true, append([]string{"--type", "luks2", "--sector-size", "512"}, fast2...)},
		{"luks2 cbc-plain64 128", false, append([]string{"--type", "luks2", "--cipher", "aes-cbc-plain64", "--key-size", "128"}, fast2...)},
		{"luks2 xts-plain 256 sha512", false, append([]string{"--type", "luks2", "--cipher", "aes-xts-plain", "--key-size", "256", "--hash", "sha512"}, fast2...)},
		{"luks2 64k metadata 1m keyslots", false, append([]string{"--type", "luks2", "--luks2-metadata-size", "64k", "--luks2-keyslots-size", "1m"}, fast2...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pw := writeFile(t, dir, "pw", passC)
			data := writeFile(t, dir, "data.img", make([]byte, 20<<20))
			hdr := data
			args := []string{"luksFormat", "-q", "--key-file", pw}
			if tc.detached {
				hdr = filepath.Join(dir, "hdr.img")
				args = append(args, "--header", hdr)
				if err := os.Truncate(data, 4<<20); err != nil {
					t.Fatal(err)
				}
			}
			mustCryptsetup(t, append(append(args, tc.args...), data)...)
			dump := csDump(t, hdr)
			want := csVolumeKey(t, hdr, pw)

			h := openFile(t, hdr)
			key, slot, err := h.Unlock(context.Background(), passC, AnySlot, KDFLimits{})
			if err != nil || slot != 0 {
				t.Fatalf("Unlock: %d %v", slot, err)
			}
			if !bytes.Equal(key, want) {
				t.Fatal("volume key differs from cryptsetup's")
			}
			mustFail(t, h, passA)
			if h.Version() == 2 {
				if m := reSector.FindStringSubmatch(dump); m == nil || m[1] != strconv.Itoa(h.SectorSize()) {
					t.Fatalf("sector size %d, luksDump says %v", h.SectorSize(), m)
				}
				if m := reOffset.FindStringSubmatch(dump); m == nil || m[1] != strconv.FormatInt(h.PayloadOffset(), 10) {
					t.Fatalf("payload offset %d, luksDump says %v", h.PayloadOffset(), m)
				}
			} else if m := rePayOff.FindStringSubmatch(dump); m == nil || m[1] != strconv.FormatInt(h.PayloadOffset()/512, 10) {
				t.Fatalf("payload offset %d, luksDump says %v", h.PayloadOffset(), m)
			}
			if tc.detached && h.PayloadOffset() != 0 {
				t.Fatalf("detached header with payload offset %d", h.PayloadOffset())
			}
		})
	}
}

// TestPeerKeyslotInterop: keyslots added and removed here and by cryptsetup
// are seen by the other side.
func TestPeerKeyslotInterop(t *testing.T) {
	requireTool(t, "cryptsetup")
	for _, tc := range []struct {
		name     string
		opts     CreateOptions
		detached bool
	}{
		{"luks1", CreateOptions{}, false},
		{"luks2", CreateOptions{Version: 2}, false},
		{"luks2 detached", CreateOptions{Version: 2, Detached: true, SectorSize: 4096}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pw := map[string]string{}
			for n, p := range map[string][]byte{"A": passA, "B": passB, "C": passC, "D": passD} {
				pw[n] = writeFile(t, dir, n, p)
			}
			hdr := filepath.Join(dir, "hdr.img")
			data := hdr
			if tc.detached {
				data = writeFile(t, dir, "data.img", make([]byte, 1<<20))
			}
			f := openRWFile(t, hdr)
			tc.opts.Passphrase = passA
			tc.opts.KDF = fastKDF(map[bool]string{true: KDFArgon2id, false: KDFPBKDF2}[tc.opts.Version == 2])
			h, key, err := Create(f, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.detached {
				if err := f.Truncate(h.PayloadOffset() + 1<<20); err != nil {
					t.Fatal(err)
				}
			}
			hdrArgs := func(args ...string) []string {
				if tc.detached {
					args = append(args, "--header", hdr)
				}
				return args
			}

			// cryptsetup adds B in keyslot 3; we see it.
			mustCryptsetup(t, append(hdrArgs("luksAddKey", "-q", "--key-file", pw["A"], "--key-slot", "3", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"), data, pw["B"])...)
			h, f = reopenFile(t, hdr)
			mustUnlock(t, h, passB, 3, key)

			// We add C; cryptsetup opens it in that keyslot.
			kdf := fastKDF(KDFPBKDF2)
			if tc.opts.Version == 2 {
				kdf = fastKDF(KDFArgon2i)
			}
			slotC, err := h.AddKey(f, key, AnySlot, passC, kdf)
			if err != nil || slotC != 1 {
				t.Fatalf("AddKey: %d %v", slotC, err)
			}
			csDump(t, hdr)
			if err := csTestPass(t, hdr, data, pw["C"], slotC); err != nil {
				t.Fatalf("cryptsetup with our new keyslot: %v", err)
			}

			// cryptsetup kills keyslot 3; B no longer opens here.
			mustCryptsetup(t, append(hdrArgs("luksKillSlot", "-q", "--key-file", pw["A"]), data, "3")...)
			h, f = reopenFile(t, hdr)
			mustFail(t, h, passB)
			if got := h.ActiveSlots(); !reflect.DeepEqual(got, []int{0, slotC}) {
				t.Fatalf("ActiveSlots = %v", got)
			}

			// We kill C; cryptsetup no longer opens it.
			if err := h.KillSlot(f, slotC); err != nil {
				t.Fatal(err)
			}
			csDump(t, hdr)
			if err := csTestPass(t, hdr, data, pw["C"], -1); err == nil {
				t.Fatal("cryptsetup still opens a killed keyslot")
			}

			// We change A to D; cryptsetup agrees.
			if _, err := h.ChangeKey(f, passA, passD, kdf); err != nil {
				t.Fatal(err)
			}
			csDump(t, hdr)
			if err := csTestPass(t, hdr, data, pw["D"], -1); err != nil {
				t.Fatalf("cryptsetup with the changed passphrase: %v", err)
			}
			if err := csTestPass(t, hdr, data, pw["A"], -1); err == nil {
				t.Fatal("cryptsetup still opens the old passphrase")
			}
			if got := csVolumeKey(t, hdr, pw["D"]); !bytes.Equal(got, key) {
				t.Fatal("volume key changed")
			}
		})
	}
}

func reopenFile(t testing.TB, path string) (*Header, *os.File) {
	t.Helper()
	return openRW(t, path)
}

// TestPeerTokensSurvive: a token imported with cryptsetup survives our
// keyslot updates byte for byte (as exported by cryptsetup), losing only
// the reference to a keyslot we remove.
func TestPeerTokensSurvive(t *testing.T) {
	requireTool(t, "cryptsetup")
	dir := t.TempDir()
	pw := writeFile(t, dir, "pw", passA)
	img := writeFile(t, dir, "img", make([]byte, 20<<20))
	mustCryptsetup(t, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw, img)
	tok := `{"type":"blockd-test","keyslots":["0"],"opaque":{"list":[1,2.5,-3e7],"s":"<&>é\"\\"},"num":12345678901234,"null":null}`
	tokFile := writeFile(t, dir, "tok.json", []byte(tok))
	mustCryptsetup(t, "token", "import", "--json-file", tokFile, "--token-id", "5", img)
	before := strings.TrimSpace(mustCryptsetup(t, "token", "export", "--token-id", "5", img))

	h, f := openRW(t, img)
	key, _, err := h.Unlock(context.Background(), passA, AnySlot, KDFLimits{})
	if err != nil {
		t.Fatal(err)
	}
	defer Wipe(key)
	if _, err := h.AddKey(f, key, AnySlot, passB, fastKDF(KDFArgon2id)); err != nil {
		t.Fatal(err)
	}
	csDump(t, img)
	if got := strings.TrimSpace(mustCryptsetup(t, "token", "export", "--token-id", "5", img)); got != before {
		t.Fatalf("token changed:\n%s\n%s", before, got)
	}
	if err := h.KillSlot(f, 0); err != nil {
		t.Fatal(err)
	}
	csDump(t, img)
	got := strings.TrimSpace(mustCryptsetup(t, "token", "export", "--token-id", "5", img))
	if want := strings.Replace(before, `"keyslots":["0"]`, `"keyslots":[]`, 1); got != want {
		t.Fatalf("token after KillSlot:\n%s\nwant\n%s", got, want)
	}
}

// TestPeerPayload: data encrypted by cryptsetup's offline reencryption
// decrypts with the key, offset, sector size and IV rule the header gives,
// checked with an independent XTS implementation (golang.org/x/crypto/xts)
// and with the project's sector cipher.
func TestPeerPayload(t *testing.T) {
	requireTool(t, "cryptsetup")
	plain := make([]byte, 4<<20)
	rand.Read(plain)
	for _, tc := range []struct {
		name     string
		detached bool
		args     []string
	}{
		{"detached 4096", true, []string{"--sector-size", "4096"}},
		{"detached 512", true, []string{"--sector-size", "512"}},
		{"embedded", false, []string{"--reduce-device-size", "2m"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			pw := writeFile(t, dir, "pw", passA)
			img := plain
			if !tc.detached {
				img = append(bytes.Clone(plain), make([]byte, 2<<20)...)
			}
			data := writeFile(t, dir, "data.img", img)
			hdr := data
			args := []string{"reencrypt", "-q", "--encrypt", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw}
			if tc.detached {
				hdr = filepath.Join(dir, "hdr.img")
				args = append(args, "--header", hdr)
			}
			mustCryptsetup(t, append(append(args, tc.args...), data)...)
			h := openFile(t, hdr)
			key, _, err := h.Unlock(context.Background(), passA, AnySlot, KDFLimits{})
			if err != nil {
				t.Fatal(err)
			}
			defer Wipe(key)
			ct, err := os.ReadFile(data)
			if err != nil {
				t.Fatal(err)
			}
			ct = ct[h.PayloadOffset() : h.PayloadOffset()+int64(len(plain))]
			x, err := xts.NewCipher(aes.NewCipher, key)
			if err != nil {
				t.Fatal(err)
			}
			ss := h.SectorSize()
			got := make([]byte, len(ct))
			for off := 0; off < len(ct); off += ss {
				x.Decrypt(got[off:off+ss], ct[off:off+ss], uint64(off/512)+h.IVTweak())
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("independent xts decryption (sector %d, payload offset %d) does not give the plaintext", ss, h.PayloadOffset())
			}
			if pt := decryptPayload(t, h, key, data); !bytes.Equal(pt[:len(plain)], plain) {
				t.Fatal("decryption with the project's sector cipher does not give the plaintext")
			}
		})
	}
}

// TestPeerRepair: copies rewritten by Repair pass cryptsetup's checks.
func TestPeerRepair(t *testing.T) {
	requireTool(t, "cryptsetup")
	for _, damaged := range []int64{4096 + 10, 16384 + 10} {
		dir := t.TempDir()
		pw := writeFile(t, dir, "pw", passA)
		hdr := filepath.Join(dir, "hdr.img")
		f := openRWFile(t, hdr)
		_, key, err := Create(f, CreateOptions{Version: 2, Detached: true, Passphrase: passA, KDF: fastKDF(KDFPBKDF2)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{'X'}, damaged); err != nil {
			t.Fatal(err)
		}
		h, f := openRW(t, hdr)
		if err := h.Damage(); err == nil {
			t.Fatal("damage not reported")
		}
		if err := h.Repair(f); err != nil {
			t.Fatal(err)
		}
		csDump(t, hdr)
		if got := csVolumeKey(t, hdr, pw); !bytes.Equal(got, key) {
			t.Fatal("volume key differs after repair")
		}
	}
}

// TestPeerConvert: cryptsetup converts our LUKS1 header to LUKS2 and back;
// both results open here with the same key.
func TestPeerConvert(t *testing.T) {
	requireTool(t, "cryptsetup")
	dir := t.TempDir()
	hdr := filepath.Join(dir, "hdr.img")
	f := openRWFile(t, hdr)
	h, key, err := Create(f, CreateOptions{Passphrase: passA, KDF: fastKDF(KDFPBKDF2), Detached: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddKey(f, key, 4, passB, fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	mustCryptsetup(t, "convert", "-q", "--type", "luks2", hdr)
	h2 := openFile(t, hdr)
	if h2.Version() != 2 || h2.PayloadOffset() != 0 {
		t.Fatalf("converted header: version %d, payload %d", h2.Version(), h2.PayloadOffset())
	}
	mustUnlock(t, h2, passA, 0, key)
	mustUnlock(t, h2, passB, 4, key)
	mustCryptsetup(t, "convert", "-q", "--type", "luks1", hdr)
	h1 := openFile(t, hdr)
	if h1.Version() != 1 {
		t.Fatal("not converted back to luks1")
	}
	mustUnlock(t, h1, passB, 4, key)
}
