package luksfmt

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/blockcrypto"
	"blockd/internal/testutil"
)

// Cross-checks of the LUKS1 layout and keyslots with QEMU 7.2 (qemu-img,
// qemu-io). QEMU 7.2 reads LUKS1 with an embedded header only.

func qemuTool(t testing.TB, tool string, args ...string) string {
	t.Helper()
	p := requireTool(t, tool)
	out, err := exec.Command(p, args...).CombinedOutput()
	for try := 0; err != nil && try < testutil.PeerRetries && testutil.PeerFlake(string(out)); try++ {
		out, err = exec.Command(p, args...).CombinedOutput()
	}
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func secretArg(id, file string) string { return "secret,id=" + id + ",file=" + file + ",format=raw" }

// TestPeerQEMULayout: an image made by qemu-img opens here with the layout
// Create makes (keyslots at 4096 + n*258048, payload at 2068480), keyslots
// added by qemu-img amend unlock, and data written by qemu-io decrypts.
func TestPeerQEMULayout(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	pw := writeFile(t, dir, "pw", passA)
	pw2 := writeFile(t, dir, "pw2", passB)
	img := filepath.Join(dir, "q.luks")
	// iter-time=100: a tiny value sometimes fails on these machines.
	qemuTool(t, "qemu-img", "create", "-f", "luks", "--object", secretArg("s0", pw), "-o", "key-secret=s0,iter-time=100", img, "1M")
	qemuTool(t, "qemu-img", "amend", "--object", secretArg("s0", pw), "--object", secretArg("s1", pw2),
		"--image-opts", "driver=luks,key-secret=s0,file.filename="+img, "-o", "state=active,new-secret=s1,keyslot=2,iter-time=100")
	qemuTool(t, "qemu-io", "--object", secretArg("s0", pw), "--image-opts", "driver=luks,key-secret=s0,file.filename="+img,
		"-c", "write -P 0x5a 0 64k")

	h := openFile(t, img)
	dev, _, _ := create(t, CreateOptions{})
	mine := reopen(t, dev)
	if h.PayloadOffset() != 2068480 || h.PayloadOffset() != mine.PayloadOffset() || h.HeaderSize() != mine.HeaderSize() {
		t.Fatalf("qemu payload %d header %d, ours %d %d", h.PayloadOffset(), h.HeaderSize(), mine.PayloadOffset(), mine.HeaderSize())
	}
	qi, mi := h.Info(), mine.Info()
	for i := range qi.Slots {
		if qi.Slots[i].KeyOffset != mi.Slots[i].KeyOffset || qi.Slots[i].KeyOffset != 4096+int64(i)*258048 {
			t.Fatalf("keyslot %d: qemu at %d, ours at %d", i, qi.Slots[i].KeyOffset, mi.Slots[i].KeyOffset)
		}
	}
	if qi.CipherAlg != mi.CipherAlg || qi.CipherMode != mi.CipherMode || qi.IVGenAlg != mi.IVGenAlg || qi.HashAlg != mi.HashAlg {
		t.Fatalf("qemu %+v, ours %+v", qi, mi)
	}
	key, slot, err := h.Unlock(context.Background(), passA, AnySlot, KDFLimits{})
	if err != nil || slot != 0 {
		t.Fatalf("Unlock: %d %v", slot, err)
	}
	defer Wipe(key)
	mustUnlock(t, h, passB, 2, key)
	pt := decryptPayload(t, h, key, img)
	if !bytes.Equal(pt[:64<<10], bytes.Repeat([]byte{0x5a}, 64<<10)) {
		t.Fatal("data written by qemu-io does not decrypt")
	}
}

// TestPeerQEMUReadsOurs: QEMU opens a LUKS1 image made by Create (with a
// keyslot added by AddKey) and reads data encrypted here.
func TestPeerQEMUReadsOurs(t *testing.T) {
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	pw := writeFile(t, dir, "pw", passB)
	img := filepath.Join(dir, "ours.luks")
	f := openRWFile(t, img)
	h, key, err := Create(f, CreateOptions{Passphrase: passA, KDF: fastKDF(KDFPBKDF2)})
	if err != nil {
		t.Fatal(err)
	}
	defer Wipe(key)
	if _, err := h.AddKey(f, key, 6, passB, fastKDF(KDFPBKDF2)); err != nil {
		t.Fatal(err)
	}
	plain := bytes.Repeat([]byte{0xa5}, 1<<20)
	c, err := blockcrypto.New(h.CipherSpec(), key)
	if err != nil {
		t.Fatal(err)
	}
	ct := make([]byte, len(plain))
	if err := c.Encrypt(ct, plain, 0, 512); err != nil {
		t.Fatal(err)
	}
	c.Wipe()
	if _, err := f.WriteAt(ct, h.PayloadOffset()); err != nil {
		t.Fatal(err)
	}
	out := qemuTool(t, "qemu-io", "--object", secretArg("s0", pw), "--image-opts", "driver=luks,key-secret=s0,file.filename="+img,
		"-c", "read -P 0xa5 0 1M")
	if !strings.Contains(out, "read 1048576/1048576 bytes") || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	info := qemuTool(t, "qemu-img", "info", "--object", secretArg("s0", pw), "--image-opts", "driver=luks,key-secret=s0,file.filename="+img)
	if !strings.Contains(info, "virtual size: 1 MiB") || !strings.Contains(info, "uuid: "+h.UUID()) {
		t.Fatalf("qemu-img info:\n%s", info)
	}
}
