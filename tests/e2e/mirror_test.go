package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"

	"github.com/digitalocean/go-qemu/qmp"
)

// mirrorSource creates a qcow2 image of size bytes whose first half holds
// 0x11 and an empty qcow2 target of the same size; it returns both and
// the model of the source's contents.
func mirrorSource(t *testing.T, dir string, size int) (src, tgt string, model []byte) {
	t.Helper()
	src, tgt = filepath.Join(dir, "src.qcow2"), filepath.Join(dir, "tgt.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P 0x11 0 %d", size/2), src)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", tgt, fmt.Sprint(size))
	model = make([]byte, size)
	copy(model, bytes.Repeat([]byte{0x11}, size/2))
	return src, tgt, model
}

// loadClients starts four NBD clients on the export that write 4 to 32
// KiB pieces across the image, each into its own clusters, and read each
// piece back, recording what they wrote in model. stop ends them and
// returns their errors. Each client waits pause before each write.
func loadClients(t *testing.T, sock string, model []byte, pause time.Duration) (stop func() []error) {
	t.Helper()
	var done atomic.Bool
	var wg sync.WaitGroup
	var mu sync.Mutex // protects model
	errs := make(chan error, 4)
	var clients []*harness.NBD
	size := int64(len(model))
	for w := 0; w < 4; w++ {
		cw, err := harness.DialNBD("unix", sock, "disk")
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cw)
		wg.Add(1)
		go func(w int, cw *harness.NBD) {
			defer wg.Done()
			for i := 0; !done.Load(); i++ {
				time.Sleep(pause)
				n := int64(4096 << (i % 4))
				clusters := size >> 16
				off := ((int64(i*7+w*13)%(clusters/4))*4+int64(w))<<16 + (int64(i)*4096)%(1<<16-n+4096)&^4095
				buf := bytes.Repeat([]byte{byte(0x40 + w*16 + i%16)}, int(n))
				if err := cw.WriteAt(buf, uint64(off), i%9 == 0); err != nil {
					errs <- fmt.Errorf("client %d write %d+%d: %v", w, off, n, err)
					return
				}
				mu.Lock()
				copy(model[off:], buf)
				mu.Unlock()
				got := make([]byte, n)
				if err := cw.ReadAt(got, uint64(off)); err != nil {
					errs <- fmt.Errorf("client %d read %d+%d: %v", w, off, n, err)
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- fmt.Errorf("client %d read %d+%d back wrong", w, off, n)
					return
				}
			}
		}(w, cw)
	}
	return func() []error {
		done.Store(true)
		wg.Wait()
		for _, c := range clients {
			c.Close()
		}
		close(errs)
		var out []error
		for err := range errs {
			out = append(out, err)
		}
		return out
	}
}

// waitEvent waits for the event name of the job id.
func waitEvent(t *testing.T, evs <-chan qmp.Event, name, id string) map[string]any {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case ev := <-evs:
			if ev.Event == name && ev.Data["device"] == id {
				return ev.Data
			}
		case <-deadline:
			t.Fatalf("no %s for %s", name, id)
		}
	}
}

// mirrorUnderLoad mirrors the exported qcow2 disk src to the node target
// while four NBD clients write and read back through the export, waits
// for READY, lets the clients go on, completes the job under load and
// checks that the export then reads what the clients wrote. It returns
// the model.
func mirrorUnderLoad(t *testing.T, d *daemon, size int, model []byte, target string, pause time.Duration) []byte {
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "src", "name": "disk", "writable": true})
	evs := d.subscribe()
	stop := loadClients(t, sock, model, pause)
	time.Sleep(100 * time.Millisecond)
	// 8 MiB/s: the first pass over the 16 MiB disk takes about two seconds.
	d.must("blockdev-mirror", map[string]any{"job-id": "m", "device": "src", "target": target, "sync": "full", "speed": 8 << 20})
	// The limit cannot keep up with four writers; lifted, the job
	// catches up with them and goes ready.
	time.Sleep(time.Second)
	d.must("block-job-set-speed", map[string]any{"device": "m", "speed": 0})
	waitEvent(t, evs, "BLOCK_JOB_READY", "m")
	time.Sleep(300 * time.Millisecond)
	d.must("block-job-complete", map[string]any{"device": "m"})
	completed := waitEvent(t, evs, "BLOCK_JOB_COMPLETED", "m")
	time.Sleep(200 * time.Millisecond) // the clients write to the target now
	for _, err := range stop() {
		t.Error(err)
	}
	if e, ok := completed["error"]; ok {
		t.Fatalf("BLOCK_JOB_COMPLETED %v (error %v)", completed, e)
	}
	var exps []struct {
		NodeName string `json:"node-name"`
	}
	if err := json.Unmarshal(d.must("query-block-exports", nil), &exps); err != nil {
		t.Fatal(err)
	}
	if len(exps) != 1 || exps[0].NodeName != target {
		t.Fatalf("query-block-exports after the pivot: %+v", exps)
	}
	if !bytes.Equal(readExport(t, sock, size), model) {
		t.Fatal("the export does not read what its clients wrote")
	}
	d.must("block-export-del", map[string]any{"id": "e0"})
	return model
}

// TestMirrorUnderLoad mirrors an exported qcow2 disk to a new qcow2 image
// while NBD clients write and verify through the export, completes the
// job under load, and checks that the export serves the target: the
// clients' connections go on across the switch, the target is clean for
// qemu-img check and holds what they wrote, and the source holds
// everything up to the switch.
func TestMirrorUnderLoad(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 16 << 20
	src, tgt, model := mirrorSource(t, d.dir, size)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "src", "file": map[string]any{"driver": "file", "filename": src}})
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "tgt", "file": map[string]any{"driver": "file", "filename": tgt}})
	model = mirrorUnderLoad(t, d, size, model, "tgt", 0)
	d.stop()
	testutil.Run(t, "qemu-img", "check", "-q", src)
	testutil.Run(t, "qemu-img", "check", "-q", tgt)
	compareModel(t, d.dir, model, tgt)
}

// TestMirrorToNBD is the migration case: the target is an nbd node over a
// qcow2 image that qemu-nbd serves; after the switch blockd's export
// serves the remote disk and the image holds what the clients wrote.
func TestMirrorToNBD(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "qemu-nbd")
	d := start(t)
	const size = 16 << 20
	src, tgt, model := mirrorSource(t, d.dir, size)
	rsock := filepath.Join(d.dir, "remote.sock")
	qn := exec.Command("qemu-nbd", "-f", "qcow2", "-k", rsock, "-x", "r", tgt)
	if err := qn.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qn.Process.Kill(); qn.Wait() }()
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(rsock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "src", "file": map[string]any{"driver": "file", "filename": src}})
	d.must("blockdev-add", map[string]any{"driver": "nbd", "node-name": "remote", "export": "r",
		"server": map[string]any{"type": "unix", "path": rsock}})
	// Writers as fast as the local disk outrun a copy over NBD (the
	// mirror would never be ready, as in QEMU's background mode): they
	// pause 2 ms between writes here.
	model = mirrorUnderLoad(t, d, size, model, "remote", 2*time.Millisecond)
	d.must("blockdev-del", map[string]any{"node-name": "remote"})
	d.stop()
	qn.Process.Signal(syscall.SIGTERM)
	qn.Wait()
	testutil.Run(t, "qemu-img", "check", "-q", tgt)
	compareModel(t, d.dir, model, tgt)
}

// TestMirrorSIGKILL kills blockd in the middle of a mirror: the source
// only was read, so it is clean for qemu-img check and reads as before.
func TestMirrorSIGKILL(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 32 << 20
	src, tgt, model := mirrorSource(t, d.dir, size)
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "src", "file": map[string]any{"driver": "file", "filename": src}})
	d.must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "tgt", "file": map[string]any{"driver": "file", "filename": tgt}})
	d.must("blockdev-mirror", map[string]any{"job-id": "m", "device": "src", "target": "tgt", "sync": "full", "speed": 8 << 20})
	killAtOffset(t, d, size/4)
	testutil.Run(t, "qemu-img", "check", "-q", src)
	compareModel(t, d.dir, model, src)
}

// TestMirrorInFlight mirrors 32 MiB of data into a null-co target that
// takes 100 ms per request: one request at a time (32 requests of 1 MiB)
// would need at least 3.2 s to get ready, up to 16 in flight within the
// default 16 MiB buf-size take two rounds. With buf-size 1 MiB one
// request is in flight and the job is no faster than before.
func TestMirrorInFlight(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	d := start(t)
	const size = 32 << 20
	src := filepath.Join(d.dir, "src.raw")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", src, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x11 0 %d", size), src)
	d.must("blockdev-add", map[string]any{"driver": "raw", "node-name": "src", "file": map[string]any{"driver": "file", "filename": src}})
	evs := d.subscribe()
	for _, c := range []struct {
		bufSize  int64
		min, max time.Duration
	}{{0, 0, 2400 * time.Millisecond}, {1 << 20, 3200 * time.Millisecond, time.Hour}} {
		d.must("blockdev-add", map[string]any{"driver": "null-co", "node-name": "tgt", "size": size, "latency-ns": int64(100 * time.Millisecond)})
		args := map[string]any{"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}
		if c.bufSize > 0 {
			args["buf-size"] = c.bufSize
		}
		t0 := time.Now()
		d.must("blockdev-mirror", args)
		waitEvent(t, evs, "BLOCK_JOB_READY", "m")
		el := time.Since(t0)
		t.Logf("buf-size %d: ready after %v", c.bufSize, el)
		d.must("block-job-cancel", map[string]any{"device": "m"})
		waitEvent(t, evs, "BLOCK_JOB_COMPLETED", "m")
		if el < c.min || el > c.max {
			t.Errorf("buf-size %d: ready after %v, want %v to %v", c.bufSize, el, c.min, c.max)
		}
		d.must("blockdev-del", map[string]any{"node-name": "tgt"})
	}
}
