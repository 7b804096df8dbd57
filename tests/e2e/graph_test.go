package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// TestNodesAndSecrets adds file and raw nodes inline and by reference,
// queries and deletes them, and adds and deletes secrets.
func TestNodesAndSecrets(t *testing.T) {
	d := start(t)
	img := filepath.Join(d.dir, "a.img")
	os.WriteFile(img, bytes.Repeat([]byte{0xab}, 1<<20), 0o600)
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "f0", "filename": img})
	d.must("blockdev-add", map[string]any{"driver": "raw", "node-name": "r0", "file": "f0", "offset": 4096, "size": 8192})
	d.must("blockdev-add", map[string]any{"driver": "raw", "node-name": "r1", "file": map[string]any{"driver": "file", "filename": img}, "read-only": true})
	nodes := d.nodes()
	if len(nodes) != 4 || nodes[0].NodeName != "r1" || !strings.HasPrefix(nodes[1].NodeName, "#block") {
		t.Fatalf("nodes: %+v", nodes)
	}
	if nodes[2].NodeName != "r0" || nodes[2].Image.VirtualSize != 8192 || !strings.HasPrefix(nodes[2].File, "json:{") {
		t.Fatalf("r0: %+v", nodes[2])
	}
	if !nodes[0].RO || nodes[0].File != img {
		t.Fatalf("r1: %+v", nodes[0])
	}
	d.mustFail("blockdev-add", map[string]any{"driver": "raw", "node-name": "r0", "file": "f0"}, "Duplicate nodes with node-name='r0'")
	d.mustFail("blockdev-del", map[string]any{"node-name": "f0"}, "Block device f0 is in use")
	d.mustFail("blockdev-del", map[string]any{"node-name": nodes[1].NodeName}, "is not owned by the monitor")
	d.must("blockdev-del", map[string]any{"node-name": "r0"})
	d.must("blockdev-del", map[string]any{"node-name": "f0"})
	d.must("blockdev-del", map[string]any{"node-name": "r1"})
	if n := d.nodes(); len(n) != 0 {
		t.Fatalf("nodes left: %+v", n)
	}

	d.must("object-add", map[string]any{"qom-type": "secret", "id": "sec0", "data": "aGVsbG8=", "format": "base64"})
	d.mustFail("object-add", map[string]any{"qom-type": "secret", "id": "sec0", "data": "x"}, "attempt to add duplicate property 'sec0'")
	d.mustFail("object-add", map[string]any{"qom-type": "secret", "id": "sec1"}, "Either 'file' or 'data' must be provided")
	d.must("object-del", map[string]any{"id": "sec0"})
	d.mustFail("object-del", map[string]any{"id": "sec0"}, "object 'sec0' not found")
}

// TestEncryptedExport serves a LUKS2 disk with a detached header over NBD
// and checks it with nbdcopy and qemu-img; the header was made by
// cryptsetup.
func TestEncryptedExport(t *testing.T) {
	testutil.NeedTool(t, "nbdcopy")
	dir := t.TempDir()
	data, hdr, pw := filepath.Join(dir, "data"), filepath.Join(dir, "hdr"), filepath.Join(dir, "pw")
	plain := make([]byte, 2<<20)
	for i := range plain {
		plain[i] = byte(i * 13)
	}
	os.WriteFile(data, plain, 0o600)
	os.WriteFile(pw, []byte("export me"), 0o600)
	testutil.Run(t, "cryptsetup", "reencrypt", "-q", "--encrypt", "--type", "luks2", "--header", hdr,
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw, data)
	sock := filepath.Join(dir, "nbd.sock")
	d := start(t,
		"--object", "secret,id=sec0,file="+pw,
		"--blockdev", "driver=file,node-name=hdr,filename="+hdr,
		"--blockdev", "driver=file,node-name=data,filename="+data,
		"--blockdev", `{"driver":"luks","node-name":"disk","file":"data","header":"hdr","key-secret":"sec0"}`,
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on")
	uri := "nbd+unix:///disk?socket=" + sock
	out := filepath.Join(dir, "out")
	testutil.Run(t, "nbdcopy", uri, out)
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, plain) {
		t.Fatal("nbdcopy of the encrypted export differs from the plaintext")
	}
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 70000", uri)
	copy(plain[1000:71000], bytes.Repeat([]byte{0x5a}, 70000))
	os.WriteFile(out, plain, 0o600)
	testutil.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri, out)
	nodes := d.nodes()
	for _, n := range nodes {
		if n.NodeName == "disk" {
			if n.Image.FormatSpecific == nil || n.Image.FormatSpecific.Type != "luks" || n.Image.FormatSpecific.Data["detached-header"] != true {
				t.Fatalf("luks node info: %+v", n)
			}
		}
	}
	d.mustFail("blockdev-del", map[string]any{"node-name": "disk"}, "Node disk is in use")
	d.must("block-export-del", map[string]any{"id": "e0"})
	// The export goes away asynchronously (BLOCK_EXPORT_DELETED); then the
	// node can be deleted.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := d.run("blockdev-del", map[string]any{"node-name": "disk"})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("blockdev-del after export removal: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
