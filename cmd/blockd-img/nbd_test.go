package main

import (
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// TestNBDImages: nbd:// and nbd+unix:// names and --image-opts driver=nbd
// against a qemu-nbd export, compared with qemu-img.
func TestNBDImages(t *testing.T) {
	testutil.NeedTool(t, "qemu-nbd")
	dir := t.TempDir()
	img := filepath.Join(dir, "d.img")
	mustRun(t, dir, "qemu-img", "create", "-f", "raw", img, "8M")
	writeAt(t, img, 1<<20, pattern(65536, 3))
	sock := filepath.Join(dir, "s.sock")
	cmd := exec.Command("qemu-nbd", "-k", sock, "-f", "raw", "-t", "-e", "8", img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 500 {
			t.Fatal("qemu-nbd did not listen")
		}
		time.Sleep(10 * time.Millisecond)
	}
	uri := "nbd+unix:///?socket=" + sock
	opts := "driver=nbd,server.type=unix,server.path=" + sock
	src := filepath.Join(dir, "src.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", src, "8M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 7 4M 64k", src)
	for _, tc := range []struct {
		args []string
		out  string
	}{
		{[]string{"info", uri}, "text"},
		{[]string{"info", "--output=json", uri}, "json"},
		{[]string{"info", "-f", "raw", uri}, "text"},
		{[]string{"info", "--image-opts", opts}, "text"},
		{[]string{"map", "--output=json", uri}, "text"},
		{[]string{"map", "--output=json", "--image-opts", opts}, "text"},
		{[]string{"info", "nbd+unix:///x"}, "text"},
		{[]string{"info", "nbd://"}, "text"},
		{[]string{"convert", "-n", "-O", "raw", src, uri}, "text"},
		{[]string{"compare", src, uri}, "text"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			q := qemuImg(t, dir, tc.args...)
			b := blockdImg(t, dir, tc.args...)
			if q.code != b.code {
				t.Fatalf("exit status: qemu-img %d, blockd-img %d\nqemu-img:\n%s%s\nblockd-img:\n%s%s", q.code, b.code, q.stdout, q.stderr, b.stdout, b.stderr)
			}
			compareOutput(t, "stdout", tc.out, q.stdout, b.stdout)
			compareOutput(t, "stderr", "text", q.stderr, strings.ReplaceAll(b.stderr, "blockd-img", "qemu-img"))
		})
	}
}
