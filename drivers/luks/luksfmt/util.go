package luksfmt

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"

	"blockd/internal/keymem"
)

// saltSize is the size of every LUKS salt (keyslots and digests).
const saltSize = 32

// sectorSize is the unit of LUKS1 offsets and of keyslot area encryption.
const sectorSize = 512

// Key memory. Every buffer that holds key material on the way from a
// passphrase to a volume key and back (KDF output, keyslot areas before
// encryption and after decryption, AF accumulators, PBKDF2 scratch, volume
// keys) comes from internal/keymem: outside the Go heap, locked in RAM,
// left out of core dumps, wiped and unmapped when freed. allocKey and
// freeKey are variables so that tests can watch every allocation.
var (
	allocKey = keymem.Alloc
	freeKey  = keymem.Free
)

// keyBuf returns n zeroed bytes of key memory, to be released with
// freeKey. When no mapping can be made (the process is out of address
// space or mappings) it falls back to the heap, which freeKey then only
// wipes.
func keyBuf(n int) []byte {
	b, err := allocKey(n)
	if err != nil {
		return make([]byte, n)
	}
	return b
}

// Wipe releases key material: slices this package returned (volume keys)
// and passphrase copies from secrets.Store are key memory, which is wiped
// and unmapped; any other slice is overwritten with zeroes. Use it on every
// volume key returned by this package once it has been handed to a cipher,
// and on every passphrase copy once it has been used. b must not be used
// afterwards.
func Wipe(b []byte) { freeKey(b) }

// randomKey returns n random bytes in key memory.
func randomKey(n int) ([]byte, error) {
	b := keyBuf(n)
	if _, err := rand.Read(b); err != nil {
		freeKey(b)
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	return b, nil
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	return b, nil
}

// readFull reads exactly len(p) bytes at off. A short read is reported as
// io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	if r == nil {
		return errors.New("luks header has no reader")
	}
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// writeAll writes p at off.
func writeAll(w io.WriterAt, p []byte, off int64) error {
	n, err := w.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	return err
}

// syncer is implemented by writers that can flush to stable storage
// (*os.File). Updates call it between steps whose order matters for crash
// safety.
type syncer interface{ Sync() error }

func syncWriter(w io.WriterAt) error {
	if s, ok := w.(syncer); ok {
		return s.Sync()
	}
	return nil
}

// writeRandom fills [off, off+n) with random bytes, 1 MiB at a time.
func writeRandom(w io.WriterAt, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := rand.Read(buf[:c]); err != nil {
			return err
		}
		if err := writeAll(w, buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// writeZeroes fills [off, off+n) with zeroes, 1 MiB at a time.
func writeZeroes(w io.WriterAt, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if err := writeAll(w, buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// cString returns the bytes of b up to the first NUL.
func cString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// putCString stores s NUL-padded into b, truncated to len(b)-1 bytes.
func putCString(b []byte, s string) {
	clear(b)
	copy(b[:len(b)-1], s)
}

// newUUID returns a random (version 4) UUID in the lower-case text form
// cryptsetup and QEMU write.
func newUUID() (string, error) {
	b, err := randomBytes(16)
	if err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// canonicalUUID validates a UUID in 8-4-4-4-12 hex form and returns it in
// lower case, as libuuid's uuid_parse/uuid_unparse would.
func canonicalUUID(s string) (string, error) {
	if len(s) != 36 {
		return "", fmt.Errorf("%w: malformed uuid %q", ErrInvalidArgument, s)
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return "", fmt.Errorf("%w: malformed uuid %q", ErrInvalidArgument, s)
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
				return "", fmt.Errorf("%w: malformed uuid %q", ErrInvalidArgument, s)
			}
		}
	}
	return strings.ToLower(s), nil
}
