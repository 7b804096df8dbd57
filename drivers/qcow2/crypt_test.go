package qcow2_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/drivers/qcow2"
	"blockd/graph"
	"blockd/internal/qapi"
	"blockd/internal/testutil"
)

const encOpt = `,"encrypt":{"format":"luks","key-secret":"sec0"}`

// qemuSecret is the --object argument for the test passphrase.
func qemuSecret(t *testing.T) string {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte(testPass), 0o600); err != nil {
		t.Fatal(err)
	}
	return "secret,id=s0,file=" + pw
}

func encImageOpts(img string) string {
	return fmt.Sprintf("driver=qcow2,encrypt.key-secret=s0,file.filename=%s", img)
}

// TestEncryptedFromQemu reads and writes a LUKS-encrypted qcow2 image that
// qemu-img created, and lets qemu-img read back what blockd wrote.
func TestEncryptedFromQemu(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "enc.qcow2")
	sec := qemuSecret(t)
	qemuEncrypted(t, img)
	qemuIO(t, "--object", sec, "--image-opts", "-c", "write -P 0x42 65536 100000", "-c", "write -z 1M 64k", encImageOpts(img))
	want := qemuRaw(t, "--object", sec, "--image-opts", encImageOpts(img))

	g, _ := newGraph(t)
	if err := addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":%q}}`, img)); err == nil || !strings.Contains(err.Error(), "Parameter 'encrypt.key-secret' is required for cipher") {
		t.Fatalf("open without key: %v", err)
	}
	if err := addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":%q},"encrypt":{"format":"luks","key-secret":"bad"}}`, img)); err == nil || !strings.Contains(err.Error(), "Invalid password, cannot unlock any keyslot") {
		t.Fatalf("open with a wrong key: %v", err)
	}
	if err := addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":%q},"encrypt":{"format":"aes","key-secret":"sec0"}}`, img)); err == nil || !strings.Contains(err.Error(), "Header reported 'luks' encryption format but options specify 'aes'") {
		t.Fatalf("open with the wrong format: %v", err)
	}
	c := openQcow2(t, g, "img", img, encOpt+`,"discard":"unmap"`)
	equalOrFail(t, "decrypted", readAll(t, c), want)
	w := &workload{c: c, mirror: want, cs: 65536, align: 512, r: rand.New(rand.NewPCG(1, 2))}
	for i := 0; i < 500; i++ {
		w.step(t, t.Context(), i)
	}
	g.Close()
	checkClean(t, img, "--object", sec, "--image-opts", encImageOpts(img))
	equalOrFail(t, "qemu view", qemuRaw(t, "--object", sec, "--image-opts", encImageOpts(img)), w.mirror)
}

// TestEncryptedCreate creates an encrypted image with blockdev-create, has
// qemu-img read it and compares its layout with qemu-img's.
func TestEncryptedCreate(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "enc.qcow2")
	blockdevCreate(t, img, `,"size":4194304,"encrypt":{"format":"luks","key-secret":"sec0","iter-time":10}`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, encOpt+`,"discard":"unmap"`)
	mirror := make([]byte, c.Size())
	w := &workload{c: c, mirror: mirror, cs: 65536, align: 512, r: rand.New(rand.NewPCG(3, 4))}
	for i := 0; i < 300; i++ {
		w.step(t, t.Context(), i)
	}
	info := g.Lookup("img").DeviceInfo(true)
	if !info.Encrypted || !strings.HasPrefix(info.File, "json:") || !strings.Contains(info.File, `"encrypt.key-secret": "sec0"`) {
		t.Fatalf("query: encrypted %v file %s", info.Encrypted, info.File)
	}
	g.Close()
	sec := qemuSecret(t)
	checkClean(t, img, "--object", sec, "--image-opts", encImageOpts(img))
	equalOrFail(t, "qemu view", qemuRaw(t, "--object", sec, "--image-opts", encImageOpts(img)), w.mirror)
	out := qemuImg(t, "info", "--object", sec, "--image-opts", encImageOpts(img))
	for _, s := range []string{"encrypted: yes", "format: luks", "cipher alg: aes-256", "payload offset: 2068480"} {
		if !strings.Contains(out, s) {
			t.Fatalf("qemu-img info lacks %q:\n%s", s, out)
		}
	}
	// Same layout as qemu-img: the LUKS header right after the L1 table.
	q := filepath.Join(dir, "q.qcow2")
	qemuEncrypted(t, q)
	a, _ := os.ReadFile(q)
	b, _ := os.ReadFile(img)
	equalOrFail(t, "header cluster", b[:0x200], a[:0x200])
}

// TestEncryptedAmendOnline changes the keyslots of an encrypted image
// (x-blockdev-amend) while a workload runs on it: a keyslot for a second
// passphrase is added, the first passphrase's keyslot erased, and qemu-io
// then opens the image with the second passphrase only.
func TestEncryptedAmendOnline(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "enc.qcow2")
	qemuEncrypted(t, img)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, encOpt+`,"discard":"unmap"`)
	am := g.Lookup("img").Node().(graph.Amender)
	w := &workload{c: c, mirror: readAll(t, c), cs: 65536, align: 512, r: rand.New(rand.NewPCG(3, 4))}
	// The keyslot changes run beside the workload, which stays on the
	// test goroutine (it fails the test with t.Fatal).
	decode := func(js string) *qcow2.AmendOptions {
		var o qcow2.AmendOptions
		if err := qapi.Decode(testutil.Tree(t, js), false, &o); err != nil {
			t.Fatal(err)
		}
		return &o
	}
	add := decode(`{"encrypt":{"format":"luks","state":"active","new-secret":"bad","iter-time":10}}`)
	erase := decode(`{"encrypt":{"format":"luks","state":"inactive","old-secret":"sec0"}}`)
	eraseLast := decode(`{"encrypt":{"format":"luks","state":"inactive","old-secret":"bad"}}`)
	errs := make(chan error, 3)
	go func() {
		errs <- am.Amend(t.Context(), add, false)
		errs <- am.Amend(t.Context(), erase, false)
		errs <- am.Amend(t.Context(), eraseLast, false)
	}()
	for i := 0; i < 300; i++ {
		w.step(t, t.Context(), i)
	}
	if err := <-errs; err != nil {
		t.Fatalf("adding a keyslot: %v", err)
	}
	if err := <-errs; err != nil {
		t.Fatalf("erasing the first keyslot: %v", err)
	}
	if err := <-errs; err == nil || !strings.Contains(err.Error(), "refusing operation") {
		t.Fatalf("erasing the last keyslot: %v", err)
	}
	g.Close()
	pw := filepath.Join(dir, "pw2")
	if err := os.WriteFile(pw, []byte("wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	sec2 := "secret,id=s0,file=" + pw
	checkClean(t, img, "--object", sec2, "--image-opts", encImageOpts(img))
	equalOrFail(t, "qemu view with the new passphrase", qemuRaw(t, "--object", sec2, "--image-opts", encImageOpts(img)), w.mirror)
	if out, err := testutil.RunErr("qemu-io", "--object", qemuSecret(t), "--image-opts", encImageOpts(img), "-c", "read 0 512"); err == nil {
		t.Fatalf("the erased passphrase still opens the image:\n%s", out)
	}
}
