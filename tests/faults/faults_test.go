// Package faults puts blkdebug filters under file, raw, luks and
// luks-over-raw nodes of a running blockd and checks that every injected
// error reaches NBD clients (blockd's own test client, qemu-io, nbdsh) as
// the right errno, while the daemon keeps serving other requests and other
// clients and never hangs.
package faults

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

var blockdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockd-faults")
	if err != nil {
		panic(err)
	}
	blockdBin, err = harness.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const mib = 1 << 20

// region is one MiB of the export with its own fault.
type region struct {
	mib   int    // client offset in MiB
	rule  string // inject-error entry, without the sector
	op    string // "read", "write", "zero", "trim", "status"
	errno syscall.Errno
	// NBD clients see the errno mapped to NBD's set.
	want syscall.Errno
	// For luks the filter never sees write-zeroes or discard requests:
	// the node writes encrypted zeroes instead, and ignores discards.
	luksOK bool
}

var regions = []region{
	{1, `"iotype":"read","errno":5`, "read", syscall.EIO, syscall.EIO, false},
	{2, `"iotype":"write","errno":28`, "write", syscall.ENOSPC, syscall.ENOSPC, false},
	{3, `"iotype":["read","write"],"errno":1`, "read", syscall.EPERM, syscall.EPERM, false},
	{4, `"iotype":"write","errno":122`, "write", syscall.EDQUOT, syscall.ENOSPC, false},
	{5, `"iotype":"read","errno":12`, "read", syscall.ENOMEM, syscall.ENOMEM, false},
	{6, `"iotype":"read","errno":13`, "read", syscall.EACCES, syscall.EINVAL, false},
	{7, `"iotype":"read","errno":30`, "read", syscall.EROFS, syscall.EPERM, false},
	{8, `"iotype":"read","errno":95`, "read", syscall.ENOTSUP, syscall.ENOTSUP, false},
	{10, `"iotype":"write-zeroes","errno":5`, "zero", syscall.EIO, syscall.EIO, true},
	{11, `"iotype":"discard","errno":5`, "trim", syscall.EIO, syscall.EIO, true},
	{13, `"iotype":"block-status","errno":5`, "status", syscall.EIO, syscall.EIO, true},
}

// slowMiB holds a 3 s delay on reads; healthy MiBs 14-15 carry the
// background traffic.
const (
	slowMiB    = 9
	healthyMiB = 14
	imageMiB   = 16
)

type config struct {
	name string
	luks bool
	// top wraps the blkdebug node definition dbg into the exported tree.
	top func(dbg string) string
}

var configs = []config{
	{"file", false, func(dbg string) string { return dbg }},
	{"raw", false, func(dbg string) string {
		return `{"driver":"raw","node-name":"top","discard":"unmap","file":` + dbg + `}`
	}},
	{"luks", true, func(dbg string) string {
		return `{"driver":"luks","node-name":"top","key-secret":"s0","file":` + dbg + `}`
	}},
	{"luks-over-raw", true, func(dbg string) string {
		return `{"driver":"luks","node-name":"top","key-secret":"s0","file":{"driver":"raw","file":` + dbg + `}}`
	}},
}

// dbgNode returns the blkdebug definition with every region's rule, in
// file coordinates (base is the luks payload offset).
func dbgNode(img string, base int64, flush bool) string {
	var rules []string
	for _, r := range regions {
		rules = append(rules, fmt.Sprintf(`{"event":"none",%s,"sector":%d}`, r.rule, (base+int64(r.mib)*mib)/512))
	}
	rules = append(rules, fmt.Sprintf(`{"iotype":"read","delay-ns":3000000000,"sector":%d}`, (base+slowMiB*mib)/512))
	if flush {
		// The first flush fails, later ones succeed.
		rules = append(rules, `{"iotype":"flush","errno":5,"once":true}`)
	}
	return fmt.Sprintf(`{"driver":"blkdebug","node-name":"dbg","discard":"unmap","image":{"driver":"file","filename":%q,"discard":"unmap"},"inject-error":[%s]}`,
		img, strings.Join(rules, ","))
}

// makeImage writes a fully allocated image (random data, so no read is
// answered from a hole) and, for luks, formats it with cryptsetup.
func makeImage(t *testing.T, dir string, luks bool) (img, pw string, base int64) {
	t.Helper()
	img, pw = filepath.Join(dir, "disk.img"), filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("fault pass"), 0o600)
	size := int64(imageMiB * mib)
	if luks {
		base = 2 * mib
		size += base
	}
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if luks {
		testutil.Run(t, "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000",
			"--align-payload", "4096", "--key-file", pw, img)
	}
	return img, pw, base
}

// background runs verified writes and reads on the healthy MiBs on its own
// connection until stop is closed; it reports the operations done.
func background(t *testing.T, sock string, stop <-chan struct{}) <-chan int {
	done := make(chan int, 1)
	c, err := harness.DialNBD("unix", sock, "disk")
	if err != nil {
		t.Fatal(err)
	}
	c.Timeout = 20 * time.Second
	go func() {
		defer c.Close()
		ops := 0
		buf, got := make([]byte, 4096), make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- ops
				return
			default:
			}
			off := uint64(healthyMiB*mib + (i%512)*4096)
			harness.Fill(buf, uint64(i))
			if err := c.WriteAt(buf, off, i%3 == 0); err != nil {
				t.Errorf("background write at %d: %v", off, err)
				done <- ops
				return
			}
			if err := c.ReadAt(got, off); err != nil || !bytes.Equal(got, buf) {
				t.Errorf("background read at %d: %v (data equal: %v)", off, err, bytes.Equal(got, buf))
				done <- ops
				return
			}
			ops += 2
		}
	}()
	return done
}

// nbdsh runs a Python snippet with nbdsh against uri.
func nbdsh(t *testing.T, uri, script string, extra ...string) string {
	t.Helper()
	testutil.NeedTool(t, "nbdsh")
	args := append(append([]string{}, extra...), "-u", uri, "-c", script)
	cmd := exec.Command("nbdsh", args...)
	// nbdsh needs the system python that has the libnbd bindings.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
	return string(out)
}

func TestErrorPropagation(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "cryptsetup")
	var injected atomic.Int64
	for _, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img, pw, base := makeImage(t, dir, cfg.luks)
			sock := filepath.Join(dir, "nbd.sock")
			tree := cfg.top(dbgNode(img, base, true))
			args := []string{"--object", "secret,id=s0,file=" + pw}
			viaQMP := cfg.name == "luks-over-raw"
			if !viaQMP {
				args = append(args, "--blockdev", tree)
			}
			args = append(args, "--nbd-server", "addr.type=unix,addr.path="+sock, "--log-level", "debug")
			d := harness.StartDaemonIn(t, blockdBin, dir, args...)
			var treeObj map[string]any
			if err := json.Unmarshal([]byte(tree), &treeObj); err != nil {
				t.Fatal(err)
			}
			if viaQMP {
				d.Must("blockdev-add", treeObj)
			}
			d.Must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": treeObj["node-name"], "name": "disk", "writable": true})
			uri := "nbd+unix:///disk?socket=" + sock

			stop := make(chan struct{})
			bg := background(t, sock, stop)

			c, err := harness.DialNBD("unix", sock, "disk")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Timeout = 20 * time.Second
			if c.Size != imageMiB*mib {
				t.Fatalf("export size %d", c.Size)
			}
			// The first flush fails (once), the next succeeds.
			if err := c.Flush(); harness.ErrnoOf(err) != syscall.EIO {
				t.Errorf("first flush: %v, want EIO", err)
			}
			if err := c.Flush(); err != nil {
				t.Errorf("second flush: %v", err)
			}
			injected.Add(1)
			buf := make([]byte, 4096)
			for _, r := range regions {
				off := uint64(r.mib * mib)
				var err error
				switch r.op {
				case "read":
					err = c.ReadAt(buf, off)
				case "write":
					err = c.WriteAt(buf, off, false)
				case "zero":
					err = c.Zero(off, 4096, false)
				case "trim":
					err = c.Trim(off, 4096)
				case "status":
					continue // needs a meta context: nbdsh below
				}
				want := r.want
				if cfg.luks && r.luksOK {
					want = 0
				}
				if got := harness.ErrnoOf(err); got != want || (want == 0 && err != nil) {
					t.Errorf("%s at %d MiB (errno %d injected): got %v, want %v", r.op, r.mib, r.errno, err, want)
				}
				if want != 0 {
					injected.Add(1)
				}
				// The same connection goes on serving: a healthy read.
				if err := c.ReadAt(buf, healthyMiB*mib+mib/2); err != nil {
					t.Fatalf("healthy read after a fault: %v", err)
				}
			}
			// Region 3 fails writes too.
			if err := c.WriteAt(buf, 3*mib, true); harness.ErrnoOf(err) != syscall.EPERM {
				t.Errorf("write at 3 MiB: %v, want EPERM", err)
			}

			// A slow request does not hold up the others on its connection.
			slowDone := make(chan error, 1)
			start := time.Now()
			go func() { slowDone <- c.ReadAt(make([]byte, 4096), slowMiB*mib) }()
			time.Sleep(50 * time.Millisecond)
			for i := 0; i < 50; i++ {
				if err := c.ReadAt(buf, uint64(healthyMiB*mib+i*4096)); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case err := <-slowDone:
				t.Errorf("the slow read (%v) finished before 50 fast reads on its connection, after %v", err, time.Since(start))
			default:
			}
			if err := <-slowDone; err != nil {
				t.Errorf("slow read: %v", err)
			}
			if el := time.Since(start); el < 3*time.Second {
				t.Errorf("slow read took %v, want at least 3s", el)
			}

			// qemu-io: one process, one command per region.
			cmds := []struct{ c, want string }{
				{"read 1M 4k", "read failed: Input/output error"},
				{"write 2M 4k", "write failed: No space left on device"},
				{"read 3M 4k", "read failed: Operation not permitted"},
				{"write 3M 4k", "write failed: Operation not permitted"},
				{"write 4M 4k", "write failed: No space left on device"},
				{"read 5M 4k", "read failed: Cannot allocate memory"},
				{"read 6M 4k", "read failed: Invalid argument"},
				{"read 7M 4k", "read failed: Operation not permitted"},
				{"read 8M 4k", "read failed: Operation not supported"},
				{"read 15M 4k", "read 4096/4096 bytes at offset 15728640"},
			}
			qargs := []string{"-f", "raw"}
			for _, x := range cmds {
				qargs = append(qargs, "-c", x.c)
			}
			out, _ := testutil.RunErr("qemu-io", append(qargs, uri)...)
			for _, x := range cmds {
				if !strings.Contains(out, x.want) {
					t.Errorf("qemu-io %q: want %q in\n%s", x.c, x.want, out)
				}
			}
			injected.Add(9)

			// nbdsh (libnbd): exact errnos, including block status.
			script := `
import errno
def t(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
M = 1 << 20
t("read1", lambda: h.pread(4096, 1*M))
t("write2", lambda: h.pwrite(b"x"*4096, 2*M))
t("read6", lambda: h.pread(4096, 6*M))
t("zero10", lambda: h.zero(4096, 10*M))
t("trim11", lambda: h.trim(4096, 11*M))
t("status13", lambda: h.block_status(4096, 13*M, lambda *a: 0))
t("read15", lambda: h.pread(4096, 15*M))
`
			out = nbdsh(t, uri, script, "--base-allocation")
			okIfLuks := map[bool]string{true: "ok", false: "EIO"}[cfg.luks]
			for _, want := range []string{"read1 EIO", "write2 ENOSPC", "read6 EINVAL",
				"zero10 " + okIfLuks, "trim11 " + okIfLuks, "status13 " + okIfLuks, "read15 ok"} {
				if !strings.Contains(out, want+"\n") {
					t.Errorf("nbdsh: want %q in\n%s", want, out)
				}
			}
			injected.Add(3)

			close(stop)
			if ops := <-bg; ops == 0 {
				t.Error("the background client did nothing")
			}
			if _, err := d.Mon.Exec("query-version", nil); err != nil {
				t.Fatalf("monitor after the faults: %v", err)
			}
			if d.Exited() {
				t.Fatalf("blockd exited:\n%s", d.Logs())
			}
		})
	}
	t.Cleanup(func() { t.Logf("faults injected and checked: %d", injected.Load()) })
}

// TestHeaderFaults fails reads and writes of a detached LUKS header. A
// failed open leaves no nodes behind. A keyslot update is failed at each of
// its header writes in turn (blkdebug's after): every time the job reports
// the error, the header stays valid for cryptsetup with the original
// passphrase, and the node keeps serving data.
func TestHeaderFaults(t *testing.T) {
	testutil.NeedTool(t, "cryptsetup")
	for _, version := range []string{"luks1", "luks2"} {
		t.Run(version, func(t *testing.T) {
			t.Parallel()
			headerFaults(t, version)
		})
	}
}

func headerFaults(t *testing.T, version string) {
	dir := t.TempDir()
	data, hdr, pw, pw2 := filepath.Join(dir, "data"), filepath.Join(dir, "hdr"), filepath.Join(dir, "pw"), filepath.Join(dir, "pw2")
	os.WriteFile(pw, []byte("header pass"), 0o600)
	os.WriteFile(pw2, []byte("second pass"), 0o600)
	os.WriteFile(data, make([]byte, 4*mib), 0o600)
	args := []string{"luksFormat", "-q", "--type", version, "--pbkdf-force-iterations", "1000", "--header", hdr, "--key-file", pw, data}
	if version == "luks2" {
		args = append(args, "--pbkdf", "pbkdf2")
	}
	testutil.Run(t, "cryptsetup", args...)
	sock := filepath.Join(dir, "nbd.sock")
	d := harness.StartDaemonIn(t, blockdBin, dir, "--object", "secret,id=s0,file="+pw, "--object", "secret,id=s1,file="+pw2,
		"--nbd-server", "addr.type=unix,addr.path="+sock)
	node := func(name, rules string) map[string]any {
		var m map[string]any
		js := fmt.Sprintf(`{"driver":"luks","node-name":%q,"key-secret":"s0","file":{"driver":"file","filename":%q},
			"header":{"driver":"blkdebug","image":{"driver":"file","filename":%q},"inject-error":[%s]}}`, name, data, hdr, rules)
		if err := json.Unmarshal([]byte(js), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	d.MustFail("blockdev-add", node("bad", `{"iotype":"read","errno":5}`), "input/output error")
	var nodes []map[string]any
	json.Unmarshal(d.Must("query-named-block-nodes", map[string]any{"flat": true}), &nodes)
	if len(nodes) != 0 {
		t.Fatalf("nodes left after a failed open: %v", nodes)
	}
	checkHeader := func(step int) (second bool) {
		t.Helper()
		b, _ := os.ReadFile(hdr)
		cp := filepath.Join(dir, fmt.Sprintf("hdr.%d", step))
		os.WriteFile(cp, b, 0o600)
		testutil.Run(t, "cryptsetup", "luksDump", cp)
		testutil.Run(t, "cryptsetup", "open", "--test-passphrase", "--header", cp, "--key-file", pw, data)
		_, err := testutil.RunErr("cryptsetup", "open", "--test-passphrase", "--header", cp, "--key-file", pw2, data)
		return err == nil
	}
	payload := bytes.Repeat([]byte("still serving "), 100)[:1024]
	for after := 0; ; after++ {
		name := fmt.Sprintf("disk%d", after)
		d.Must("blockdev-add", node(name, fmt.Sprintf(`{"iotype":"write","errno":28,"after":%d}`, after)))
		id := fmt.Sprintf("e%d", after)
		d.Must("block-export-add", map[string]any{"type": "nbd", "id": id, "node-name": name, "name": "disk", "writable": true})
		e, err := harness.RunJob(d.Mon, "x-blockdev-amend", map[string]any{"job-id": "a1", "node-name": name,
			"options": map[string]any{"driver": "luks", "state": "active", "new-secret": "s1", "keyslot": 3, "iter-time": 10, "pbkdf": "pbkdf2"}}, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		second := checkHeader(after)
		c, err := harness.DialNBD("unix", sock, "disk")
		if err != nil {
			t.Fatal(err)
		}
		if err := c.WriteAt(payload, uint64(after)*4096, true); err != nil {
			t.Fatalf("write after a failed amend: %v", err)
		}
		if got, err := c.Read(uint64(after)*4096, 1024); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("read back after a failed amend: %v", err)
		}
		c.Close()
		d.Must("block-export-del", map[string]any{"id": id, "mode": "hard"})
		if _, err := d.Mon.WaitEvent("BLOCK_EXPORT_DELETED", func(ev harness.Event) bool { return ev.Data["id"] == id }, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); ; {
			_, err := d.Mon.Exec("blockdev-del", map[string]any{"node-name": name})
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal(err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if e == "" {
			if !second {
				t.Fatal("the amend succeeded but the new passphrase does not open the header")
			}
			t.Logf("%s: keyslot update failed at each of its first %d header writes; header valid every time", version, after)
			break
		}
		if !strings.Contains(strings.ToLower(e), "no space left on device") {
			t.Fatalf("write %d failing: job error %q", after, e)
		}
		if second {
			// Some header writes made it: the slot may be usable (cryptsetup
			// recovers a LUKS2 header from its good copy). Erase it again
			// so the next round starts from the same state.
			t.Logf("%s: failure at write %d left the new keyslot usable", version, after)
			testutil.Run(t, "cryptsetup", "luksKillSlot", "-q", "--header", hdr, data, "3")
		}
		if after > 64 {
			t.Fatal("the amend never succeeded")
		}
	}
}

// TestNoBlockIOErrorEvent runs the same faulty graph in qemu-storage-daemon
// and blockd: both report the write error to qemu-io with the same errno
// and neither emits BLOCK_IO_ERROR, which QEMU raises only for guest
// devices with rerror/werror policies (blk_error_action), never for
// exports.
func TestNoBlockIOErrorEvent(t *testing.T) {
	testutil.NeedTool(t, "qemu-io")
	qsd := testutil.NeedTool(t, "qemu-storage-daemon")
	for _, daemon := range []string{"qemu-storage-daemon", "blockd"} {
		t.Run(daemon, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk.img")
			data := make([]byte, 4*mib)
			rand.Read(data)
			os.WriteFile(img, data, 0o600)
			sock := filepath.Join(dir, "nbd.sock")
			bd := fmt.Sprintf(`{"driver":"blkdebug","node-name":"dbg","image":{"driver":"file","filename":%q},"inject-error":[
				{"event":"none","iotype":"write","sector":2048,"errno":28},{"event":"none","iotype":"write","sector":4096,"errno":5}]}`, img)
			args := []string{"--blockdev", bd, "--nbd-server", "addr.type=unix,addr.path=" + sock,
				"--export", "type=nbd,id=e0,node-name=dbg,name=disk,writable=on"}
			bin := blockdBin
			if daemon != "blockd" {
				bin = qsd
			}
			d := harness.StartDaemonIn(t, bin, dir, args...)
			uri := "nbd+unix:///disk?socket=" + sock
			out, _ := testutil.RunErr("qemu-io", "-f", "raw", "-c", "write 1M 4k", "-c", "write 2M 4k", "-c", "write 3M 4k", uri)
			for _, want := range []string{"write failed: No space left on device", "write failed: Input/output error", "wrote 4096/4096 bytes at offset 3145728"} {
				if !strings.Contains(out, want) {
					t.Errorf("qemu-io: want %q in\n%s", want, out)
				}
			}
			// Events go out before later replies on the same monitor.
			d.Must("query-version", nil)
			time.Sleep(200 * time.Millisecond)
			for _, ev := range d.Mon.Events() {
				if ev.Name == "BLOCK_IO_ERROR" {
					t.Errorf("%s emitted %s", daemon, ev.Raw)
				}
			}
		})
	}
}

// TestQcow2WriteFaults fails the n-th write a qcow2 node makes to its file
// (data, L2 tables, refcount blocks, L1, header), for n = 0, 1, 2, ...
// while a client allocates clusters. Every time the client gets the errno
// (ENOSPC), data acknowledged before the fault reads back, the node can be
// closed, and qemu-img check finds no corruption (leaked clusters are
// allowed, as after a crash).
func TestQcow2WriteFaults(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	d := harness.StartDaemonIn(t, blockdBin, dir, "--nbd-server", "addr.type=unix,addr.path="+sock)
	leaks := 0
	for after := 0; ; after++ {
		img := filepath.Join(dir, fmt.Sprintf("q%d.qcow2", after))
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
		name, id := fmt.Sprintf("q%d", after), fmt.Sprintf("e%d", after)
		var def map[string]any
		js := fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"file":{"driver":"blkdebug","image":{"driver":"file","filename":%q},
			"inject-error":[{"iotype":"write","after":%d,"errno":28,"once":true}]}}`, name, img, after)
		if err := json.Unmarshal([]byte(js), &def); err != nil {
			t.Fatal(err)
		}
		d.Must("blockdev-add", def)
		d.Must("block-export-add", map[string]any{"type": "nbd", "id": id, "node-name": name, "name": id, "writable": true})
		c, err := harness.DialNBD("unix", sock, id)
		if err != nil {
			t.Fatal(err)
		}
		c.Timeout = 20 * time.Second
		var acked [][2]uint64
		failed := false
		buf := make([]byte, 64<<10)
		for i, off := range []uint64{0, 1 << 20, 4 << 20, 64 << 10, 6 << 20} {
			harness.Fill(buf, uint64(after*10+i))
			err := c.WriteAt(buf, off, i%2 == 0)
			if err != nil {
				failed = true
				if e := harness.ErrnoOf(err); e != syscall.ENOSPC {
					t.Errorf("write %d failing at file write %d: %v, want ENOSPC", i, after, err)
				}
				continue
			}
			acked = append(acked, [2]uint64{off, uint64(after*10 + i)})
		}
		if err := c.Flush(); err != nil && harness.ErrnoOf(err) != syscall.ENOSPC {
			t.Errorf("flush after file write %d failed: %v", after, err)
		}
		for _, a := range acked {
			harness.Fill(buf, a[1])
			got, err := c.Read(a[0], 64<<10)
			if err != nil || !bytes.Equal(got, buf) {
				t.Errorf("file write %d failed: acknowledged data at %d does not read back (%v)", after, a[0], err)
			}
		}
		c.Close()
		if err := harness.DeleteExport(d.Mon, id, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		d.Must("blockdev-del", map[string]any{"node-name": name})
		out, _ := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", img).Output()
		var res struct {
			Corruptions int `json:"corruptions"`
			Leaks       int `json:"leaks"`
			CheckErrors int `json:"check-errors"`
		}
		if err := json.Unmarshal(out, &res); err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
			t.Errorf("file write %d failed: qemu-img check: %v\n%s", after, err, out)
		}
		leaks += res.Leaks
		if !failed {
			t.Logf("a failure at each of the first %d file writes of the workload was survived; %d clusters leaked in all", after, leaks)
			break
		}
		if after > 200 {
			t.Fatal("the workload never completed")
		}
	}
}
