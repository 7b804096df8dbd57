// Package secrets holds QEMU "secret" objects: named byte strings, such as
// LUKS passphrases, that other objects refer to by id.
//
// Semantics and error texts follow QEMU 7.2 (crypto/secret_common.c,
// crypto/secret.c): the data comes from exactly one of data or file, may be
// base64-encoded, and may be AES-256-CBC encrypted with another secret as
// the key (libvirt's form). Everything is decoded and decrypted when the
// secret is added.
//
// Secret bytes never appear in errors. The store keeps its own copies in
// internal/keymem memory (outside the Go heap, locked in RAM, left out of
// core dumps), hands out copies in key memory that the caller releases with
// keymem.Free (luksfmt.Wipe does the same) when done, and wipes and unmaps
// its copy when a secret is deleted, or when the Store itself is garbage
// collected.
package secrets

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"

	"blockd/internal/keymem"
)

// Options are the QMP properties of a "secret" object (SecretProperties).
type Options struct {
	// ID is the object id; it must be an identifier (a letter, then
	// letters, digits, '-', '.', '_').
	ID string `json:"id"`
	// Data is the secret itself; exactly one of Data and File is set.
	Data *string `json:"data,omitempty"`
	// File names a file holding the secret; it is read whole. It must be
	// a regular file or a FIFO of at most MaxFileSize bytes.
	File *string `json:"file,omitempty"`
	// Format is FormatRaw (the default when empty) or FormatBase64. With
	// KeyID it applies to the ciphertext.
	Format Format `json:"format,omitempty"`
	// KeyID names the secret whose 32 bytes are the AES-256-CBC key that
	// decrypts the data. Empty means the data is not encrypted.
	KeyID string `json:"keyid,omitempty"`
	// IV is the base64 of the 16-byte CBC IV; required with KeyID.
	IV string `json:"iv,omitempty"`
	// Loaded is the deprecated read-only "loaded" property. QEMU 7.2
	// rejects any value for it.
	Loaded *bool `json:"loaded,omitempty"`
}

// Format is QAPI's QCryptoSecretFormat: how the data is encoded.
type Format string

// The formats.
const (
	FormatRaw    Format = "raw"
	FormatBase64 Format = "base64"
)

// EnumValues lists the valid formats, so that QAPI decoding rejects others
// with QEMU's text before the object is created, as QEMU's visitor does.
func (Format) EnumValues() []string { return []string{string(FormatRaw), string(FormatBase64)} }

// Sentinel errors, for errors.Is. The errors themselves carry QEMU's texts.
var (
	// ErrNotFound: no secret has the given id.
	ErrNotFound = errors.New("secret not found")
	// ErrExists: the id is already in use.
	ErrExists = errors.New("secret id already in use")
)

// qemuError is an error with QEMU's text that matches a sentinel.
type qemuError struct {
	msg  string
	kind error
}

func (e *qemuError) Error() string { return e.msg }
func (e *qemuError) Unwrap() error { return e.kind }

func notFound(id string) error {
	return &qemuError{msg: fmt.Sprintf("No secret with id '%s'", id), kind: ErrNotFound}
}

// Store is a set of secrets by id. The zero Store is empty and ready to
// use; a Store is safe for concurrent use and must not be copied.
type Store struct {
	// mu protects secrets and pending. It is never held while a file is
	// read, so a slow file cannot block lookups.
	mu sync.RWMutex
	// secrets maps an id to the store's private copy of the secret bytes,
	// in key memory; the slices never leave the package.
	secrets map[string][]byte
	// pending holds the ids of secrets being added: reserved, as QEMU
	// adds the object before loading it, but without data yet.
	pending map[string]bool
}

// Add loads a secret and adds it under o.ID. Checks and their texts follow
// QEMU's order: the format value, the id, the read-only "loaded" property,
// a duplicate id, then the data (source, file, base64, decryption).
func (s *Store) Add(o Options) error {
	base64 := false
	switch o.Format {
	case "", FormatRaw:
	case FormatBase64:
		base64 = true
	default:
		return fmt.Errorf("Parameter 'format' does not accept value '%s'", o.Format)
	}
	if !idWellFormed(o.ID) {
		return errors.New("Parameter 'id' expects an identifier")
	}
	if o.Loaded != nil {
		return errors.New("Property 'secret.loaded' is not writable")
	}

	s.mu.Lock()
	if _, ok := s.secrets[o.ID]; ok || s.pending[o.ID] {
		s.mu.Unlock()
		return &qemuError{
			msg:  fmt.Sprintf("attempt to add duplicate property '%s' to object (type 'container')", o.ID),
			kind: ErrExists,
		}
	}
	if s.pending == nil {
		s.pending = make(map[string]bool)
	}
	s.pending[o.ID] = true
	s.mu.Unlock()

	data, err := s.load(o, base64)

	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pending, o.ID)
	if err != nil {
		return err
	}
	if s.secrets == nil {
		s.secrets = make(map[string][]byte)
		// A Store dropped with secrets in it (tests, tools) must not leave
		// its key memory mapped; the map is only reachable from s, so the
		// cleanup runs when nothing can use it any more.
		runtime.AddCleanup(s, freeAll, s.secrets)
	}
	s.secrets[o.ID] = data
	return nil
}

// freeAll releases the key memory of every secret in m.
func freeAll(m map[string][]byte) {
	for _, b := range m {
		keymem.Free(b)
	}
}

// keyCopy returns a copy of b in key memory. When no mapping can be made it
// falls back to the heap (keymem.Free then only wipes it).
func keyCopy(b []byte) []byte {
	c, err := keymem.Alloc(len(b))
	if err != nil {
		c = make([]byte, len(b))
	}
	copy(c, b)
	return c
}

// load reads, decodes and decrypts the secret described by o and returns
// it in key memory; the heap buffers on the way are wiped.
func (s *Store) load(o Options, base64 bool) ([]byte, error) {
	data, err := s.loadHeap(o, base64)
	if err != nil {
		return nil, err
	}
	out := keyCopy(data)
	keymem.Free(data)
	return out, nil
}

// loadHeap is load without the final copy to key memory.
func (s *Store) loadHeap(o Options, base64 bool) ([]byte, error) {
	var input []byte
	switch {
	case o.File != nil && o.Data != nil:
		return nil, errors.New("'file' and 'data' are mutually exclusive")
	case o.File != nil:
		b, err := readFile(cString(*o.File))
		if err != nil {
			return nil, fmt.Errorf("Unable to read %s: %w", cString(*o.File), err)
		}
		input = b
	case o.Data != nil:
		input = []byte(cString(*o.Data))
	default:
		return nil, errors.New("Either 'file' or 'data' must be provided")
	}

	if o.KeyID != "" {
		out, err := s.decrypt(cString(o.KeyID), cString(o.IV), input, base64)
		clear(input)
		return out, err
	}
	if base64 {
		out, err := qbase64Decode(input, true)
		clear(input)
		return out, err
	}
	return input, nil
}

// decrypt is QEMU's qcrypto_secret_decrypt: AES-256-CBC with the secret
// keyID as the key, then QEMU's padding check.
func (s *Store) decrypt(keyID, iv string, input []byte, base64 bool) ([]byte, error) {
	key, err := s.lookup(keyID)
	if err != nil {
		return nil, err
	}
	defer keymem.Free(key)
	if len(key) != 32 {
		return nil, errors.New("Key should be 32 bytes in length")
	}
	if iv == "" {
		return nil, errors.New("IV is required to decrypt secret")
	}
	ivBytes, err := qbase64Decode([]byte(iv), false)
	if err != nil {
		return nil, err
	}
	if len(ivBytes) != aes.BlockSize {
		return nil, fmt.Errorf("IV should be 16 bytes in length not %d", len(ivBytes))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}

	ciphertext := input
	if base64 {
		ciphertext, err = qbase64Decode(input, true)
		if err != nil {
			return nil, err
		}
		defer clear(ciphertext)
	}
	if len(ciphertext)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("Length %d must be a multiple of block size %d", len(ciphertext), aes.BlockSize)
	}
	if len(ciphertext) == 0 {
		// QEMU reads the padding byte before its buffer here; with
		// glibc's allocator that byte is 0, so the secret is empty.
		return []byte{}, nil
	}
	plaintext, err := keymem.Alloc(len(ciphertext))
	if err != nil {
		plaintext = make([]byte, len(ciphertext))
	}
	cipher.NewCBCDecrypter(block, ivBytes).CryptBlocks(plaintext, ciphertext)

	// Like QEMU, check only the last byte: at most one block of padding,
	// and 0 is accepted. The value is in QEMU's message; with a correct
	// key and IV it is padding, not secret data.
	pad := int(plaintext[len(plaintext)-1])
	if pad > aes.BlockSize || pad > len(plaintext) {
		keymem.Free(plaintext)
		return nil, fmt.Errorf("Incorrect number of padding bytes (%d) found on decrypted data", pad)
	}
	n := len(plaintext) - pad
	out := keyCopy(plaintext[:n])
	keymem.Free(plaintext)
	return out, nil
}

// lookup returns a copy of a secret in key memory, with QEMU's
// qcrypto_secret_lookup errors.
func (s *Store) lookup(id string) ([]byte, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.secrets[id]
	if !ok {
		if s.pending[id] {
			return nil, fmt.Errorf("Secret with id '%s' has no data", id)
		}
		return nil, notFound(id)
	}
	return keyCopy(b), nil
}

// Get returns a copy of the secret's bytes in key memory. The caller owns
// the copy and must release it with keymem.Free (or luksfmt.Wipe) when
// done; clearing it is not enough, the mapping would stay.
func (s *Store) Get(id string) ([]byte, error) {
	return s.lookup(id)
}

// GetUTF8 is Get for users that need text, such as LUKS passphrases
// (QEMU's qcrypto_secret_lookup_as_utf8): the secret must be valid UTF-8
// without NUL bytes.
func (s *Store) GetUTF8(id string) ([]byte, error) {
	b, err := s.lookup(id)
	if err != nil {
		return nil, err
	}
	if !utf8.Valid(b) || bytes.IndexByte(b, 0) >= 0 {
		keymem.Free(b)
		return nil, fmt.Errorf("Data from secret %s is not valid UTF-8", id)
	}
	return b, nil
}

// Delete removes a secret and wipes and unmaps the store's copy. Copies handed out by
// Get are not affected. Like QEMU, deleting a secret that something still
// uses succeeds.
func (s *Store) Delete(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.secrets[id]
	if !ok {
		return &qemuError{msg: fmt.Sprintf("object '%s' not found", id), kind: ErrNotFound}
	}
	delete(s.secrets, id)
	keymem.Free(b)
	return nil
}

// Has reports whether a secret with the id exists.
func (s *Store) Has(id string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.secrets[id]
	return ok
}

// IDs returns the ids of all secrets, sorted.
func (s *Store) IDs() []string {
	s.mu.RLock()
	ids := make([]string, 0, len(s.secrets))
	for id := range s.secrets {
		ids = append(ids, id)
	}
	s.mu.RUnlock()
	sort.Strings(ids)
	return ids
}

// idWellFormed is QEMU's id_wellformed.
func idWellFormed(id string) bool {
	if id == "" || !isAlpha(id[0]) {
		return false
	}
	for i := 1; i < len(id); i++ {
		c := id[i]
		if !isAlpha(c) && !(c >= '0' && c <= '9') && c != '-' && c != '.' && c != '_' {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

// cString returns s as QEMU holds it: its JSON parser stores U+0000 in
// modified UTF-8 (C0 80), so its C strings never end early.
func cString(s string) string {
	return strings.ReplaceAll(s, "\x00", "\xc0\x80")
}
