package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// TestQcow2ChainMapMatchesQSD exports the top of a qcow2 backing chain made
// by qemu-img and compares nbdinfo --map and the content with the same
// export from qemu-storage-daemon.
func TestQcow2ChainMapMatchesQSD(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	qsd := testutil.NeedTool(t, "qemu-storage-daemon")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -z 8M 1M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x22 512k 1M", "-c", "write -z 2M 64k", top)
	args := func(sock string) []string {
		return []string{"--blockdev", "driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename=" + top,
			"--nbd-server", "addr.type=unix,addr.path=" + sock, "--export", "type=nbd,id=e,node-name=q"}
	}
	serve := func(bin, sock string) (string, string) {
		cmd := exec.Command(bin, args(sock)...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		uri := "nbd+unix:///q?socket=" + sock
		var m string
		var err error
		for i := 0; i < 100; i++ {
			if m, err = testutil.RunErr("nbdinfo", "--map", uri); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("%s: nbdinfo --map: %v %s", bin, err, m)
		}
		out := filepath.Join(dir, filepath.Base(bin)+".raw")
		testutil.Run(t, "nbdcopy", uri, out)
		return m, out
	}
	wantMap, wantRaw := serve(qsd, filepath.Join(dir, "qsd.sock"))
	gotMap, gotRaw := serve(blockdBin, filepath.Join(dir, "blockd.sock"))
	if gotMap != wantMap {
		t.Fatalf("base:allocation map differs\nqemu-storage-daemon:\n%s\nblockd:\n%s", wantMap, gotMap)
	}
	testutil.Run(t, "cmp", wantRaw, gotRaw)
}

// TestLuksQcow2Stacks builds qcow2 over luks and luks over qcow2 with
// blockdev-create, exports both, writes and reads them with qemu-io, and
// checks the outer images with cryptsetup and qemu-img.
func TestLuksQcow2Stacks(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	pw := filepath.Join(d.dir, "pw")
	os.WriteFile(pw, []byte("stacked"), 0o600)
	d.must("object-add", map[string]any{"qom-type": "secret", "id": "s0", "file": pw})
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})

	// qcow2 over luks: the LUKS volume's plaintext holds a qcow2 image.
	encImg := filepath.Join(d.dir, "enc.img")
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c0", "options": map[string]any{"driver": "file", "filename": encImg, "size": 0}}); e != "" {
		t.Fatal(e)
	}
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "encf", "filename": encImg})
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c1", "options": map[string]any{"driver": "luks", "file": "encf", "size": 32 << 20, "key-secret": "s0", "iter-time": 20}}); e != "" {
		t.Fatal(e)
	}
	d.must("blockdev-add", map[string]any{"driver": "luks", "node-name": "enc", "file": "encf", "key-secret": "s0"})
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c2", "options": map[string]any{"driver": "qcow2", "file": "enc", "size": 16 << 20}}); e != "" {
		t.Fatal(e)
	}
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "q", "file": "enc"})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e1", "node-name": "q", "writable": true})

	// luks over qcow2: a qcow2 image made by qemu-img holds a LUKS volume.
	qImg := filepath.Join(d.dir, "outer.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", qImg, "32M")
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "outer", "file": map[string]any{"driver": "file", "filename": qImg}})
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c3", "options": map[string]any{"driver": "luks", "file": "outer", "size": 8 << 20, "key-secret": "s0", "iter-time": 20, "luks-version": 2, "pbkdf": "pbkdf2"}}); e != "" {
		t.Fatal(e)
	}
	d.must("blockdev-add", map[string]any{"driver": "luks", "node-name": "inner", "file": "outer", "key-secret": "s0"})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e2", "node-name": "inner", "writable": true})

	for _, name := range []string{"q", "inner"} {
		uri := "nbd+unix:///" + name + "?socket=" + sock
		testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5c 4096 200k", "-c", "write -z 1M 64k", uri)
		testutil.Run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5c 4096 200k", "-c", "read -P 0 1M 64k", uri)
	}
	// Never-written qcow2 clusters read as zeroes through qcow2; a fresh
	// LUKS payload decrypts to noise, as in QEMU.
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "read -P 0 0 4096", "nbd+unix:///q?socket="+sock)
	for _, id := range []string{"e1", "e2"} {
		d.must("block-export-del", map[string]any{"id": id})
	}
	d.must("nbd-server-stop", nil)
	for _, n := range []string{"q", "inner"} {
		for i := 0; ; i++ {
			if _, err := d.run("blockdev-del", map[string]any{"node-name": n}); err == nil {
				break
			} else if i > 100 {
				t.Fatalf("blockdev-del %s: %v", n, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	d.must("blockdev-del", map[string]any{"node-name": "enc"})
	d.must("blockdev-del", map[string]any{"node-name": "encf"})
	d.must("blockdev-del", map[string]any{"node-name": "outer"})
	testutil.Run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", pw, encImg)
	testutil.Run(t, "qemu-img", "check", qImg)
	// qemu-img reads the qcow2 inside the LUKS volume (LUKS1) directly.
	testutil.Run(t, "qemu-img", "check", "--object", "secret,id=s0,file="+pw, "--image-opts",
		"driver=qcow2,file.driver=luks,file.key-secret=s0,file.file.filename="+encImg)
}
