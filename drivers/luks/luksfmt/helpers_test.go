package luksfmt

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"blockd/internal/blockcrypto"
)

// missing skips the test when a peer tool or test input is absent, except
// in CI (CI=true) where that is a failure.
func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// upstreamDir is where cryptsetup's upstream test images are (see SOURCE.md
// there); LUKSFMT_UPSTREAM_DIR overrides it.
func upstreamDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("LUKSFMT_UPSTREAM_DIR")
	if dir == "" {
		dir = "/work/shared/testdata/cryptsetup-tests"
	}
	if _, err := os.Stat(filepath.Join(dir, "SOURCE.md")); err != nil {
		missing(t, "cryptsetup upstream test images not found in %s", dir)
	}
	return dir
}

func requireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, "%s not installed", name)
	}
	return p
}

// xzReader returns the decompressed contents of an upstream .xz file.
func xzOpen(t testing.TB, name string) io.Reader {
	t.Helper()
	xz := requireTool(t, "xz")
	cmd := exec.Command(xz, "-dc", filepath.Join(upstreamDir(t), name))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Wait() })
	return out
}

// xzFile decompresses an upstream image into a temporary directory.
func xzFile(t testing.TB, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), strings.TrimSuffix(name, ".xz"))
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, xzOpen(t, name)); err != nil {
		t.Fatal(err)
	}
	return dst
}

// xzTar unpacks an upstream .tar.xz into a temporary directory and returns
// a map from base name to path of its regular files.
func xzTar(t testing.TB, name string) map[string]string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{}
	tr := tar.NewReader(xzOpen(t, name))
	for {
		hd, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if hd.Typeflag != tar.TypeReg {
			continue
		}
		base := filepath.Base(hd.Name)
		p := filepath.Join(dir, base)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(f, tr); err != nil {
			t.Fatal(err)
		}
		f.Close()
		files[base] = p
	}
	return files
}

// openFile opens a header file read-only.
func openFile(t testing.TB, path string) *Header {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h, err := Open(f, st.Size())
	if err != nil {
		t.Fatalf("Open(%s): %v", filepath.Base(path), err)
	}
	return h
}

// openRW opens a header file for reading and writing.
func openRW(t testing.TB, path string) (*Header, *os.File) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h, err := Open(f, st.Size())
	if err != nil {
		t.Fatalf("Open(%s): %v", filepath.Base(path), err)
	}
	return h, f
}

// decryptPayload decrypts the payload of an image (from the header's
// payload offset to the end of the data file) with the project's sector
// cipher, one encryption sector at a time with the IV rule documented on
// Header.IVTweak.
func decryptPayload(t testing.TB, h *Header, key []byte, dataPath string) []byte {
	t.Helper()
	data, err := os.ReadFile(dataPath)
	if err != nil {
		t.Fatal(err)
	}
	ct := data[h.PayloadOffset():]
	c, err := blockcrypto.New(h.CipherSpec(), key)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Wipe()
	ss := h.SectorSize()
	pt := make([]byte, len(ct)/ss*ss)
	for off := 0; off < len(pt); off += ss {
		if err := c.Decrypt(pt[off:off+ss], ct[off:off+ss], uint64(off/512)+h.IVTweak(), ss); err != nil {
			t.Fatal(err)
		}
	}
	return pt
}

// memDev is an in-memory device implementing io.ReaderAt and io.WriterAt,
// growing on writes; failAfter (if > 0) makes the n-th write fail.
type memDev struct {
	mu        sync.Mutex
	b         []byte
	writes    int
	failAfter int
}

func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

var errInjected = io.ErrClosedPipe

func (m *memDev) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes++
	if m.failAfter > 0 && m.writes >= m.failAfter {
		return 0, errInjected
	}
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func (m *memDev) size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.b))
}

func (m *memDev) snapshot() *memDev {
	m.mu.Lock()
	defer m.mu.Unlock()
	return &memDev{b: bytes.Clone(m.b)}
}

// smallKeyslots is the LUKS2 keyslots area size (room for 8 keyslots of
// 512-bit keys) for tests that do not check the default layout: the
// default 16 MiB area is filled with random bytes and copied whole by
// every memDev snapshot, which dominates such tests under the race
// detector. LUKS1 (version 1) has no such option: 0.
func smallKeyslots(version int) int64 {
	if version != 2 {
		return 0
	}
	return 2 << 20
}

// fastKDF returns forced KDF parameters that keep tests fast.
func fastKDF(typ string) KDF {
	switch typ {
	case KDFArgon2i, KDFArgon2id:
		return KDF{Type: typ, Iterations: 4, MemoryKiB: 32, Parallel: 1}
	default:
		return KDF{Type: KDFPBKDF2, Iterations: 1000}
	}
}
