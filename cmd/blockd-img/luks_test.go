package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/testutil"
)

// These tests cover what blockd-img does beyond qemu-img 7.2 (LUKS2,
// detached headers), with cryptsetup and qemu-img as the judges.

func luksDir(t *testing.T) string {
	t.Helper()
	testutil.NeedTool(t, "cryptsetup")
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "pw"), []byte("abc"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pw2"), []byte("xyz"), 0o600); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.img")
	if err := os.WriteFile(src, pattern(3<<20, 9), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(src, 8<<20); err != nil {
		t.Fatal(err)
	}
	return dir
}

func infoJSON(t *testing.T, dir string, args ...string) map[string]any {
	t.Helper()
	out := mustRun(t, dir, bimg, append([]string{"info", "--output=json"}, args...)...)
	var v map[string]any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("info: %v\n%s", err, out)
	}
	return v
}

func fsData(v map[string]any) map[string]any {
	return v["format-specific"].(map[string]any)["data"].(map[string]any)
}

func TestLUKS2CreateConvertAmend(t *testing.T) {
	dir := luksDir(t)
	for _, tc := range []struct{ name, opts string }{
		{"pbkdf2", "luks-version=2,pbkdf=pbkdf2,iter-time=10"},
		{"sector-4k", "luks-version=2,pbkdf=pbkdf2,iter-time=10,sector-size=4096"},
		{"cbc-essiv", "luks-version=2,pbkdf=pbkdf2,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := tc.name + ".img"
			mustRun(t, dir, bimg, "convert", "--object", objPW, "-O", "luks", "-o", "key-secret=s0,"+tc.opts, "src.img", img)
			dump := mustRun(t, dir, "cryptsetup", "luksDump", img)
			if !strings.Contains(dump, "Version:       \t2") {
				t.Fatalf("not LUKS2:\n%s", dump)
			}
			mustRun(t, dir, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw", img)
			mustRun(t, dir, bimg, "compare", "--object", objPW, "--image-opts",
				"driver=raw,file.filename=src.img", "driver=luks,key-secret=s0,file.filename="+img)
			v := infoJSON(t, dir, img)
			if v["virtual-size"] != float64(8<<20) || fsData(v)["version"] != float64(2) {
				t.Errorf("info: %v", v)
			}
			// A second keyslot, then the first one erased.
			mustRun(t, dir, bimg, "amend", "--object", objPW, "--object", objPW2, "-o", "state=active,new-secret=s1,iter-time=10,pbkdf=pbkdf2",
				"--image-opts", "driver=luks,key-secret=s0,file.filename="+img)
			mustRun(t, dir, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw2", img)
			mustRun(t, dir, bimg, "amend", "--object", objPW, "--object", objPW2, "-o", "state=inactive,old-secret=s0",
				"--image-opts", "driver=luks,key-secret=s1,file.filename="+img)
			if r := runIn(t, dir, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw", img); r.code == 0 {
				t.Errorf("the erased passphrase still opens %s", img)
			}
			mustRun(t, dir, bimg, "resize", "--object", objPW2, "--image-opts", "driver=luks,key-secret=s1,file.filename="+img, "+4M")
			if v := infoJSON(t, dir, img); v["virtual-size"] != float64(12<<20) {
				t.Errorf("after resize: %v", v["virtual-size"])
			}
		})
	}
}

func TestDetachedHeader(t *testing.T) {
	dir := luksDir(t)
	for _, ver := range []string{"1", "2"} {
		t.Run("luks"+ver, func(t *testing.T) {
			hdr, data := "hdr"+ver+".img", "data"+ver+".img"
			pbkdf := ""
			if ver == "2" {
				pbkdf = ",pbkdf=pbkdf2"
			}
			out := mustRun(t, dir, bimg, "create", "--object", objPW, "-f", "luks",
				"-o", "key-secret=s0,detached-header=true,iter-time=10,luks-version="+ver+pbkdf, hdr)
			if !strings.Contains(out, "detached-header=true") {
				t.Errorf("create output: %s", out)
			}
			mustRun(t, dir, bimg, "create", "-q", "-f", "raw", data, "8M")
			target := "driver=luks,key-secret=s0,file.filename=" + data + ",header.filename=" + hdr
			mustRun(t, dir, bimg, "convert", "--object", objPW, "-n", "--target-image-opts", "src.img", target)
			// The header opens with cryptsetup; the data file holds only
			// ciphertext.
			mustRun(t, dir, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw", "--header", hdr, data)
			mustRun(t, dir, "cryptsetup", "luksDump", hdr)
			if r := qemuImg(t, dir, "compare", "-f", "raw", "-F", "raw", "src.img", data); r.code != 1 {
				t.Errorf("the data file is not encrypted: compare exit %d", r.code)
			}
			mustRun(t, dir, bimg, "compare", "--object", objPW, "--image-opts", "driver=raw,file.filename=src.img", target)
			v := infoJSON(t, dir, "--object", objPW, "--image-opts", target)
			if fsData(v)["detached-header"] != true || v["virtual-size"] != float64(8<<20) {
				t.Errorf("info: %v", v)
			}
			// Without the key, info still reads the header.
			v = infoJSON(t, dir, "--image-opts", "driver=luks,file.filename="+data+",header.filename="+hdr)
			if fsData(v)["detached-header"] != true || !strings.HasPrefix(v["filename"].(string), "json:") {
				t.Errorf("info without key: %v", v)
			}
			mustRun(t, dir, bimg, "amend", "--object", objPW, "--object", objPW2, "-o", "state=active,new-secret=s1,keyslot=3,iter-time=10"+pbkdf,
				"--image-opts", target)
			mustRun(t, dir, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw2", "-S", "3", "--header", hdr, data)
			mustRun(t, dir, bimg, "convert", "--object", objPW, "--image-opts", target, "back.img")
			mustRun(t, dir, "qemu-img", "compare", "-f", "raw", "-F", "raw", "src.img", "back.img")
		})
	}
}

// TestErrorsArePlain checks that failures print one "blockd-img: ..."
// message and never a Go stack trace.
func TestErrorsArePlain(t *testing.T) {
	dir := luksDir(t)
	for _, a := range [][]string{
		{},
		{"info"},
		{"info", "--output"},
		{"info", "json:{"},
		{"info", "--image-opts", "driver=,,"},
		{"info", "--image-opts", "driver=luks,file.filename=src.img"},
		{"info", "-f", "luks", "src.img"},
		{"convert", "-O", "luks", "src.img", "x.img"},
		{"convert", "-f", "qcow2", "src.img", "x.img"},
		{"create", "-f", "luks", "-o", "key-secret=nosuch", "x.img", "1M"},
		{"create", "-f", "qcow2", "-o", "cluster_size=3", "x.img", "1M"},
		{"resize", "src.img"},
		{"amend", "-o", "state=active", "src.img"},
		{"map", "--start-offset", "-1", "src.img"},
		{"bench", "-c", "x", "src.img"},
		{"compare", "--object", "bogus", "a", "b"},
		{"measure", "--size", "1G", "-O", "nosuch"},
	} {
		r := blockdImg(t, dir, a...)
		if r.code == 0 {
			t.Errorf("%v: exit 0", a)
			continue
		}
		if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic") || !strings.Contains("\n"+r.stderr, "\nblockd-img: ") {
			t.Errorf("%v: stderr %q", a, r.stderr)
		}
	}
}
