package blockdimg

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/testutil"
)

// TestMeasureQcow2 runs "measure -O qcow2" with qemu-img and in-process
// and wants the same output, stdout and stderr (program name aside).
func TestMeasureQcow2(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()

	// A 64 MiB raw source: data at scattered offsets, some of it not
	// cluster aligned, holes in between and at the end.
	raw := filepath.Join(dir, "src.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct{ off, n int64 }{
		{0, 4096}, {1000 << 10, 3 << 10}, {5 << 20, 130 << 10}, {(17 << 20) + 512, 512}, {63 << 20, 1 << 20},
	} {
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, int(w.n)), w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// A qcow2 source made by qemu-img with a few whole clusters written
	// (whole clusters: see the report on metadata preallocation below),
	// and a copy of it with persistent bitmaps.
	cl := filepath.Join(dir, "cl.raw")
	f, err = os.Create(cl)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 3 << 16, 4 << 16, 200 << 16} {
		if _, err := f.WriteAt(bytes.Repeat([]byte{0x5a}, 1<<16), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(32 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	qc := filepath.Join(dir, "src.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", cl, qc)
	bm := filepath.Join(dir, "bm.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", cl, bm)
	testutil.Run(t, "qemu-img", "bitmap", "--add", "-g", "4k", bm, "b0")
	testutil.Run(t, "qemu-img", "bitmap", "--add", bm, "a-longer-bitmap-name")

	sec := []string{"--object", "secret,id=sec0,data=123456"}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"default", []string{"--size", "1G"}},
		{"human", []string{"--output=human", "--size", "1G"}},
		{"odd-size", []string{"--size", "1000001"}},
		{"zero-size", []string{"--size", "0"}},
		{"cluster-4k", []string{"--size", "1G", "-o", "cluster_size=4k"}},
		{"cluster-64k", []string{"--size", "1G", "-o", "cluster_size=64k"}},
		{"cluster-2M", []string{"--size", "1G", "-o", "cluster_size=2M"}},
		{"cluster-512", []string{"--size", "100G", "-o", "cluster_size=512"}},
		{"refcount-1", []string{"--size", "1G", "-o", "refcount_bits=1"}},
		{"refcount-64", []string{"--size", "1G", "-o", "refcount_bits=64"}},
		{"extended-l2", []string{"--size", "1G", "-o", "extended_l2=on"}},
		{"extended-l2-2M", []string{"--size", "3G", "-o", "extended_l2=on,cluster_size=2M"}},
		{"prealloc-metadata", []string{"--size", "1G", "-o", "preallocation=metadata"}},
		{"prealloc-full", []string{"--size", "1G", "-o", "preallocation=full"}},
		{"prealloc-falloc", []string{"--size", "1G", "-o", "preallocation=falloc"}},
		{"compat-0.10", []string{"--size", "1G", "-o", "compat=0.10"}},
		{"large", []string{"--size", "1P"}},
		{"luks", append(sec, "--size", "1G", "-o", "encrypt.format=luks,encrypt.key-secret=sec0")},
		{"aes-ignored", []string{"--size", "1G", "-o", "encrypt.format=aes,data_file=x,data_file_raw=on"}},

		{"raw-src", []string{raw}},
		{"raw-src-human", []string{"--output=human", "-f", "raw", raw}},
		{"raw-src-4k", []string{"-o", "cluster_size=4k", raw}},
		{"raw-src-512", []string{"-o", "cluster_size=512", raw}},
		{"raw-src-2M", []string{"-o", "cluster_size=2M", raw}},
		{"raw-src-full", []string{"-o", "preallocation=full", raw}},
		{"raw-src-metadata", []string{"-o", "preallocation=metadata", raw}},
		{"raw-src-backing", []string{"-o", "backing_file=base.img", raw}},
		{"raw-src-extl2", []string{"-o", "extended_l2=on", raw}},
		{"qcow2-src", []string{qc}},
		{"qcow2-src-4k", []string{"-o", "cluster_size=4k", qc}},
		{"qcow2-src-v2", []string{"-o", "compat=0.10", qc}},
		{"qcow2-src-bitmaps", []string{bm}},
		{"qcow2-src-bitmaps-1k", []string{"--output=human", "-o", "cluster_size=1k", bm}},

		{"bad-cluster", []string{"--size", "1G", "-o", "cluster_size=3000"}},
		{"bad-cluster-extl2", []string{"--size", "1G", "-o", "extended_l2=on,cluster_size=8k"}},
		{"bad-compat", []string{"--size", "1G", "-o", "compat=v3"}},
		{"bad-refcount", []string{"--size", "1G", "-o", "refcount_bits=3"}},
		{"bad-refcount-v2", []string{"--size", "1G", "-o", "compat=0.10,refcount_bits=8"}},
		{"bad-prealloc", []string{"--size", "1G", "-o", "preallocation=bogus"}},
		{"too-large", []string{"--size", "1P", "-o", "cluster_size=512"}},
		{"too-large-opt", []string{"-o", "size=1P,cluster_size=512", raw}},
		{"luks-no-secret", []string{"--size", "1G", "-o", "encrypt.format=luks"}},
		{"luks-bad-secret", []string{"--size", "1G", "-o", "encrypt.format=luks,encrypt.key-secret=nosuch"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"measure", "--output=json", "-O", "qcow2"}, tc.args...)
			want, _ := testutil.RunErr("qemu-img", args...)
			want = strings.ReplaceAll(want, "qemu-img: ", Prog+": ")
			var out, errb bytes.Buffer
			Main(args, &out, &errb)
			if got := out.String() + errb.String(); got != want {
				t.Errorf("%v:\n%s\nqemu-img:\n%s", tc.args, got, want)
			}
		})
	}
}
