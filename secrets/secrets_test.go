package secrets

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"blockd/internal/keymem"
)

func ptr[T any](v T) *T { return &v }

// encrypt is libvirt's secret encryption: AES-256-CBC with PKCS#7 padding.
func encrypt(t *testing.T, key, iv, plaintext []byte) []byte {
	t.Helper()
	pad := aes.BlockSize - len(plaintext)%aes.BlockSize
	buf := append(bytes.Clone(plaintext), bytes.Repeat([]byte{byte(pad)}, pad)...)
	return encryptRaw(t, key, iv, buf)
}

// encryptRaw encrypts whole blocks without adding padding.
func encryptRaw(t *testing.T, key, iv, buf []byte) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(buf))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(out, buf)
	return out
}

var (
	masterKey = bytes.Repeat([]byte{0x5a}, 32)
	testIV    = []byte("0123456789abcdef")
	b64       = base64.StdEncoding.EncodeToString
)

// marker is a secret value that must never show up in an error.
const marker = "s3cr3t-M4RKER"

func TestAdd(t *testing.T) {
	dir := t.TempDir()
	file := func(name string, content []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rawFile := file("raw", []byte(marker+"\n"))
	b64File := file("b64", []byte(b64([]byte(marker))+"\n"))
	nulFile := file("nul", []byte("YQ==\x00"))
	crlfFile := file("crlf", []byte(b64([]byte(marker))+"\r\n"))
	keyFile := file("master-key.aes", masterKey)
	missing := filepath.Join(dir, "missing")

	ct := encrypt(t, masterKey, testIV, []byte(marker))
	// A ciphertext whose last plaintext byte, 200, is not valid padding.
	badPad := encryptRaw(t, masterKey, testIV, append([]byte(marker+"xx"), 200))
	// A last byte of 0 is accepted as no padding, as in QEMU.
	zeroPad := encryptRaw(t, masterKey, testIV, append([]byte(marker+"xx"), 0))

	tests := []struct {
		name string
		opts Options
		want string // the secret, when err is ""
		err  string
	}{
		{name: "raw data", opts: Options{ID: "s", Data: ptr(marker)}, want: marker},
		{name: "raw format", opts: Options{ID: "s", Data: ptr(marker), Format: "raw"}, want: marker},
		{name: "empty data", opts: Options{ID: "s", Data: ptr("")}, want: ""},
		{name: "utf-8 data", opts: Options{ID: "s", Data: ptr("pässwörd")}, want: "pässwörd"},
		{name: "nul in data", opts: Options{ID: "s", Data: ptr("a\x00b")}, want: "a\xc0\x80b"},
		{name: "base64 data", opts: Options{ID: "s", Data: ptr(b64([]byte(marker))), Format: "base64"}, want: marker},
		{name: "base64 newlines", opts: Options{ID: "s", Data: ptr("c2Vj\ncmV0\n"), Format: "base64"}, want: "secret"},
		{name: "base64 no padding", opts: Options{ID: "s", Data: ptr("YWJj"), Format: "base64"}, want: "abc"},
		{name: "base64 short group dropped", opts: Options{ID: "s", Data: ptr("YWJjYQ"), Format: "base64"}, want: "abc"},
		{name: "base64 padded", opts: Options{ID: "s", Data: ptr("YQ=="), Format: "base64"}, want: "a"},
		{name: "base64 padding mid-stream", opts: Options{ID: "s", Data: ptr("YQ==Yg=="), Format: "base64"}, want: "ab"},
		{name: "base64 empty", opts: Options{ID: "s", Data: ptr(""), Format: "base64"}, want: ""},
		{name: "base64 invalid", opts: Options{ID: "s", Data: ptr(marker), Format: "base64"}, err: "Base64 data contains invalid characters"},
		{name: "base64 space", opts: Options{ID: "s", Data: ptr("YQ== "), Format: "base64"}, err: "Base64 data contains invalid characters"},
		{name: "base64 url alphabet", opts: Options{ID: "s", Data: ptr("-_8="), Format: "base64"}, err: "Base64 data contains invalid characters"},
		{name: "raw file", opts: Options{ID: "s", File: ptr(rawFile)}, want: marker + "\n"},
		{name: "base64 file", opts: Options{ID: "s", File: ptr(b64File), Format: "base64"}, want: marker},
		{name: "base64 file nul", opts: Options{ID: "s", File: ptr(nulFile), Format: "base64"}, err: "Base64 data contains embedded NUL characters"},
		{name: "base64 file crlf", opts: Options{ID: "s", File: ptr(crlfFile), Format: "base64"}, err: "Base64 data contains invalid characters"},
		{name: "missing file", opts: Options{ID: "s", File: ptr(missing)},
			err: "Unable to read " + missing + ": Failed to open file “" + missing + "”: No such file or directory"},
		{name: "directory", opts: Options{ID: "s", File: ptr(dir)},
			err: "Unable to read " + dir + ": Error reading file “" + dir + "”: Is a directory"},
		{name: "not a directory", opts: Options{ID: "s", File: ptr(rawFile + "/x")},
			err: "Unable to read " + rawFile + "/x: Failed to open file “" + rawFile + "/x”: Not a directory"},
		{name: "invalid utf-8 file name", opts: Options{ID: "s", File: ptr(dir + "/\xff")},
			err: "Unable to read " + dir + "/\xff: Failed to open file “" + dir + "/\uFFFD”: No such file or directory"},
		{name: "both", opts: Options{ID: "s", Data: ptr(marker), File: ptr(rawFile)}, err: "'file' and 'data' are mutually exclusive"},
		{name: "both, file missing", opts: Options{ID: "s", Data: ptr(marker), File: ptr(missing)}, err: "'file' and 'data' are mutually exclusive"},
		{name: "neither", opts: Options{ID: "s"}, err: "Either 'file' or 'data' must be provided"},
		{name: "neither, with keyid", opts: Options{ID: "s", KeyID: "nokey"}, err: "Either 'file' or 'data' must be provided"},
		{name: "bad format", opts: Options{ID: "s", Data: ptr(marker), Format: "hex"}, err: "Parameter 'format' does not accept value 'hex'"},
		{name: "bad format before id", opts: Options{ID: "1", Format: "Base64"}, err: "Parameter 'format' does not accept value 'Base64'"},
		{name: "empty id", opts: Options{Data: ptr(marker)}, err: "Parameter 'id' expects an identifier"},
		{name: "numeric id", opts: Options{ID: "0sec", Data: ptr(marker)}, err: "Parameter 'id' expects an identifier"},
		{name: "id with slash", opts: Options{ID: "a/b", Data: ptr(marker)}, err: "Parameter 'id' expects an identifier"},
		{name: "id punctuation", opts: Options{ID: "a-b.c_9", Data: ptr(marker)}, want: marker},
		{name: "loaded", opts: Options{ID: "s", Data: ptr(marker), Loaded: ptr(false)}, err: "Property 'secret.loaded' is not writable"},
		{name: "duplicate first", opts: Options{ID: "master"}, err: "attempt to add duplicate property 'master' to object (type 'container')"},

		// Encrypted secrets.
		{name: "libvirt form", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "master", IV: b64(testIV)}, want: marker},
		{name: "raw ciphertext from file", opts: Options{ID: "s", File: ptr(file("ct", ct)), KeyID: "master", IV: b64(testIV)}, want: marker},
		{name: "base64 ciphertext from file", opts: Options{ID: "s", File: ptr(file("ct64", []byte(b64(ct)+"\n"))), Format: "base64", KeyID: "master", IV: b64(testIV)}, want: marker},
		{name: "no such key", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "nokey", IV: b64(testIV)}, err: "No secret with id 'nokey'"},
		{name: "self as key", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "s", IV: b64(testIV)}, err: "Secret with id 's' has no data"},
		{name: "short key", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "short", IV: b64(testIV)}, err: "Key should be 32 bytes in length"},
		{name: "no iv", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "master"}, err: "IV is required to decrypt secret"},
		{name: "key checked before iv", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "short"}, err: "Key should be 32 bytes in length"},
		{name: "bad iv", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "master", IV: "not base64!"}, err: "Base64 data contains invalid characters"},
		{name: "short iv", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "master", IV: b64(testIV[:12])}, err: "IV should be 16 bytes in length not 12"},
		{name: "long iv", opts: Options{ID: "s", Data: ptr(b64(ct)), Format: "base64", KeyID: "master", IV: b64(append(testIV, 1))}, err: "IV should be 16 bytes in length not 17"},
		{name: "iv checked before ciphertext", opts: Options{ID: "s", Data: ptr(marker), Format: "base64", KeyID: "master", IV: "AAAA"}, err: "IV should be 16 bytes in length not 3"},
		{name: "bad base64 ciphertext", opts: Options{ID: "s", Data: ptr(marker), Format: "base64", KeyID: "master", IV: b64(testIV)}, err: "Base64 data contains invalid characters"},
		{name: "partial block", opts: Options{ID: "s", Data: ptr(b64(append(bytes.Clone(ct), 1, 2, 3, 4))), Format: "base64", KeyID: "master", IV: b64(testIV)}, err: "Length 20 must be a multiple of block size 16"},
		{name: "raw partial block", opts: Options{ID: "s", Data: ptr(marker), KeyID: "master", IV: b64(testIV)}, err: fmt.Sprintf("Length %d must be a multiple of block size 16", len(marker))},
		{name: "bad padding", opts: Options{ID: "s", Data: ptr(b64(badPad)), Format: "base64", KeyID: "master", IV: b64(testIV)}, err: "Incorrect number of padding bytes (200) found on decrypted data"},
		{name: "zero padding", opts: Options{ID: "s", Data: ptr(b64(zeroPad)), Format: "base64", KeyID: "master", IV: b64(testIV)}, want: marker + "xx\x00"},
		{name: "empty ciphertext", opts: Options{ID: "s", Data: ptr(""), Format: "base64", KeyID: "master", IV: b64(testIV)}, want: ""},
		{name: "encrypted key", opts: Options{ID: "s", Data: ptr(b64(encrypt(t, masterKey, testIV, []byte("x")))), Format: "base64", KeyID: "chained", IV: b64(testIV)}, want: "x"},
		{name: "master key from file", opts: Options{ID: "s", File: ptr(keyFile)}, want: string(masterKey)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var s Store
			if err := s.Add(Options{ID: "master", Data: ptr(b64(masterKey)), Format: "base64"}); err != nil {
				t.Fatal(err)
			}
			if err := s.Add(Options{ID: "short", Data: ptr("0123456789")}); err != nil {
				t.Fatal(err)
			}
			// A key that is itself stored encrypted under master.
			if err := s.Add(Options{ID: "chained", Data: ptr(b64(encrypt(t, masterKey, testIV, masterKey))),
				Format: "base64", KeyID: "master", IV: b64(testIV)}); err != nil {
				t.Fatal(err)
			}
			err := s.Add(tt.opts)
			if tt.err != "" {
				if err == nil {
					t.Fatalf("no error, want %q", tt.err)
				}
				if err.Error() != tt.err {
					t.Fatalf("error %q, want %q", err, tt.err)
				}
				if strings.Contains(err.Error(), marker) {
					t.Fatalf("error %q contains the secret", err)
				}
				if tt.opts.ID != "master" && s.Has(tt.opts.ID) {
					t.Fatal("failed Add left a secret")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error %q", err)
			}
			got, err := s.Get(tt.opts.ID)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Fatalf("secret %q, want %q", got, tt.want)
			}
		})
	}
}

// TestLibvirt follows libvirt's sequence: a raw master key from a file, then
// a LUKS passphrase encrypted under it with a random IV.
func TestLibvirt(t *testing.T) {
	key := make([]byte, 32)
	iv := make([]byte, 16)
	rand.Read(key)
	rand.Read(iv)
	keyFile := filepath.Join(t.TempDir(), "master-key.aes")
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	var s Store
	if err := s.Add(Options{ID: "masterKey0", Format: "raw", File: ptr(keyFile)}); err != nil {
		t.Fatal(err)
	}
	for i, pass := range []string{"", "a", "exactly16bytes!!", "a longer passphrase, with commas, and ünïcödé"} {
		id := fmt.Sprintf("libvirt-%d-storage-secret0", i)
		ct := encrypt(t, key, iv, []byte(pass))
		err := s.Add(Options{ID: id, Data: ptr(b64(ct)), KeyID: "masterKey0", IV: b64(iv), Format: "base64"})
		if err != nil {
			t.Fatalf("%q: %v", pass, err)
		}
		got, err := s.GetUTF8(id)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != pass {
			t.Fatalf("got %q, want %q", got, pass)
		}
		clear(got)
	}
}

func TestGetDelete(t *testing.T) {
	var s Store
	if _, err := s.Get("x"); err == nil || err.Error() != "No secret with id 'x'" || !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get: %v", err)
	}
	if err := s.Delete("x"); err == nil || err.Error() != "object 'x' not found" || !errors.Is(err, ErrNotFound) {
		t.Fatalf("Delete: %v", err)
	}
	if s.Has("x") || len(s.IDs()) != 0 {
		t.Fatal("empty store has secrets")
	}

	data := "hunter2"
	if err := s.Add(Options{ID: "b", Data: &data}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(Options{ID: "a", Data: ptr("x")}); err != nil {
		t.Fatal(err)
	}
	err := s.Add(Options{ID: "b", Data: ptr("y")})
	if err == nil || err.Error() != "attempt to add duplicate property 'b' to object (type 'container')" || !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate Add: %v", err)
	}
	if got := s.IDs(); len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Fatalf("IDs = %q", got)
	}

	// Get hands out copies.
	got, _ := s.Get("b")
	clear(got)
	keymem.Free(got)
	again, _ := s.Get("b")
	if string(again) != "hunter2" {
		t.Fatalf("secret changed through a returned copy: %q", again)
	}
	keymem.Free(again)

	// Delete wipes the stored bytes (and unmaps them).
	s.mu.RLock()
	stored := s.secrets["b"]
	s.mu.RUnlock()
	if err := s.Delete("b"); err != nil {
		t.Fatal(err)
	}
	if b, mapped := readMem(t, stored); mapped && bytes.Contains(b, []byte("hunter2")) {
		t.Fatalf("stored bytes not wiped: %q", b)
	}
	if s.Has("b") {
		t.Fatal("deleted secret still present")
	}
	if _, err := s.Get("b"); err == nil || err.Error() != "No secret with id 'b'" {
		t.Fatalf("Get after Delete: %v", err)
	}
	// The id can be reused.
	if err := s.Add(Options{ID: "b", Data: ptr("new")}); err != nil {
		t.Fatal(err)
	}
}

func TestGetUTF8(t *testing.T) {
	var s Store
	for id, data := range map[string]string{"ok": "pässwörd", "empty": "", "bad": "\xff\xfe", "nul": "YQBi", "mutf8": "a\x00b", "surrogate": "\xed\xa0\x80"} {
		format := ""
		if id == "nul" {
			format = "base64" // "a\x00b"
		}
		if err := s.Add(Options{ID: id, Data: ptr(data), Format: Format(format)}); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct{ id, want, err string }{
		{id: "ok", want: "pässwörd"},
		{id: "empty", want: ""},
		{id: "bad", err: "Data from secret bad is not valid UTF-8"},
		{id: "nul", err: "Data from secret nul is not valid UTF-8"},
		{id: "mutf8", err: "Data from secret mutf8 is not valid UTF-8"},
		{id: "surrogate", err: "Data from secret surrogate is not valid UTF-8"},
		{id: "missing", err: "No secret with id 'missing'"},
	}
	for _, tt := range tests {
		got, err := s.GetUTF8(tt.id)
		if tt.err != "" {
			if err == nil || err.Error() != tt.err {
				t.Errorf("%s: %q, %v; want error %q", tt.id, got, err, tt.err)
			}
			continue
		}
		if err != nil || string(got) != tt.want {
			t.Errorf("%s: %q, %v; want %q", tt.id, got, err, tt.want)
		}
	}
}

func TestGBase64Decode(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"YQ==", "a"},
		{"YWI=", "ab"},
		{"YWJj", "abc"},
		{"YQ", ""},
		{"Y", ""},
		{"YWJjZA==", "abcd"},
		{"YW\nJj\n", "abc"},
		{"====", "\x00"},
		{"YQ=a", "a\x1a"},
		{"/+//", "\xff\xef\xff"},
	}
	for _, tt := range tests {
		if got := gBase64Decode([]byte(tt.in)); string(got) != tt.want {
			t.Errorf("gBase64Decode(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestConcurrent(t *testing.T) {
	var s Store
	if err := s.Add(Options{ID: "master", Data: ptr(b64(masterKey)), Format: "base64"}); err != nil {
		t.Fatal(err)
	}
	ct := b64(encrypt(t, masterKey, testIV, []byte(marker)))
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				id := fmt.Sprintf("s%d", i%10)
				switch (g + i) % 4 {
				case 0:
					err := s.Add(Options{ID: id, Data: ptr(ct), Format: "base64", KeyID: "master", IV: b64(testIV)})
					if err != nil && !errors.Is(err, ErrExists) {
						t.Error(err)
					}
				case 1:
					if b, err := s.Get(id); err == nil {
						if string(b) != marker {
							t.Errorf("got %q", b)
						}
						keymem.Free(b)
					}
				case 2:
					if err := s.Delete(id); err != nil && !errors.Is(err, ErrNotFound) {
						t.Error(err)
					}
				case 3:
					s.Has(id)
					s.IDs()
				}
			}
		}()
	}
	wg.Wait()
}
