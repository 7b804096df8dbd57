package e2e

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"blockd/internal/testutil"
)

type exportInfo struct {
	ID           string `json:"id"`
	Type         string `json:"type"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// TestNBDOverQMP drives the NBD server and exports from QMP and checks
// them with nbdinfo and qemu-io.
func TestNBDOverQMP(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	d := start(t)
	img := filepath.Join(d.dir, "a.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 4<<20), 0o600)
	sock := filepath.Join(d.dir, "nbd.sock")
	events := d.subscribe()
	d.mustFail("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "f0"}, "NBD server not running")
	d.mustFail("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "path": sock}}, "Parameter 'addr.data' is missing")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.mustFail("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock + "2"}}}, "NBD server already running")
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "f0", "filename": img})
	d.must("blockdev-add", map[string]any{"driver": "raw", "node-name": "ro", "read-only": true, "file": map[string]any{"driver": "file", "filename": img}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "f0", "name": "disk", "description": "a disk", "writable": true})
	d.mustFail("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "f0"}, "Block export id 'e0' is already in use")
	d.mustFail("block-export-add", map[string]any{"type": "nbd", "id": "e1", "node-name": "f0", "name": "disk"}, "NBD server already has export named 'disk'")
	d.mustFail("block-export-add", map[string]any{"type": "nbd", "id": "e1", "node-name": "ro", "writable": true}, "Cannot export read-only node as writable")
	d.must("nbd-server-add", map[string]any{"device": "ro", "name": "old"})
	var exps []exportInfo
	json.Unmarshal(d.must("query-block-exports", nil), &exps)
	if len(exps) != 2 || exps[0].ID != "old" || exps[1].ID != "e0" || exps[1].NodeName != "f0" {
		t.Fatalf("exports: %+v", exps)
	}
	uri := "nbd+unix:///disk?socket=" + sock
	out := testutil.Run(t, "nbdinfo", "--json", uri)
	var info struct {
		Exports []struct {
			Description string `json:"description"`
			Size        int64  `json:"export-size"`
			ReadOnly    bool   `json:"is_read_only"`
			MultiConn   bool   `json:"can_multi_conn"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	if e := info.Exports[0]; e.Description != "a disk" || e.Size != 4<<20 || e.ReadOnly || !e.MultiConn {
		t.Fatalf("nbdinfo: %+v", e)
	}
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", uri)
	if _, err := testutil.RunErr("qemu-io", "-f", "raw", "-r", "-c", "write 0 512", "nbd+unix:///old?socket="+sock); err == nil {
		t.Fatal("write to a read-only export succeeded")
	}

	// A connected client makes safe removal fail; hard removal drops it and
	// the event announces the export is gone.
	testutil.NeedTool(t, "nbdsh")
	hold := exec.Command("nbdsh", "-u", uri, "-c", "print('ready', flush=True)\nimport time\ntime.sleep(30)")
	// nbdsh needs the system python that has the libnbd bindings.
	hold.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	stdout, _ := hold.StdoutPipe()
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	defer hold.Process.Kill()
	line := make([]byte, 6)
	if _, err := io.ReadFull(stdout, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("nbdsh did not connect: %v %q", err, line)
	}
	d.mustFail("block-export-del", map[string]any{"id": "e0"}, "export 'e0' still in use")
	d.must("block-export-del", map[string]any{"id": "e0", "mode": "hard"})
	deadline := time.After(10 * time.Second)
	for got := false; !got; {
		select {
		case ev := <-events:
			if ev.Event == "BLOCK_EXPORT_DELETED" && ev.Data["id"] == "e0" {
				got = true
			}
		case <-deadline:
			t.Fatal("no BLOCK_EXPORT_DELETED for e0")
		}
	}
	d.mustFail("block-export-del", map[string]any{"id": "e0"}, "Export 'e0' is not found")
	d.must("nbd-server-stop", nil)
	d.mustFail("nbd-server-stop", nil, "NBD server not running")
	json.Unmarshal(d.must("query-block-exports", nil), &exps)
	if len(exps) != 0 {
		t.Fatalf("exports after stop: %+v", exps)
	}
	d.must("blockdev-del", map[string]any{"node-name": "f0"})
}
