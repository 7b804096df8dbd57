package main

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"blockd/internal/testutil"
)

var (
	fixtureOnce sync.Once
	fixtureDir  string
	fixtureErr  string
)

// Secrets used by the fixtures: pw unlocks every LUKS image.
const (
	objPW  = "secret,id=s0,file=pw"
	objPW2 = "secret,id=s1,file=pw2"
	// encChain opens the encrypted chain enctop.qcow2 → encbase.qcow2
	// with the key of both named (a backing file named in a header gets
	// no options).
	encChain = "driver=qcow2,encrypt.key-secret=s0,file.filename=enctop.qcow2," +
		"backing.driver=qcow2,backing.file.filename=encbase.qcow2,backing.encrypt.key-secret=s0"
)

// fixture returns a directory of test images shared by the read-only
// cases (cases that change images work on copies):
//
//	r.img    10 MiB raw: 4 KiB of data at 0, "hello" at 1 MiB, holes
//	r2.img   r.img with one byte changed at 5000
//	r3.img   11 MiB of zeroes (sparse)
//	src.img  32 MiB raw: data [0,8M), written zeroes [8M,10M), data
//	         [10M,12M), hole to the end
//	odd.img  1000 bytes of data (not a multiple of 512)
//	l1.img   LUKS1 (cryptsetup), 16 MiB payload, data at 0 and 4 MiB
//	l2.img   LUKS2 (cryptsetup), 16 MiB payload (blockd-img only)
//	q.qcow2  src.img converted to qcow2 by qemu-img
//	base.qcow2, top.qcow2  a backing chain with data in both layers
//	leak.qcow2  q.qcow2 with its first L1 entry cleared: every cluster
//	         under it leaks
//	dirty.qcow2  lazy refcounts, killed after writes: refcounts too low
//	v2.qcow2  compat=0.10, data at 0
//	pm.qcow2  preallocation=metadata, data at 1M
//	enc.qcow2  LUKS-encrypted qcow2 (passphrase pw), data at 0
//	snap.qcow2  snapshots "s1" (data 1 at 0) and "s2" (data 2 at 0 and 3
//	         at 2M), then data 4 at 1M
//	l1past.qcow2, rtpast.qcow2  q.qcow2 with its L1 or refcount table
//	         offset at 1 TiB, far past the end of the file
//	l1end.qcow2  q.qcow2 with its L1 table at the end of the file (less
//	         than a cluster past it)
//	other.qcow2  16 MiB, data 5 at [0, 64k): a backing file to rebase onto
//	top2.qcow2  over top.qcow2: data 7 at 2M, zeroes at [0, 64k)
//	sub/t.qcow2  over ../base.qcow2 (a relative name): data 6 at 4M
//	small.qcow2  1 MiB, 512-byte clusters
//	encbase.qcow2, enctop.qcow2  an encrypted chain (passphrase pw): data
//	         9 at [0, 128k) in the base, 8 at [64k, 192k) in the top
//	pw, pw2  passphrases
func fixture(t *testing.T) string {
	t.Helper()
	testutil.NeedTool(t, "qemu-img")
	testutil.NeedTool(t, "qemu-io")
	testutil.NeedTool(t, "cryptsetup")
	fixtureOnce.Do(func() {
		dir := filepath.Join(filepath.Dir(bimg), "fixture")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			fixtureErr = err.Error()
			return
		}
		ft := &fixtureT{T: t}
		buildFixture(ft, dir)
		if ft.failed {
			fixtureErr = "building the fixture failed"
			return
		}
		fixtureDir = dir
	})
	if fixtureDir == "" {
		t.Fatalf("fixture: %s", fixtureErr)
	}
	return fixtureDir
}

type fixtureT struct {
	*testing.T
	failed bool
}

func buildFixture(ft *fixtureT, dir string) {
	t := ft.T
	must := func(err error) {
		if err != nil {
			ft.failed = true
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "pw"), []byte("abc"), 0o600))
	must(os.WriteFile(filepath.Join(dir, "pw2"), []byte("xyz"), 0o600))
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "raw", "r.img", "10M")
	writeAt(t, filepath.Join(dir, "r.img"), 0, pattern(4096, 1))
	writeAt(t, filepath.Join(dir, "r.img"), 1<<20, []byte("hello"))
	mustRun(t, dir, "cp", "--sparse=always", "r.img", "r2.img")
	writeAt(t, filepath.Join(dir, "r2.img"), 5000, []byte("x"))
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "raw", "r3.img", "11M")
	src := filepath.Join(dir, "src.img")
	must(os.WriteFile(src, pattern(8<<20, 2), 0o644))
	writeAt(t, src, 8<<20, make([]byte, 2<<20))
	writeAt(t, src, 10<<20, pattern(2<<20, 3))
	must(os.Truncate(src, 32<<20))
	must(os.WriteFile(filepath.Join(dir, "odd.img"), pattern(1000, 4), 0o644))
	for _, l := range []struct{ name, typ string }{{"l1.img", "luks1"}, {"l2.img", "luks2"}} {
		p := filepath.Join(dir, l.name)
		hdr := int64(2 << 20)
		if l.typ == "luks2" {
			hdr = 16 << 20
		}
		must(os.WriteFile(p, nil, 0o644))
		must(os.Truncate(p, hdr+16<<20))
		args := []string{"luksFormat", "--batch-mode", "--type", l.typ, "--key-file", "pw", "--pbkdf-force-iterations", "1000"}
		if l.typ == "luks2" {
			args = append(args, "--pbkdf", "pbkdf2")
		}
		mustRun(t, dir, "cryptsetup", append(args, l.name)...)
	}
	mustRun(t, dir, "qemu-io", "--object", objPW, "--image-opts", "driver=luks,key-secret=s0,file.filename=l1.img",
		"-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 4M 64k")
	mustRun(t, dir, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "src.img", "q.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "16M")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 8M 1M", "base.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 3 512k 1M", "-c", "write -z 8M 64k", "top.qcow2")
	mustRun(t, dir, "cp", "q.qcow2", "leak.qcow2")
	hdr, err := os.ReadFile(filepath.Join(dir, "leak.qcow2"))
	must(err)
	writeAt(t, filepath.Join(dir, "leak.qcow2"), int64(binary.BigEndian.Uint64(hdr[40:48])), make([]byte, 8))
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "16M")
	// qemu-io's abort ends the process without writing refcounts back.
	mustRun(t, dir, "qemu-img", "create", "-q", "--object", objPW, "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "enc.qcow2", "4M")
	mustRun(t, dir, "qemu-io", "--object", objPW, "--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2", "-c", "write -P 9 0 128k")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pm.qcow2", "16M")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 64k", "pm.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "8M")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 7 0 256k", "v2.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "snap.qcow2", "8M")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "snap.qcow2")
	mustRun(t, dir, "qemu-img", "snapshot", "-c", "s1", "snap.qcow2")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 2 0 64k", "-c", "write -P 3 2M 1M", "snap.qcow2")
	mustRun(t, dir, "qemu-img", "snapshot", "-c", "s2", "snap.qcow2")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 4 1M 512k", "snap.qcow2")
	_ = runIn(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 4 0 1M", "-c", "write -P 5 4M 64k", "-c", "abort", "dirty.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "16M")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 5 0 64k", "other.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "top2.qcow2")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 7 2M 128k", "-c", "write -z 0 64k", "top2.qcow2")
	must(os.MkdirAll(filepath.Join(dir, "sub"), 0o755))
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/t.qcow2")
	mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 6 4M 64k", "sub/t.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "1M")
	encOpts := "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
	mustRun(t, dir, "qemu-img", "create", "-q", "--object", objPW, "-f", "qcow2", "-o", encOpts, "encbase.qcow2", "4M")
	mustRun(t, dir, "qemu-io", "--object", objPW, "--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=encbase.qcow2", "-c", "write -P 9 0 128k")
	mustRun(t, dir, "qemu-img", "create", "-q", "--object", objPW, "-f", "qcow2", "-b", "encbase.qcow2", "-F", "qcow2", "-o", encOpts, "enctop.qcow2")
	mustRun(t, dir, "qemu-io", "--object", objPW, "--image-opts", encChain, "-c", "write -P 8 64k 128k")
	q, err := os.ReadFile(filepath.Join(dir, "q.qcow2"))
	must(err)
	for _, c := range []struct {
		name  string
		field int
		v     uint64
	}{{"l1past.qcow2", 40, 1 << 40}, {"rtpast.qcow2", 48, 1 << 40}, {"l1end.qcow2", 40, uint64(len(q))}} {
		b := append([]byte(nil), q...)
		binary.BigEndian.PutUint64(b[c.field:], c.v)
		must(os.WriteFile(filepath.Join(dir, c.name), b, 0o644))
	}
}
