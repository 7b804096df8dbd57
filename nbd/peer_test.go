package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/tlscreds/tlstest"
)

// Peer tests drive the server with real NBD clients. They skip when a tool
// is missing, unless CI=true.

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// peerServer serves exports on a unix socket and returns its path.
func peerServer(t *testing.T, opts Options, exports ...*Export) (*Server, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdpeer")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := startServerListener(t, opts, l, exports...)
	return s, sock
}

func startServerListener(t *testing.T, opts Options, l net.Listener, exports ...*Export) (*Server, net.Listener) {
	t.Helper()
	s := NewServer(opts)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, l
}

func uri(sock, export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

// run runs a command with a timeout and returns its combined output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runErr(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = t.TempDir() // fio leaves verify state files behind
	// nbdsh needs the system python that has the libnbd bindings.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"), "LIBNBD_DEBUG=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		return out.String(), fmt.Errorf("timed out")
	}
}

// sparseImage returns size bytes of random data with some zero regions.
func sparseImage(t *testing.T, size int) []byte {
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < size; off += 1 << 20 {
		clear(b[off : off+256<<10]) // a zero quarter in every MiB
	}
	clear(b[size/2 : size/2+2<<20])
	return b
}

func TestPeerNbdinfo(t *testing.T) {
	needTool(t, "nbdinfo")
	sn := &sparseNode{MemNode: graph.NewMemNode(8 << 20)}
	copy(sn.Bytes()[1<<20:], bytes.Repeat([]byte{1}, 128<<10))
	ro := &Export{Name: "ro", Description: "read-only disk", Node: graph.NewMemNode(1 << 20), ReadOnly: true}
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: sn}, ro)

	out := run(t, "nbdinfo", "--list", "--json", uri(sock, ""))
	var list struct {
		Protocol string `json:"protocol"`
		TLS      bool   `json:"TLS"`
		Exports  []struct {
			Name         string   `json:"export-name"`
			Description  string   `json:"description"`
			Size         int64    `json:"export-size"`
			ReadOnly     bool     `json:"is_read_only"`
			CanFlush     bool     `json:"can_flush"`
			CanFUA       bool     `json:"can_fua"`
			CanTrim      bool     `json:"can_trim"`
			CanZero      bool     `json:"can_zero"`
			CanFastZero  bool     `json:"can_fast_zero"`
			CanMultiConn bool     `json:"can_multi_conn"`
			CanCache     bool     `json:"can_cache"`
			CanDF        bool     `json:"can_df"`
			MinBlock     int      `json:"block_size_minimum"`
			PrefBlock    int      `json:"block_size_preferred"`
			MaxBlock     int      `json:"block_size_maximum"`
			Contexts     []string `json:"contexts"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if list.Protocol != "newstyle-fixed" || len(list.Exports) != 2 {
		t.Fatalf("list: %s", out)
	}
	d, r := list.Exports[0], list.Exports[1]
	if d.Name != "disk" || d.Size != 8<<20 || d.ReadOnly || !d.CanFlush || !d.CanFUA || !d.CanTrim || !d.CanZero ||
		!d.CanFastZero || !d.CanMultiConn || !d.CanCache || !d.CanDF || d.MinBlock != 1 || d.PrefBlock != 4096 ||
		d.MaxBlock != 32<<20 || len(d.Contexts) != 1 || d.Contexts[0] != "base:allocation" {
		t.Fatalf("disk: %+v", d)
	}
	if r.Name != "ro" || r.Description != "read-only disk" || !r.ReadOnly || r.CanTrim || r.CanZero || r.Size != 1<<20 {
		t.Fatalf("ro: %+v", r)
	}

	if out := strings.TrimSpace(run(t, "nbdinfo", "--size", uri(sock, "disk"))); out != "8388608" {
		t.Fatalf("size %q", out)
	}
	out = run(t, "nbdinfo", "--map", uri(sock, "disk"))
	want := "         0     1048576    3  hole,zero\n   1048576       65536    0  data\n   1114112       65536    0  data\n   1179648     7208960    3  hole,zero\n"
	if normalizeMap(out) != normalizeMap(want) {
		t.Fatalf("map:\n%s\nwant:\n%s", out, want)
	}
	if out := run(t, "nbdinfo", "--map", "--totals", uri(sock, "disk")); !strings.Contains(out, "131072") {
		t.Fatalf("totals: %s", out)
	}
	if _, err := runErr(t, "nbdinfo", uri(sock, "nope")); err == nil {
		t.Fatal("nbdinfo of an unknown export succeeded")
	}
}

// normalizeMap merges adjacent entries of the same type and squeezes
// whitespace, so that equivalent maps compare equal.
func normalizeMap(s string) string {
	type ent struct {
		off, n int64
		typ    string
	}
	var es []ent
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		var e ent
		var desc string
		fmt.Sscan(line, &e.off, &e.n, &e.typ, &desc)
		if k := len(es); k > 0 && es[k-1].typ == e.typ && es[k-1].off+es[k-1].n == e.off {
			es[k-1].n += e.n
			continue
		}
		es = append(es, e)
	}
	return fmt.Sprint(es)
}

func TestPeerNbdcopy(t *testing.T) {
	needTool(t, "nbdcopy")
	const size = 32 << 20
	img := sparseImage(t, size)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, img, 0o644); err != nil {
		t.Fatal(err)
	}
	sn := &sparseNode{MemNode: graph.NewMemNode(size)}
	copy(sn.Bytes(), pattern(size, 77)) // must be overwritten, zero regions included
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: sn})

	// file -> NBD (multi-conn, zeroing, flush)
	run(t, "nbdcopy", "--flush", "--connections=4", "--requests=32", src, uri(sock, "disk"))
	if !bytes.Equal(sn.Bytes(), img) {
		t.Fatal("export differs from source after nbdcopy file -> nbd")
	}
	// NBD -> file (uses block status for the holes)
	dst := filepath.Join(dir, "dst.raw")
	run(t, "nbdcopy", uri(sock, "disk"), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("copy differs from export after nbdcopy nbd -> file")
	}
	// NBD -> NBD between two exports of the same server.
	sn2 := &sparseNode{MemNode: graph.NewMemNode(size)}
	_, sock2 := peerServer(t, Options{}, &Export{Name: "b", Node: sn2})
	run(t, "nbdcopy", uri(sock, "disk"), uri(sock2, "b"))
	if !bytes.Equal(sn2.Bytes(), img) {
		t.Fatal("nbd -> nbd copy differs")
	}
	// nbdcopy to null: reads everything with structured replies.
	run(t, "nbdcopy", uri(sock, "disk"), "null:")
}

func TestPeerQemuImg(t *testing.T) {
	needTool(t, "qemu-img")
	const size = 16 << 20
	img := sparseImage(t, size)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, img, 0o644); err != nil {
		t.Fatal(err)
	}
	m := graph.NewMemNode(size)
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: m})
	u := uri(sock, "disk")

	if out := run(t, "qemu-img", "info", "--output=json", u); !strings.Contains(out, `"virtual-size": 16777216`) {
		t.Fatalf("info: %s", out)
	}
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, u)
	if !bytes.Equal(m.Bytes(), img) {
		t.Fatal("export differs after qemu-img convert")
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", u, src)
	// A difference is found.
	flip := func() {
		var b [1]byte
		m.ReadAt(context.Background(), b[:], size-1)
		b[0] ^= 0xff
		m.WriteAt(context.Background(), b[:], size-1, 0)
	}
	flip()
	out, err := runErr(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", u, src)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("compare of different images: %v\n%s", err, out)
	}
	flip()
	dst := filepath.Join(dir, "dst.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", u, dst)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", dst, src)
}

func TestPeerQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	m := graph.NewMemNode(8 << 20)
	ro := &Export{Name: "ro", Node: graph.NewMemNode(1 << 20), ReadOnly: true}
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: m}, ro)
	u := uri(sock, "disk")
	out := run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -P 0xcd -f 1M 64k", // FUA
		"-c", "write -z 2M 1M",
		"-c", "write -z -u 3M 64k", // may unmap
		"-c", "discard 4M 64k",
		"-c", "flush",
		"-c", "aio_write -P 0x11 5M 4k",
		"-c", "aio_write -P 0x22 5246976 4k",
		"-c", "aio_flush",
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0xcd 1M 64k",
		"-c", "read -P 0 2M 1M",
		"-c", "read -P 0x11 5M 4k",
		"-c", "read -P 0x22 5246976 4k",
		"-c", "read -v 8388096 512",
		u)
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	if m.Bytes()[0] != 0xab || m.Bytes()[1<<20] != 0xcd || m.Bytes()[5<<20] != 0x11 {
		t.Fatal("data not in the node")
	}
	// Read-only export: reads work, writes fail with EPERM.
	out = run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 64k", uri(sock, "ro"))
	if strings.Contains(out, "fail") {
		t.Fatalf("ro read: %s", out)
	}
	out, _ = runErr(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock, "ro"))
	if !strings.Contains(out, "read-only") && !strings.Contains(out, "Operation not permitted") && !strings.Contains(out, "Permission denied") {
		t.Fatalf("write to read-only export: %s", out)
	}
	// Out of range.
	out, _ = runErr(t, "qemu-io", "-f", "raw", "-c", "read 8M 4k", u)
	if !strings.Contains(out, "Input/output error") && !strings.Contains(out, "Invalid argument") && !strings.Contains(out, "out of range") {
		t.Fatalf("read past end: %s", out)
	}
}

func TestPeerFio(t *testing.T) {
	needTool(t, "fio")
	if out, _ := runErr(t, "fio", "--enghelp=nbd"); strings.Contains(out, "No such") || strings.Contains(out, "not loadable") {
		t.Skip("fio without the nbd engine")
	}
	const jobs, per = 4, 16 << 20
	m := graph.NewMemNode(jobs * per)
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: m})
	out := run(t, "fio", "--name=nbd", "--ioengine=nbd", "--uri="+uri(sock, "disk"),
		"--rw=randrw", "--bs=4k", "--iodepth=32", fmt.Sprintf("--numjobs=%d", jobs),
		fmt.Sprintf("--size=%d", per), fmt.Sprintf("--offset_increment=%d", per),
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
		"--output-format=json")
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOPS  float64 `json:"iops"`
				Bytes int64   `json:"io_bytes"`
			} `json:"read"`
			Write struct {
				IOPS  float64 `json:"iops"`
				Bytes int64   `json:"io_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	i := strings.Index(out, "{")
	if i < 0 || json.Unmarshal([]byte(out[i:]), &res) != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output:\n%s", out)
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.Bytes == 0 || j.Read.Bytes == 0 {
		t.Fatalf("fio job: %+v", j)
	}
	t.Logf("fio randrw 4k qd32 x%d with crc32c verify: read %.0f IOPS, write %.0f IOPS", jobs, j.Read.IOPS, j.Write.IOPS)
}

// TestPeerNbdsh covers edge cases through libnbd's Python bindings.
func TestPeerNbdsh(t *testing.T) {
	needTool(t, "nbdsh")
	sn := &sparseNode{MemNode: graph.NewMemNode(4 << 20)}
	ro := &Export{Name: "ro", Node: graph.NewMemNode(1 << 20), ReadOnly: true}
	_, sock := peerServer(t, Options{}, &Export{Name: "disk", Node: sn}, ro)
	script := `
import errno, nbd
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_df() and h.can_fast_zero() and h.can_multi_conn() and h.can_cache()
size = h.get_size()
assert size == 4 << 20

# Writes, FUA, reads with structured chunks (data and holes).
h.pwrite(b"\x55" * 65536, 65536, nbd.CMD_FLAG_FUA)
chunks = []
def cb(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(1 << 20, 0, cb)
assert buf[65536:131072] == b"\x55" * 65536 and buf[:65536] == bytes(65536)
kinds = [(o, n, s) for (o, n, s) in chunks]
assert (0, 65536, nbd.READ_HOLE) in kinds, kinds
assert (65536, 65536, nbd.READ_DATA) in kinds, kinds
# DF: a single data chunk.
chunks.clear()
h.pread_structured(1 << 20, 0, cb, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks

# Block status.
ents = []
def ecb(meta, offset, entries, err):
    assert meta == nbd.CONTEXT_BASE_ALLOCATION
    ents.extend(entries)
h.block_status(size, 0, ecb)
assert ents[:6] == [65536, 3, 65536, 0, size - 131072, 3], ents
ents.clear()
h.block_status(size, 0, ecb, nbd.CMD_FLAG_REQ_ONE)
assert ents == [65536, 3], ents

# Zero (with and without holes, fast), trim, cache, flush.
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 65536) == bytes(65536)
h.pwrite(b"\x66" * 4096, 0)
h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 0) == bytes(4096)
h.trim(65536, 0, nbd.CMD_FLAG_FUA)
h.cache(1 << 20, 0)
h.flush()

# Errors, with libnbd's own checks disabled.
h.set_strict_mode(0)
for f in [lambda: h.pread(4096, size), lambda: h.pwrite(b"x" * 4096, size - 10), lambda: h.block_status(10, size, ecb)]:
    try:
        f()
        raise AssertionError("no error")
    except nbd.Error as e:
        assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
try:
    h.pread(4096, 0, 1 << 9)   # unknown flag
    raise AssertionError("no error")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(4, 65536 * 2) == bytes(4)
h.shutdown()

r = nbd.NBD()
r.connect_uri(URI_RO)
assert r.is_read_only()
r.set_strict_mode(0)
for f in [lambda: r.pwrite(b"x", 0), lambda: r.zero(512, 0), lambda: r.trim(512, 0)]:
    try:
        f()
        raise AssertionError("no error")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
r.shutdown()

# Old-style negotiation paths libnbd can select.
o = nbd.NBD()
o.set_request_structured_replies(False)
o.set_opt_mode(True)
o.connect_uri(URI)
names = []
o.opt_list(lambda name, desc: names.append(name) or 0)
assert sorted(names) == ["disk", "ro"], names
o.opt_info()
assert o.get_size() == size
o.opt_go()
assert not o.get_structured_replies_negotiated()
assert o.pread(4, 65536 * 2) == bytes(4)
o.shutdown()
print("ok")
`
	script = strings.NewReplacer("URI_RO", fmt.Sprintf("%q", uri(sock, "ro")), "URI", fmt.Sprintf("%q", uri(sock, "disk"))).Replace(script)
	if out := run(t, "nbdsh", "-c", script); !strings.Contains(out, "ok") {
		t.Fatalf("nbdsh: %s", out)
	}
}

func TestPeerTLS(t *testing.T) {
	needTool(t, "nbdinfo")
	dir := t.TempDir()
	if err := tlstest.Generate(dir, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	srvCfg, _ := tlsFixtureDir(t, dir, true)
	m := graph.NewMemNode(4 << 20)
	_, sock := peerServer(t, Options{TLSConfig: srvCfg}, &Export{Name: "disk", Node: m})
	tlsURI := "nbds+unix:///disk?socket=" + sock + "&tls-certificates=" + dir

	if out := strings.TrimSpace(run(t, "nbdinfo", "--size", tlsURI)); out != "4194304" {
		t.Fatalf("size over TLS: %q", out)
	}
	out := run(t, "nbdinfo", "--json", tlsURI)
	if !strings.Contains(out, `"TLS": true`) {
		t.Fatalf("nbdinfo: %s", out)
	}
	// Without TLS the server refuses.
	if out, err := runErr(t, "nbdinfo", uri(sock, "disk")); err == nil {
		t.Fatalf("plain client accepted: %s", out)
	}
	// With certificates from another CA the handshake fails.
	other := t.TempDir()
	if err := tlstest.Generate(other, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	if out, err := runErr(t, "nbdinfo", "nbds+unix:///disk?socket="+sock+"&tls-certificates="+other); err == nil {
		t.Fatalf("client with a foreign CA accepted: %s", out)
	}
	// Without a client certificate (verify-peer on) the handshake fails.
	nocert := t.TempDir()
	ca, _ := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	os.WriteFile(filepath.Join(nocert, "ca-cert.pem"), ca, 0o644)
	if out, err := runErr(t, "nbdinfo", "nbds+unix:///disk?socket="+sock+"&tls-certificates="+nocert); err == nil {
		t.Fatalf("client without a certificate accepted: %s", out)
	}

	if _, err := exec.LookPath("qemu-io"); err == nil {
		obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + dir
		img := "driver=nbd,server.type=unix,server.path=" + sock + ",export=disk,tls-creds=tls0,tls-hostname=localhost"
		out := run(t, "qemu-io", "--object", obj, "--image-opts",
			"-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", img)
		if strings.Contains(out, "fail") {
			t.Fatalf("qemu-io over TLS: %s", out)
		}
		if m.Bytes()[1<<20-1] != 0x5a {
			t.Fatal("TLS write not in the node")
		}
		out = run(t, "qemu-img", "info", "--object", obj, "--image-opts", img)
		if !strings.Contains(out, "virtual size: 4 MiB") {
			t.Fatalf("qemu-img info over TLS: %s", out)
		}
		if out, err := runErr(t, "qemu-img", "info", uri(sock, "disk")); err == nil {
			t.Fatalf("qemu-img without TLS accepted: %s", out)
		}
	}
}
