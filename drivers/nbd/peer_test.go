package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/testutil"
	"blockd/internal/tlscreds"
	"blockd/internal/tlscreds/tlstest"
)

// startPeer runs a server command until the test ends and waits for its
// unix socket.
func startPeer(t *testing.T, sock string, name string, args ...string) *peer {
	t.Helper()
	testutil.NeedTool(t, name)
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p := &peer{cmd: cmd, done: done}
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return p
		}
		select {
		case <-done:
			t.Fatalf("%s exited: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen on %s: %s", name, sock, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// peer is a running server process.
type peer struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it has exited
}

// stopPeer kills the server and waits for it.
func stopPeer(p *peer) {
	p.cmd.Process.Kill()
	<-p.done
}

func uri(sock, export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

// peerData reads the whole export with nbdcopy, the peer's own view.
func peerData(t *testing.T, sock, export string) []byte {
	t.Helper()
	testutil.NeedTool(t, "nbdcopy")
	out, err := exec.Command("nbdcopy", uri(sock, export), "-").Output()
	if err != nil {
		t.Fatalf("nbdcopy: %v", err)
	}
	return out
}

// peerMap is nbdinfo --map: offset, length and zero bit of each extent.
type mapEntry struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Type   int   `json:"type"`
}

func peerMap(t *testing.T, sock, export string) []mapEntry {
	t.Helper()
	testutil.NeedTool(t, "nbdinfo")
	out, err := exec.Command("nbdinfo", "--map", "--json", uri(sock, export)).Output()
	if err != nil {
		t.Fatalf("nbdinfo --map: %v", err)
	}
	var m []mapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("nbdinfo --map: %v: %s", err, out)
	}
	return m
}

// checkMap compares the node's block status with nbdinfo --map: the same
// zero bit (type & 2) over the whole export.
func checkMap(t *testing.T, c *edge, sock, export string) {
	t.Helper()
	ctx := context.Background()
	zeroAt := func(m []mapEntry, off int64) (bool, int64) {
		for _, e := range m {
			if off >= e.Offset && off < e.Offset+e.Length {
				return e.Type&2 != 0, e.Offset + e.Length
			}
		}
		t.Fatalf("nbdinfo --map does not cover %d", off)
		return false, 0
	}
	m := peerMap(t, sock, export)
	for off := int64(0); off < c.Size(); {
		ext, err := c.BlockStatus(ctx, off, c.Size()-off)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ext {
			for o := off; o < off+e.Length; {
				z, end := zeroAt(m, o)
				if z != (e.Flags&graph.ExtentZero != 0) {
					t.Fatalf("block status at %d: %+v, nbdinfo --map says zero=%v", o, e, z)
				}
				o = min(end, off+e.Length)
			}
			off += e.Length
		}
	}
}

func TestPeerNbdkit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	startPeer(t, sock, "nbdkit", "-f", "-U", sock, "memory", "64M")
	c := openNBD(t, map[string]any{"server": map[string]any{"type": "unix", "path": sock}})
	defer c.Close()
	if c.Size() != 64*mib {
		t.Fatalf("size %d", c.Size())
	}
	roundTrip(t, c, func() []byte { return peerData(t, sock, "") })
	checkMap(t, c, sock, "")
	// nbdkit's memory plugin frees trimmed and zeroed ranges.
	ctx := context.Background()
	if err := c.WriteZeroes(ctx, 0, 64*mib, graph.MayUnmap); err != nil {
		t.Fatal(err)
	}
	ext, err := c.BlockStatus(ctx, 0, 64*mib)
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 1 || ext[0].Length != 64*mib || ext[0].Flags&graph.ExtentZero == 0 {
		t.Fatalf("block status after zeroing everything: %+v", ext)
	}
	checkMap(t, c, sock, "")
}

func qemuNbdImage(t *testing.T, size int64) string {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	return img
}

func readFile(t *testing.T, path string) func() []byte {
	return func() []byte {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

func TestPeerQemuNbd(t *testing.T) {
	img := qemuNbdImage(t, 32*mib)
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	startPeer(t, sock, "qemu-nbd", "-k", sock, "-f", "raw", "-t", "-e", "4", "--cache=none", "--discard=unmap", img)
	c := openNBD(t, map[string]any{"server": map[string]any{"type": "unix", "path": sock}})
	defer c.Close()
	roundTrip(t, c, readFile(t, img))
	checkMap(t, c, sock, "")
}

func TestPeerQemuNbdReadOnly(t *testing.T) {
	img := qemuNbdImage(t, mib)
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	startPeer(t, sock, "qemu-nbd", "-k", sock, "-f", "raw", "-t", "-r", img)
	_, err := tryOpen(map[string]any{"server": map[string]any{"type": "unix", "path": sock}})
	if err == nil || err.Error() != "NBD export is read-only" {
		t.Fatalf("read-write open of a read-only export: %v", err)
	}
	c := openNBD(t, map[string]any{"server": map[string]any{"type": "unix", "path": sock}, "read-only": true})
	defer c.Close()
	if err := c.ReadAt(context.Background(), make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

func TestPeerQSD(t *testing.T) {
	img := qemuNbdImage(t, 16*mib)
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	startPeer(t, sock, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=e,node-name=f,name=disk,writable=on")
	c := openNBD(t, unixServer(sock, "disk"))
	defer c.Close()
	roundTrip(t, c, readFile(t, img))
	checkMap(t, c, sock, "disk")
}

// TestPeerQemuNbdRestart: qemu-nbd killed and started again within
// reconnect-delay; requests issued during the outage succeed afterwards.
// Without a restart they fail with EIO once the delay is over.
func TestPeerQemuNbdRestart(t *testing.T) {
	img := qemuNbdImage(t, 4*mib)
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	args := []string{"-k", sock, "-f", "raw", "-t", "-e", "4", img}
	srv := startPeer(t, sock, "qemu-nbd", args...)
	opts := map[string]any{"server": map[string]any{"type": "unix", "path": sock}, "reconnect-delay": json.Number("5")}
	c := openNBD(t, opts)
	defer c.Close()
	ctx := context.Background()
	stopPeer(srv)
	res := make(chan error, 8)
	for i := range 8 {
		go func() { res <- c.WriteAt(ctx, []byte(fmt.Sprintf("outage %d", i)), int64(i)*4096, 0) }()
	}
	time.Sleep(500 * time.Millisecond)
	srv = startPeer(t, sock, "qemu-nbd", args...)
	for range 8 {
		select {
		case err := <-res:
			if err != nil {
				t.Fatalf("write during the outage: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("write during the outage did not complete")
		}
	}
	b, _ := os.ReadFile(img)
	for i := range 8 {
		if want := fmt.Sprintf("outage %d", i); string(b[i*4096:i*4096+len(want)]) != want {
			t.Fatalf("write %d did not reach the image", i)
		}
	}

	// Kill it again and leave it down: EIO after the delay.
	opts["reconnect-delay"] = json.Number("1")
	c2 := openNBD(t, opts)
	defer c2.Close()
	stopPeer(srv)
	start := time.Now()
	var err error
	for time.Since(start) < 5*time.Second {
		if err = c2.ReadAt(ctx, make([]byte, 512), 0); err != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if graph.Errno(err) != syscall.EIO {
		t.Fatalf("read with the server gone: %v, want EIO", err)
	}
}

// clientCreds is a graph.TLSCredStore with one tls-creds-x509 object.
type clientCreds map[string]*tls.Config

func (c clientCreds) ClientTLS(id string) (*tls.Config, error) {
	cfg, ok := c[id]
	if !ok {
		return nil, fmt.Errorf("No TLS credentials with id '%s'", id)
	}
	return cfg, nil
}

func TestPeerQemuNbdTLS(t *testing.T) {
	dir := t.TempDir()
	if err := tlstest.Generate(dir, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	img := qemuNbdImage(t, 16*mib)
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	startPeer(t, sock, "qemu-nbd", "-k", sock, "-f", "raw", "-t", "-e", "4",
		"--object", "tls-creds-x509,id=tls0,endpoint=server,dir="+dir, "--tls-creds", "tls0", img)
	cfg, err := tlscreds.LoadX509(tlscreds.X509Options{Dir: dir, Endpoint: "client", VerifyPeer: true})
	if err != nil {
		t.Fatal(err)
	}
	open := func(opts map[string]any) (*edge, error) {
		g := graph.New(nil, Driver())
		g.TLSCreds = clientCreds{"tls0": cfg}
		tree := map[string]any{"driver": "nbd", "node-name": "n", "server": map[string]any{"type": "unix", "path": sock}}
		for k, v := range opts {
			tree[k] = v
		}
		b, err := g.Add(context.Background(), tree, false)
		if err != nil {
			return nil, err
		}
		c, err := g.NewBackend(b.Name(), "test", graph.PermRead|graph.PermWrite, graph.PermAll)
		if err != nil {
			return nil, err
		}
		return &edge{Child: c, g: g}, nil
	}
	// Without TLS the server refuses to negotiate.
	if _, err := open(nil); err == nil || !strings.Contains(err.Error(), "TLS negotiation required") {
		t.Fatalf("plain connection to a TLS server: %v", err)
	}
	// A wrong host name fails the certificate check.
	if _, err := open(map[string]any{"tls-creds": "tls0", "tls-hostname": "wrong.example"}); err == nil {
		t.Fatal("a certificate for another host was accepted")
	}
	for _, opts := range []map[string]any{{"tls-creds": "tls0"}, {"tls-creds": "tls0", "tls-hostname": "localhost"}} {
		c, err := open(opts)
		if err != nil {
			t.Fatalf("%v: %v", opts, err)
		}
		roundTrip(t, c, readFile(t, img))
		c.Close()
	}
}
