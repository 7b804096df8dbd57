package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"

	"blockd/internal/testutil"
)

// lockedBytes lists the byte-range locks /proc/locks shows on each file,
// one "KIND TYPE byte" entry per locked byte (ranges are merged by the
// kernel, so they are split here), sorted.
func lockedBytes(t *testing.T, files ...string) map[string][]string {
	t.Helper()
	ids := map[string]string{} // "maj:min:ino" as /proc/locks prints it -> file
	for _, f := range files {
		var st unix.Stat_t
		if err := unix.Stat(f, &st); err != nil {
			t.Fatal(err)
		}
		ids[fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)] = filepath.Base(f)
	}
	fh, err := os.Open("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	out := map[string][]string{}
	for _, f := range files {
		out[filepath.Base(f)] = []string{}
	}
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		// "1: OFDLCK ADVISORY  READ -1 fe:00:9979806 100 101"; waiters
		// have "->" after the number.
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 || fs[1] == "->" {
			continue
		}
		name, ok := ids[fs[5]]
		if !ok {
			continue
		}
		var from, to int64
		if _, err := fmt.Sscan(fs[6], &from); err != nil {
			t.Fatalf("/proc/locks line %q: %v", sc.Text(), err)
		}
		if fs[7] == "EOF" {
			to = from
		} else if _, err := fmt.Sscan(fs[7], &to); err != nil {
			t.Fatalf("/proc/locks line %q: %v", sc.Text(), err)
		}
		for b := from; b <= to; b++ {
			out[name] = append(out[name], fmt.Sprintf("%s %s %d", fs[1], fs[3], b))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for _, v := range out {
		sort.Strings(v)
	}
	return out
}

// peerDaemon is a qemu-storage-daemon or blockd process started with a
// QMP monitor after the given options; both serve QMP only once every
// command-line option (node, export) is in place.
type peerDaemon struct {
	t      *testing.T
	bin    string
	cmd    *exec.Cmd
	mon    *qmp.SocketMonitor
	logs   *strings.Builder
	exited chan struct{}
}

func startPeer(t *testing.T, bin, dir string, args ...string) *peerDaemon {
	t.Helper()
	sock := filepath.Join(dir, "m.sock")
	os.Remove(sock)
	all := append(append([]string(nil), args...), "--chardev", "socket,id=m0,path="+sock+",server=on,wait=off", "--monitor", "chardev=m0")
	p := &peerDaemon{t: t, bin: bin, cmd: exec.Command(bin, all...), logs: &strings.Builder{}, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := p.exited
	go func() { p.cmd.Wait(); close(exited) }()
	t.Cleanup(p.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			t.Fatalf("%s exited: %s", bin, p.logs)
		default:
		}
		mon, err := qmp.NewSocketMonitor("unix", sock, 2*time.Second)
		if err == nil {
			if err := mon.Connect(); err != nil {
				t.Fatalf("%s: qmp connect: %v", bin, err)
			}
			p.mon = mon
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start: %v", bin, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends the process (its locks go with it) and waits for it.
func (p *peerDaemon) stop() {
	if p.mon != nil {
		p.mon.Disconnect()
		p.mon = nil
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		p.t.Errorf("%s did not exit on SIGTERM", p.bin)
	}
	if strings.Contains(p.logs.String(), "WARNING: DATA RACE") {
		p.t.Errorf("the race detector reported a data race in %s:\n%s", p.bin, p.logs)
	}
}

// qmpError runs a command and returns its error text ("" on success).
func (p *peerDaemon) qmpError(t *testing.T, cmd string, args any) string {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
	if _, err := p.mon.Run(b); err != nil {
		return err.Error()
	}
	return ""
}

// TestImageLocksMatchQSD builds the same graphs under qemu-storage-daemon
// and blockd and compares the lock bytes each holds on every image file
// (QEMU's file-posix locks: byte 100+i for a permission taken, 200+i for
// one not shared). Then qemu-img, which tests those bytes, must get the
// same answer from both.
func TestImageLocksMatchQSD(t *testing.T) {
	qsd := testutil.NeedTool(t, "qemu-storage-daemon")
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", p("a.raw"), "1M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p("q.qcow2"), "1M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p("base.qcow2"), "1M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", p("base.qcow2"), "-F", "qcow2", p("top.qcow2"))
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+p("d.raw"), p("dq.qcow2"), "1M")
	secret := "secret,id=sec0,data=pw"
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "luks", "--object", secret, "-o", "key-secret=sec0,iter-time=10", p("l.luks"), "1M")

	file := func(node, name, extra string) []string {
		return []string{"--blockdev", "driver=file,node-name=" + node + ",filename=" + p(name) + extra}
	}
	export := func(writable bool) []string {
		e := "type=nbd,id=e,node-name=top"
		if writable {
			e += ",writable=on"
		}
		return []string{"--nbd-server", "addr.type=unix,addr.path=" + p("nbd.sock"), "--export", e}
	}
	cat := func(parts ...[]string) []string {
		var out []string
		for _, x := range parts {
			out = append(out, x...)
		}
		return out
	}
	raw := func(extra string) []string { return []string{"--blockdev", "driver=raw,node-name=top,file=f" + extra} }
	qcow2 := func(extra string) []string {
		return []string{"--blockdev", "driver=qcow2,node-name=top,file=f" + extra}
	}
	luks := func(extra string) []string {
		return []string{"--object", secret, "--blockdev", "driver=luks,node-name=top,file=f,key-secret=sec0" + extra}
	}
	const ro = ",read-only=on"
	rows := []struct {
		name  string
		files []string
		args  []string
	}{
		{"file", []string{"a.raw"}, file("top", "a.raw", "")},
		{"file-export-ro", []string{"a.raw"}, cat(file("top", "a.raw", ro), export(false))},
		{"file-export-rw", []string{"a.raw"}, cat(file("top", "a.raw", ""), export(true))},
		{"raw-export-rw", []string{"a.raw"}, cat(file("f", "a.raw", ""), raw(""), export(true))},
		{"raw-offset", []string{"a.raw"}, cat(file("f", "a.raw", ""), raw(",offset=512"))},
		{"raw-offset-export-rw", []string{"a.raw"}, cat(file("f", "a.raw", ""), raw(",offset=512"), export(true))},
		{"qcow2", []string{"q.qcow2"}, cat(file("f", "q.qcow2", ""), qcow2(""))},
		{"qcow2-ro-export", []string{"q.qcow2"}, cat(file("f", "q.qcow2", ro), qcow2(ro), export(false))},
		{"qcow2-backing-export-rw", []string{"top.qcow2", "base.qcow2"}, cat(file("f", "top.qcow2", ""), qcow2(""), export(true))},
		{"qcow2-data-file-export-rw", []string{"dq.qcow2", "d.raw"}, cat(file("f", "dq.qcow2", ""), file("d", "d.raw", ""), qcow2(",data-file=d"), export(true))},
		{"luks", []string{"l.luks"}, cat(file("f", "l.luks", ""), luks(""))},
		{"luks-export-ro", []string{"l.luks"}, cat(file("f", "l.luks", ""), luks(""), export(false))},
		{"luks-export-rw", []string{"l.luks"}, cat(file("f", "l.luks", ""), luks(""), export(true))},
		{"luks-ro-export", []string{"l.luks"}, cat(file("f", "l.luks", ro), luks(ro), export(false))},
	}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			var files []string
			for _, f := range r.files {
				files = append(files, p(f))
			}
			got := map[string]map[string][]string{}
			for _, bin := range []string{qsd, blockdBin} {
				d := startPeer(t, bin, dir, r.args...)
				got[bin] = lockedBytes(t, files...)
				d.stop()
			}
			if w, g := fmt.Sprint(got[qsd]), fmt.Sprint(got[blockdBin]); w != g {
				t.Errorf("lock bytes differ for %s\nqemu-storage-daemon: %s\nblockd:              %s", strings.Join(r.args, " "), w, g)
			}
		})
	}

	// The resize lock of a writable export: qemu-img resize --shrink and
	// QMP block_resize are refused alike, with QEMU's text, and the image
	// keeps its size.
	t.Run("resize-under-export", func(t *testing.T) {
		args := cat(file("top", "a.raw", ""), export(true))
		var outs, qmpErrs []string
		for _, bin := range []string{qsd, blockdBin} {
			d := startPeer(t, bin, dir, args...)
			out, err := exec.Command("qemu-img", "resize", "-f", "raw", "--shrink", p("a.raw"), "512K").CombinedOutput()
			if err == nil {
				t.Errorf("%s: qemu-img resize --shrink under a writable export succeeded: %s", bin, out)
			}
			outs = append(outs, string(out))
			qmpErrs = append(qmpErrs, d.qmpError(t, "block_resize", map[string]any{"node-name": "top", "size": 2 << 20}))
			if fi, err := os.Stat(p("a.raw")); err != nil || fi.Size() != 1<<20 {
				t.Fatalf("%s: image resized under the export: %v %v", bin, fi, err)
			}
			d.stop()
		}
		want := fmt.Sprintf("qemu-img: Could not open '%s': Failed to get \"resize\" lock\nIs another process using the image [%s]?\n", p("a.raw"), p("a.raw"))
		if outs[0] != want || outs[1] != want {
			t.Errorf("qemu-img resize --shrink:\nqemu-storage-daemon: %q\nblockd:              %q\nwant:                %q", outs[0], outs[1], want)
		}
		if qmpErrs[0] == "" || qmpErrs[0] != qmpErrs[1] {
			t.Errorf("block_resize of an exported node:\nqemu-storage-daemon: %q\nblockd:              %q", qmpErrs[0], qmpErrs[1])
		}
	})
}
