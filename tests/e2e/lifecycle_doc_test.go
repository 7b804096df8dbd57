package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/tests/harness"
)

// TestLifecycleDoc runs docs/lifecycle.md against blockd: every "->"
// command in its QMP blocks must succeed, in order, and every "<-" event
// must arrive (matched on its name and the data members the document
// shows, and without an error member), with /var/lib/blockd replaced by a
// temporary directory. Data written through the export once it exists is
// read back through it at the end.
func TestLifecycleDoc(t *testing.T) {
	f, err := os.Open(filepath.Join("..", "..", "docs", "lifecycle.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := start(t)
	events := d.subscribe()
	dir := d.dir
	ran := 0
	var data []byte
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.ReplaceAll(sc.Text(), "/var/lib/blockd", dir)
		switch {
		case strings.HasPrefix(line, "-> "):
			var req struct {
				Execute   string         `json:"execute"`
				Arguments map[string]any `json:"arguments"`
			}
			if err := json.Unmarshal([]byte(line[3:]), &req); err != nil {
				t.Fatalf("docs/lifecycle.md: %s: %v", line, err)
			}
			if req.Execute == "qmp_capabilities" {
				continue // the monitor has negotiated already
			}
			var args any
			if req.Arguments != nil {
				args = req.Arguments
			}
			if _, err := d.run(req.Execute, args); err != nil {
				t.Fatalf("docs/lifecycle.md: %s: %v\n%s", line, err, d.logs)
			}
			ran++
			if req.Execute == "block-export-add" && data == nil {
				// The guest's data: written once, read back at the end,
				// after every snapshot, commit, stream and mirror.
				data = bytes.Repeat([]byte("lifecycle"), 1<<17)[:1<<20]
				c, err := harness.DialNBD("unix", filepath.Join(dir, "nbd.sock"), "vm1")
				if err != nil {
					t.Fatal(err)
				}
				if err := c.WriteAt(data, 3<<20, true); err != nil {
					t.Fatal(err)
				}
				c.Close()
			}
		case strings.HasPrefix(line, "<- "):
			var want struct {
				Event string         `json:"event"`
				Data  map[string]any `json:"data"`
			}
			if err := json.Unmarshal([]byte(line[3:]), &want); err != nil {
				t.Fatalf("docs/lifecycle.md: %s: %v", line, err)
			}
			deadline := time.After(60 * time.Second)
		wait:
			for {
				select {
				case ev := <-events:
					if ev.Event != want.Event {
						continue
					}
					for k, v := range want.Data {
						if ev.Data[k] != v {
							continue wait
						}
					}
					if e, failed := ev.Data["error"]; failed {
						t.Fatalf("docs/lifecycle.md: %s came with error %v", line, e)
					}
					break wait
				case <-deadline:
					t.Fatalf("docs/lifecycle.md: no %s\n%s", line, d.logs)
				}
			}
		}
	}
	if ran < 10 || data == nil {
		t.Fatalf("docs/lifecycle.md ran only %d commands (export made: %v)", ran, data != nil)
	}
	c, err := harness.DialNBD("unix", filepath.Join(dir, "nbd.sock"), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, len(data))
	if err := c.ReadAt(got, 3<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the export does not read what the guest wrote before the snapshots, commits, stream and mirror")
	}
}
