package e2e

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/drivers/luks/luksfmt"
	"blockd/tests/harness"
)

// slowLUKS writes a LUKS1 image (passphrase "pw") whose keyslot 0 has
// 2^28 PBKDF2-SHA256 iterations: about a minute of CPU here, over the
// default --max-kdf-time.
func slowLUKS(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "slow.luks")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, key, err := luksfmt.Create(f, luksfmt.CreateOptions{Version: 1, Passphrase: []byte("pw"), KDF: luksfmt.KDF{Iterations: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	luksfmt.Wipe(key)
	if err := f.Truncate(4 << 20); err != nil { // room for a payload
		t.Fatal(err)
	}
	// Keyslot 0's iteration count: phdr offset 208, then active (4 bytes).
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], 1<<28)
	if _, err := f.WriteAt(b[:], 208+4); err != nil {
		t.Fatal(err)
	}
	return path
}

func slowLUKSArgs(path string) map[string]any {
	return map[string]any{"driver": "luks", "node-name": "slow", "key-secret": "sec",
		"file": map[string]any{"driver": "file", "filename": path}}
}

// TestKDFLimitRefused: by default the image is refused at once, with the
// limit and the option named.
func TestKDFLimitRefused(t *testing.T) {
	dir := t.TempDir()
	path := slowLUKS(t, dir)
	d := harness.StartDaemon(t, blockdBin, "--object", "secret,id=sec,data=pw")
	start := time.Now()
	d.MustFail("blockdev-add", slowLUKSArgs(path), "keyslot 0: pbkdf2 (sha256, 268435456 iterations) would take about")
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("refusing took %v", took)
	}
}

// TestKDFSigterm: with the limit raised, SIGTERM during the derivation
// (blockdev-add in progress) ends blockd within a second.
func TestKDFSigterm(t *testing.T) {
	dir := t.TempDir()
	path := slowLUKS(t, dir)
	p, err := harness.Start(blockdBin, dir, "--max-kdf-time", "1h", "--object", "secret,id=sec,data=pw")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	q, err := p.QMP(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.Timeout = time.Minute
	go func() { _, _ = q.Exec("blockdev-add", slowLUKSArgs(path)) }()
	time.Sleep(500 * time.Millisecond)
	if p.Exited() {
		t.Fatalf("blockd exited early:\n%s", p.Logs())
	}
	if err := p.Stop(2 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, p.Logs())
	}
}

// TestKDFSigtermAtStartup: the same with the image on the command line.
func TestKDFSigtermAtStartup(t *testing.T) {
	dir := t.TempDir()
	path := slowLUKS(t, dir)
	p, err := harness.Start(blockdBin, dir, "--max-kdf-time=1h", "--object", "secret,id=sec,data=pw",
		"--blockdev", "driver=luks,node-name=slow,key-secret=sec,file.driver=file,file.filename="+path)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	time.Sleep(500 * time.Millisecond)
	if p.Exited() {
		t.Fatalf("blockd exited early:\n%s", p.Logs())
	}
	start := time.Now()
	_ = p.Stop(2 * time.Second)
	if took := time.Since(start); took > time.Second || !strings.Contains(p.Logs(), "during startup") {
		t.Fatalf("exit took %v:\n%s", took, p.Logs())
	}
}

// TestKDFClientGone: a monitor that disconnects during blockdev-add cancels
// the derivation, so the graph (locked while a node opens) answers another
// monitor at once.
func TestKDFClientGone(t *testing.T) {
	dir := t.TempDir()
	path := slowLUKS(t, dir)
	d := harness.StartDaemonIn(t, blockdBin, dir, "--max-kdf-time", "1h", "--object", "secret,id=sec,data=pw")
	q, err := harness.DialQMP(d.QMPPath, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	q.Timeout = time.Minute
	go func() { _, _ = q.Exec("blockdev-add", slowLUKSArgs(path)) }()
	time.Sleep(500 * time.Millisecond)
	q.Close()
	time.Sleep(200 * time.Millisecond)
	d.Mon.Timeout = 2 * time.Second
	start := time.Now()
	d.Must("blockdev-add", map[string]any{"driver": "null-co", "node-name": "n0"})
	if took := time.Since(start); took > time.Second {
		t.Fatalf("blockdev-add after the client left took %v", took)
	}
}
