package qcow2_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/qapi"
	"blockd/internal/testutil"
)

// qsdImage opens a node in qemu-storage-daemon and returns the "image"
// member of its query-named-block-nodes entry, re-encoded the way blockd
// encodes (QDict order).
func qsdImage(t *testing.T, blockdev string, objects ...string) string {
	t.Helper()
	testutil.NeedTool(t, "qemu-storage-daemon")
	dir := t.TempDir()
	sock := filepath.Join(dir, "qmp.sock")
	args := []string{"--chardev", "socket,id=c,path=" + sock + ",server=on,wait=off", "--monitor", "c"}
	for _, o := range objects {
		args = append(args, "--object", o)
	}
	args = append(args, "--blockdev", blockdev)
	cmd := exec.Command("qemu-storage-daemon", args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var conn net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	recv := func() map[string]any {
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				t.Fatal(err)
			}
			d := json.NewDecoder(strings.NewReader(string(line)))
			d.UseNumber()
			var v map[string]any
			if err := d.Decode(&v); err != nil {
				t.Fatal(err)
			}
			if _, ev := v["event"]; !ev {
				return v
			}
		}
	}
	recv()
	fmt.Fprintln(conn, `{"execute":"qmp_capabilities"}`)
	recv()
	fmt.Fprintln(conn, `{"execute":"query-named-block-nodes","arguments":{"flat":true}}`)
	res := recv()
	for _, n := range res["return"].([]any) {
		m := n.(map[string]any)
		if m["node-name"] == "img" {
			return string(qapi.Marshal(m["image"]))
		}
	}
	t.Fatalf("no node img in %v", res)
	return ""
}

// TestQueryMatchesQSD compares the image information of qcow2 nodes with
// what qemu-storage-daemon 7.2 reports for the same images.
func TestQueryMatchesQSD(t *testing.T) {
	dir := t.TempDir()
	sec := qemuSecret(t)
	mk := func(name string, args ...string) string {
		p := filepath.Join(dir, name)
		qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, args...), p, "8M")...)
		return p
	}
	encrypted := filepath.Join(dir, "e.qcow2")
	qemuEncrypted(t, encrypted)
	snaps := mk("s.qcow2")
	qemuImg(t, "snapshot", "-c", "first", snaps)
	qemuIO(t, "-c", "write 0 64k", snaps)
	qemuImg(t, "snapshot", "-c", "second", snaps)
	cases := []struct {
		name, path, extra string
		objects           []string
	}{
		{"v3", mk("v3.qcow2"), ``, nil},
		{"v2", mk("v2.qcow2", "-o", "compat=0.10"), ``, nil},
		{"features", mk("f.qcow2", "-o", "extended_l2=on,lazy_refcounts=on,refcount_bits=64,compression_type=zstd,cluster_size=128k"), ``, nil},
		{"datafile", mk("d.qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw")+",data_file_raw=on"), ``, nil},
		{"backing-null", mk("b.qcow2", "-b", filepath.Join(dir, "v3.qcow2"), "-F", "qcow2"), `,"backing":null`, nil},
		{"snapshots", snaps, ``, nil},
		{"encrypted", encrypted, `,"encrypt":{"format":"luks","key-secret":"s0"}`, []string{sec}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bd := fmt.Sprintf(`{"driver":"qcow2","node-name":"img","read-only":true,"file":{"driver":"file","filename":%q}%s}`, c.path, c.extra)
			want := qsdImage(t, bd, c.objects...)
			g, _ := newGraph(t)
			bd = strings.ReplaceAll(bd, `"key-secret":"s0"`, `"key-secret":"sec0"`)
			add(t, g, bd)
			got := string(qapi.Marshal(g.Lookup("img").ImageInfo(false)))
			got = strings.ReplaceAll(got, `sec0`, `s0`)
			if got != want {
				t.Fatalf("image info differs\n blockd: %s\n qsd:    %s", got, want)
			}
		})
	}
}
