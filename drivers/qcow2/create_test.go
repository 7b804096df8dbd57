package qcow2_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestCreateMatchesQemuImg creates images with blockdev-create and with
// qemu-img create and compares them byte for byte.
func TestCreateMatchesQemuImg(t *testing.T) {
	cases := []struct {
		name    string
		qemu    []string // -o options
		blockd  string   // blockdev-create members
		size    int64
		backing bool
	}{
		{"default", nil, ``, 64 << 20, false},
		{"v2", []string{"compat=0.10"}, `,"version":"v2"`, 64 << 20, false},
		{"c512", []string{"cluster_size=512"}, `,"cluster-size":512`, 64 << 20, false},
		{"c4k", []string{"cluster_size=4096"}, `,"cluster-size":4096`, 100 << 20, false},
		{"c2m", []string{"cluster_size=2M"}, `,"cluster-size":2097152`, 1 << 30, false},
		{"refcount1", []string{"refcount_bits=1"}, `,"refcount-bits":1`, 64 << 20, false},
		{"refcount64", []string{"refcount_bits=64"}, `,"refcount-bits":64`, 64 << 20, false},
		{"lazy", []string{"lazy_refcounts=on"}, `,"lazy-refcounts":true`, 64 << 20, false},
		{"extl2", []string{"extended_l2=on"}, `,"extended-l2":true`, 64 << 20, false},
		{"zstd", []string{"compression_type=zstd"}, `,"compression-type":"zstd"`, 64 << 20, false},
		{"prealloc-metadata", []string{"preallocation=metadata"}, `,"preallocation":"metadata"`, 8 << 20, false},
		{"prealloc-metadata-c512", []string{"preallocation=metadata", "cluster_size=512"}, `,"preallocation":"metadata","cluster-size":512`, 1 << 20, false},
		{"backing", []string{"backing_file=base.qcow2", "backing_fmt=qcow2"}, `,"backing-file":"base.qcow2","backing-fmt":"qcow2"`, 64 << 20, true},
		{"odd-size", nil, ``, 64<<20 + 512, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			if c.backing {
				qemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "64M")
			}
			q := filepath.Join(dir, "q.qcow2")
			b := filepath.Join(dir, "b.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			for _, o := range c.qemu {
				args = append(args, "-o", o)
			}
			if c.backing {
				args = append(args, "-u")
			}
			qemuImg(t, append(args, q, fmt.Sprint(c.size))...)
			blockdevCreate(t, b, fmt.Sprintf(`,"size":%d%s`, c.size, c.blockd))
			want, _ := os.ReadFile(q)
			got, _ := os.ReadFile(b)
			equalOrFail(t, "image bytes", got, want)
			checkClean(t, b)
		})
	}
}
