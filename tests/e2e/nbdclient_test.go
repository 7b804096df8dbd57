package e2e

import (
	"bytes"
	"crypto/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/internal/tlscreds/tlstest"
)

// startQemuNbd serves img on sock until the test ends.
func startQemuNbd(t *testing.T, sock string, args ...string) {
	t.Helper()
	testutil.NeedTool(t, "qemu-nbd")
	cmd := exec.Command("qemu-nbd", append([]string{"-k", sock, "-f", "raw", "-t", "-e", "8"}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		if i > 500 {
			t.Fatal("qemu-nbd did not listen")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestNBDClientNode: blockdev-add driver=nbd over a qemu-nbd export (plain
// and with TLS), exported again by blockd's own NBD server and read and
// written there with nbdcopy; the node's name as QEMU prints it; QEMU's
// errors for a read-only export and for server-side TLS credentials.
func TestNBDClientNode(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	d := start(t)
	certs := filepath.Join(d.dir, "pki")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := tlstest.Generate(certs, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8<<20)
	rand.Read(data)
	img := filepath.Join(d.dir, "remote.img")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(d.dir, "plain.sock")
	startQemuNbd(t, plain, img)
	secure := filepath.Join(d.dir, "tls.sock")
	startQemuNbd(t, secure, "--object", "tls-creds-x509,id=tls0,endpoint=server,dir="+certs, "--tls-creds", "tls0", img)
	ro := filepath.Join(d.dir, "ro.sock")
	startQemuNbd(t, ro, "-r", img)

	d.must("object-add", map[string]any{"qom-type": "tls-creds-x509", "id": "tlsc", "dir": certs, "endpoint": "client"})
	d.must("object-add", map[string]any{"qom-type": "tls-creds-x509", "id": "tlss", "dir": certs, "endpoint": "server"})
	d.must("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n0", "server": map[string]any{"type": "unix", "path": plain}})
	d.must("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n1", "server": map[string]any{"type": "unix", "path": secure}, "tls-creds": "tlsc"})
	d.mustFail("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n2", "server": map[string]any{"type": "unix", "path": ro}}, "NBD export is read-only")
	d.mustFail("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n2", "server": map[string]any{"type": "unix", "path": secure}, "tls-creds": "tlss"}, "Expecting TLS credentials with a client endpoint")
	d.mustFail("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n2", "server": map[string]any{"type": "unix", "path": secure}, "tls-creds": "nosuch"}, "No TLS credentials with id 'nosuch'")
	d.mustFail("blockdev-add", map[string]any{"driver": "nbd", "node-name": "n2", "server": map[string]any{"type": "unix", "path": secure}}, "TLS negotiation required")

	for _, n := range d.nodes() {
		switch n.NodeName {
		case "n0":
			if n.Drv != "nbd" || n.File != "nbd+unix://?socket="+plain || n.Image.VirtualSize != 8<<20 {
				t.Fatalf("query-named-block-nodes: %+v", n)
			}
		case "n1":
			if n.File != "nbd+unix://?socket="+secure {
				t.Fatalf("query-named-block-nodes: %+v", n)
			}
		}
	}

	own := filepath.Join(d.dir, "own.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": own}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "n0", "name": "again", "writable": true})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e1", "node-name": "n1", "name": "secure"})
	for _, name := range []string{"again", "secure"} {
		out := filepath.Join(d.dir, name+".out")
		testutil.Run(t, "nbdcopy", "nbd+unix:///"+name+"?socket="+own, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("export %s of the nbd node reads other data than qemu-nbd serves", name)
		}
	}
	// Writes through the re-export reach qemu-nbd's image.
	src := filepath.Join(d.dir, "new.img")
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "nbdcopy", src, "nbd+unix:///again?socket="+own)
	got, _ := os.ReadFile(img)
	if !bytes.Equal(got, data) {
		t.Fatal("writes through the re-export did not reach the remote image")
	}
	if out := testutil.Run(t, "nbdinfo", "--size", "nbd+unix:///again?socket="+own); strings.TrimSpace(out) != "8388608" {
		t.Fatalf("nbdinfo --size: %q", out)
	}
	d.must("block-export-del", map[string]any{"id": "e0"})
	d.must("block-export-del", map[string]any{"id": "e1"})
	time.Sleep(100 * time.Millisecond)
	d.must("blockdev-del", map[string]any{"node-name": "n0"})
	d.must("blockdev-del", map[string]any{"node-name": "n1"})
}
