package attach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"blockd/graph"
	"blockd/nbd"
)

// kernelHasNBDModule reports whether an nbd module file exists for the
// running kernel (attaching would then load it).
func kernelHasNBDModule() bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	rel := string(u.Release[:bytes.IndexByte(u.Release[:], 0)])
	found := false
	filepath.WalkDir(filepath.Join("/lib/modules", rel), func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), "nbd.ko") {
			found = true
			return filepath.SkipAll
		}
		return nil
	})
	return found
}

func newServer(t *testing.T) (*nbd.Server, *graph.MemNode) {
	s := nbd.NewServer(nbd.Options{})
	m := graph.NewMemNode(4 << 20)
	if err := s.AddExport(&nbd.Export{Name: "disk", Node: m}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, m
}

// TestAttachUnavailable checks the error on kernels without nbd support
// (the situation of the machines this project is developed on).
func TestAttachUnavailable(t *testing.T) {
	if runtime.GOOS == "linux" {
		if _, err := os.Stat("/dev/nbd0"); err == nil {
			t.Skip("/dev/nbd0 exists; see TestAttachKernel")
		}
		if kernelHasNBDModule() {
			t.Skip("an nbd module exists for this kernel; see TestAttachKernel")
		}
	}
	s, _ := newServer(t)
	d, err := Attach(context.Background(), s, "disk", Options{})
	if err == nil {
		d.Detach()
		t.Fatal("Attach succeeded without kernel support")
	}
	if !errors.Is(err, ErrUnavailable) || !strings.HasPrefix(err.Error(), "kernel nbd support unavailable: ") {
		t.Fatalf("error %q", err)
	}
	t.Log(err)
	if err := Available(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Available: %v", err)
	}
}

// TestAttachKernel attaches for real; it needs root, kernel nbd support
// and BLOCKD_TEST_NBD_ATTACH=1.
func TestAttachKernel(t *testing.T) {
	if os.Getenv("BLOCKD_TEST_NBD_ATTACH") != "1" {
		t.Skip("set BLOCKD_TEST_NBD_ATTACH=1 to attach a kernel NBD device")
	}
	s, m := newServer(t)
	copy(m.Bytes(), bytes.Repeat([]byte("blockd!\n"), 512))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := Attach(ctx, s, "disk", Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach()
	if d.Size != 4<<20 {
		t.Fatalf("size %d", d.Size)
	}
	f, err := os.OpenFile(d.Path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	if _, err := f.ReadAt(buf[:4096], 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(buf, []byte("blockd!\n")) {
		t.Fatalf("read %q", buf[:16])
	}
	copy(buf, bytes.Repeat([]byte{0x42}, 4096))
	if _, err := f.WriteAt(buf[:4096], 1<<20); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	if m.Bytes()[1<<20] != 0x42 {
		t.Fatal("write did not reach the node")
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("device not released")
	}
}

// TestClientHandshake covers the user-space half of Attach: the socket
// pair served by the server and the NBD_OPT_GO negotiation.
func TestClientHandshake(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux only")
	}
	s, _ := newServer(t)
	d := &Device{}
	defer d.closeSockets()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sock, err := d.connect(s)
	if err != nil {
		t.Fatal(err)
	}
	info, err := clientHandshake(ctx, sock, "disk")
	if err != nil {
		t.Fatal(err)
	}
	if info.size != 4<<20 || info.flags&flagCanMultiConn == 0 || info.flags&flagReadOnly != 0 || info.bs.max != 32<<20 {
		t.Fatalf("info %+v", info)
	}
	if n := s.Clients("disk"); n != 1 {
		t.Fatalf("clients %d", n)
	}
	sock2, err := d.connect(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := clientHandshake(ctx, sock2, "nope"); err == nil || err.Error() != "server refused: export 'nope' not present" {
		t.Fatalf("unknown export: %v", err)
	}
}
