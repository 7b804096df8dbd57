package file

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"blockd/graph"
	"blockd/internal/qapi"
)

// Interoperability with the real QEMU tools. A missing tool skips the test,
// except with CI=true, where it fails.

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required with CI=true: %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// run runs a tool and returns its combined output and whether it succeeded.
func run(t *testing.T, name string, args ...string) (string, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, needTool(t, name), args...).CombinedOutput()
	return string(out), err == nil
}

// start starts a long-running tool; it is killed at the end of the test.
func start(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(needTool(t, name), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	return cmd
}

// waitLock waits until another process holds lock byte off on p.
func waitLock(t *testing.T, p string, off int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		for _, b := range heldBytes(t, p) {
			if b == off {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nobody took lock byte %d on %s", off, p)
}

func mustContain(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Fatalf("output lacks %q:\n%s", w, out)
		}
	}
}

// blockd writes an image: qemu-io cannot write it, qemu-img info cannot
// open a qcow2 image without -U; once blockd lets go, both work.
func TestPeerQemuRefusesBlockdWriter(t *testing.T) {
	needTool(t, "qemu-io")
	needTool(t, "qemu-img")
	ctx := context.Background()
	p, _ := mkfile(t, 1<<20)
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"disk","filename":%s}`, q(p))
	c, err := g.NewBackend("disk", "export", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{0x11}, 512), 0, 0); err != nil {
		t.Fatal(err)
	}

	out, ok := run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 512", p)
	if ok {
		t.Fatalf("qemu-io wrote an image blockd holds:\n%s", out)
	}
	mustContain(t, out, `Failed to get "write" lock`, "Is another process using the image ["+p+"]?")

	// qemu-img info needs write unshared on a qcow2 image's file (its
	// metadata); a raw image it opens without I/O, so test with qcow2.
	qc := filepath.Join(t.TempDir(), "img.qcow2")
	if out, ok := run(t, "qemu-img", "create", "-q", "-f", "qcow2", qc, "1M"); !ok {
		t.Fatal(out)
	}
	addNode(t, g, `{"driver":"file","node-name":"qc","filename":%s}`, q(qc))
	cq, err := g.NewBackend("qc", "export", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatal(err)
	}
	out, ok = run(t, "qemu-img", "info", qc)
	if ok {
		t.Fatalf("qemu-img info opened an image blockd writes:\n%s", out)
	}
	mustContain(t, out, "Could not open '"+qc+"': Failed to get shared \"write\" lock", "Is another process using the image ["+qc+"]?")
	out, ok = run(t, "qemu-img", "info", "-U", "--output=json", qc)
	if !ok {
		t.Fatalf("qemu-img info -U: %s", out)
	}
	var info struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.Format != "qcow2" || info.VirtualSize != 1<<20 {
		t.Fatalf("qemu-img info -U: %v %s", err, out)
	}
	g.ReleaseBackend(cq)
	if out, ok := run(t, "qemu-img", "info", qc); !ok {
		t.Fatalf("qemu-img info after release: %s", out)
	}

	// A read-only qemu-io that shares write may read alongside.
	out, ok = run(t, "qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0x11 0 512", p)
	if !ok {
		t.Fatalf("qemu-io -r -U: %s", out)
	}

	g.ReleaseBackend(c)
	out, ok = run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 512", p)
	if !ok {
		t.Fatalf("qemu-io after release: %s", out)
	}
	c, err = g.NewBackend("disk", "export", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	if err := c.ReadAt(ctx, buf, 0); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{0x22}, 512)) {
		t.Fatalf("blockd does not see qemu-io's write: %v", err)
	}
	g.ReleaseBackend(c)
}

// qemu-io holds the image open read-write (sharing everything): a blockd
// user that does not share write is refused with QEMU's text; one that
// shares write gets in.
func TestPeerBlockdRefusesQemuIo(t *testing.T) {
	p, _ := mkfile(t, 1<<20)
	start(t, "qemu-io", "-f", "raw", "-c", "sleep 600000", p)
	waitLock(t, p, lockPermBase+1)

	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"disk","filename":%s}`, q(p))
	_, err := g.NewBackend("disk", "export", rw, graph.PermAll&^graph.PermWrite)
	if err == nil || err.Error() != `Failed to get shared "write" lock` {
		t.Fatalf("attach while qemu-io writes: %v", err)
	}
	c, err := g.NewBackend("disk", "export", rw, graph.PermAll)
	if err != nil {
		t.Fatalf("sharing writer: %v", err)
	}
	g.ReleaseBackend(c)
	// With locking=off blockd neither checks nor takes locks.
	addNode(t, g, `{"driver":"file","node-name":"nolock","filename":%s,"locking":"off"}`, q(p))
	c, err = g.NewBackend("nolock", "export", rw, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatalf("locking=off: %v", err)
	}
	g.ReleaseBackend(c)
}

// qemu-storage-daemon exporting the image writable over NBD: blockd's
// writer that does not share write is refused; a reader gets in.
func TestPeerBlockdRefusesQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon")
	p, _ := mkfile(t, 1<<20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	start(t, "qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=f,filename="+p,
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=e,node-name=f,writable=on")
	waitLock(t, p, lockPermBase+1)

	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"disk","filename":%s}`, q(p))
	_, err := g.NewBackend("disk", "export", rw, graph.PermAll&^graph.PermWrite)
	if err == nil || err.Error() != `Failed to get shared "write" lock` {
		t.Fatalf("attach while QSD exports: %v", err)
	}
	if _, err := g.NewBackend("disk", "export", graph.PermRead, graph.PermAll); err != nil {
		t.Fatalf("sharing reader: %v", err)
	}
}

// Images blockd creates look to qemu-img as the ones it creates itself:
// same size, same allocation, for each preallocation mode.
func TestPeerCreateMatchesQemuImg(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	for _, tc := range []struct {
		size     int64
		prealloc string
	}{
		{0, "off"}, {100, "off"}, {512, "off"}, {1 << 20, "off"}, {1 << 20, "falloc"}, {1 << 20, "full"},
		{5120, "falloc"}, {3 << 20, "full"},
	} {
		name := fmt.Sprintf("%d-%s", tc.size, tc.prealloc)
		ours, theirs := filepath.Join(dir, name+".blockd"), filepath.Join(dir, name+".qemu")
		if err := Create(context.Background(), &CreateOptions{Filename: ours, Size: qapi.Size(tc.size), Preallocation: PreallocMode(tc.prealloc)}); err != nil {
			t.Fatal(err)
		}
		if out, ok := run(t, "qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation="+tc.prealloc, theirs, fmt.Sprint(tc.size)); !ok {
			t.Fatalf("qemu-img create: %s", out)
		}
		var a, b unix.Stat_t
		if err := unix.Stat(ours, &a); err != nil {
			t.Fatal(err)
		}
		if err := unix.Stat(theirs, &b); err != nil {
			t.Fatal(err)
		}
		if a.Size != b.Size || a.Blocks != b.Blocks || a.Mode != b.Mode {
			t.Errorf("%s: blockd size %d blocks %d mode %o; qemu-img size %d blocks %d mode %o", name, a.Size, a.Blocks, a.Mode, b.Size, b.Blocks, b.Mode)
		}
		if out, ok := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ours, theirs); !ok {
			t.Errorf("%s: %s", name, out)
		}
	}
}

// blockd's block status agrees with qemu-img map on a sparse file.
func TestPeerMapMatchesQemuImg(t *testing.T) {
	needTool(t, "qemu-img")
	p := sparse(t)
	out, ok := run(t, "qemu-img", "map", "--output=json", "-f", "raw", p)
	if !ok {
		t.Fatal(out)
	}
	var qm []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(out), &qm); err != nil {
		t.Fatal(err)
	}
	g := newGraph()
	defer g.Close()
	b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	ext, err := b.Node().(*Node).BlockStatus(context.Background(), 0, b.Node().Size())
	if err != nil {
		t.Fatal(err)
	}
	var ours, theirs []string
	off := int64(0)
	for _, e := range ext {
		ours = append(ours, fmt.Sprintf("%d+%d data=%v zero=%v", off, e.Length, e.Flags&graph.ExtentHole == 0, e.Flags&graph.ExtentZero != 0))
		off += e.Length
	}
	for _, m := range qm {
		theirs = append(theirs, fmt.Sprintf("%d+%d data=%v zero=%v", m.Start, m.Length, m.Data, m.Zero))
	}
	if fmt.Sprint(ours) != fmt.Sprint(theirs) {
		t.Fatalf("blockd %v\nqemu-img %v", ours, theirs)
	}
}
