package e2e

import (
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
