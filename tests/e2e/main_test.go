// Package e2e drives a running blockd through its QMP socket with go-qemu's
// SocketMonitor and checks its disks with the real peer tools.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

var blockdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockd-e2e")
	if err != nil {
		panic(err)
	}
	blockdBin = filepath.Join(dir, "blockd")
	// With BLOCKD_E2E_RACE=1 the daemon itself is built with the race
	// detector, and any report in its output fails the test that ran it.
	args := []string{"build", "-o", blockdBin}
	if os.Getenv("BLOCKD_E2E_RACE") == "1" {
		args = append(args, "-race")
	}
	out, err := exec.Command("go", append(args, "blockd/cmd/blockd")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building blockd: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is a blockd process with a QMP monitor.
type daemon struct {
	t    *testing.T
	dir  string
	cmd  *exec.Cmd
	mon  *qmp.SocketMonitor
	logs *bytes.Buffer
}

// start runs blockd with a QMP socket plus extra arguments.
func start(t *testing.T, args ...string) *daemon {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "qmp.sock")
	all := append([]string{"--chardev", "socket,id=m0,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=m0"}, args...)
	cmd := exec.Command(blockdBin, all...)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, cmd: cmd, logs: logs}
	t.Cleanup(d.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		mon, err := qmp.NewSocketMonitor("unix", sock, 2*time.Second)
		if err == nil {
			if err := mon.Connect(); err != nil {
				t.Fatalf("qmp connect: %v", err)
			}
			d.mon = mon
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("blockd did not start: %v\n%s", err, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemon) stop() {
	if d.mon != nil {
		d.mon.Disconnect()
	}
	if d.cmd.ProcessState == nil {
		d.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { d.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			d.cmd.Process.Kill()
			d.t.Errorf("blockd did not exit on SIGTERM\n%s", d.logs)
		}
	}
	if strings.Contains(d.logs.String(), "WARNING: DATA RACE") {
		d.t.Errorf("the race detector reported a data race in blockd:\n%s", d.logs)
	}
}

// run executes a command and returns the "return" member.
func (d *daemon) run(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	raw, err := d.mon.Run(b)
	if err != nil {
		return nil, err
	}
	// go-qemu hands out its scanner's buffer, which its reader goroutine
	// reuses; copy it at once.
	raw = append([]byte(nil), raw...)
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return nil, err
	}
	return resp.Return, nil
}

func (d *daemon) must(cmd string, args any) json.RawMessage {
	d.t.Helper()
	r, err := d.run(cmd, args)
	if err != nil {
		d.t.Fatalf("%s %v: %v", cmd, args, err)
	}
	return r
}

func (d *daemon) mustFail(cmd string, args any, want string) {
	d.t.Helper()
	_, err := d.run(cmd, args)
	if err == nil || !strings.Contains(err.Error(), want) {
		d.t.Fatalf("%s %v: got %v, want an error containing %q", cmd, args, err, want)
	}
}

type nodeInfo struct {
	NodeName string `json:"node-name"`
	Drv      string `json:"drv"`
	File     string `json:"file"`
	RO       bool   `json:"ro"`
	Image    struct {
		VirtualSize    int64 `json:"virtual-size"`
		Format         string
		FormatSpecific *struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		} `json:"format-specific"`
	} `json:"image"`
}

func (d *daemon) nodes() []nodeInfo {
	var out []nodeInfo
	if err := json.Unmarshal(d.must("query-named-block-nodes", map[string]any{"flat": true}), &out); err != nil {
		d.t.Fatal(err)
	}
	return out
}

// subscribe streams events into a buffered channel drained by its own
// goroutine: go-qemu's monitor stops reading replies while an event waits
// to be delivered.
func (d *daemon) subscribe() <-chan qmp.Event {
	d.t.Helper()
	in, err := d.mon.Events(context.Background())
	if err != nil {
		d.t.Fatal(err)
	}
	out := make(chan qmp.Event, 4096)
	go func() {
		for ev := range in {
			select {
			case out <- ev:
			default:
			}
		}
	}()
	return out
}
