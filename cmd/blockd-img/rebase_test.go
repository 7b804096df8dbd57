package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// encArgs open the encrypted chain (enctop.qcow2 over encbase.qcow2).
var encArgs = []string{"--object", objPW, "--image-opts", encChain}

// rebaseCommitCases are the differential cases of rebase and commit.
var rebaseCommitCases = []diffCase{
	// rebase -u: the header only.
	{name: "rebase-unsafe", args: args("rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual", check: chainCheck("top.qcow2")},
	{name: "rebase-unsafe-missing", args: args("rebase", "-u", "-b", "nosuch.qcow2", "-F", "qcow2", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("info", "--output=json", "-U", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing="), afterOut: "json"},
	{name: "rebase-unsafe-none", args: args("rebase", "-u", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual", check: chainCheck("top.qcow2")},
	{name: "rebase-unsafe-other-format", args: args("rebase", "-u", "-b", "x.vmdk", "-F", "vmdk", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("info", "--output=json", "-U", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing="), afterOut: "json"},
	{name: "rebase-unsafe-relative", args: args("rebase", "-u", "-b", "../other.qcow2", "-F", "qcow2", "sub/t.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("info", "--output=json", "sub/t.qcow2"), afterOut: "json-noactual", check: chainCheck("sub/t.qcow2")},
	// Safe rebase: the contents stay.
	{name: "rebase-safe", args: args("rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "top.qcow2"), afterOut: "text", check: unchanged("top.qcow2")},
	{name: "rebase-safe-none", args: args("rebase", "-b", "", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "top.qcow2"), afterOut: "text", check: unchanged("top.qcow2")},
	{name: "rebase-safe-in-chain", args: args("rebase", "-b", "base.qcow2", "-F", "qcow2", "top2.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "top2.qcow2"), afterOut: "text", check: unchanged("top2.qcow2")},
	{name: "rebase-safe-3-layers", args: args("rebase", "-b", "other.qcow2", "-F", "qcow2", "top2.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "top2.qcow2"), afterOut: "text", check: unchanged("top2.qcow2")},
	{name: "rebase-safe-relative", args: args("rebase", "-b", "../other.qcow2", "-F", "qcow2", "sub/t.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "sub/t.qcow2"), afterOut: "text", check: unchanged("sub/t.qcow2")},
	{name: "rebase-safe-quiet", args: args("rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), out: "text", stderr: true, mutates: true,
		check: unchanged("top.qcow2")},
	{name: "rebase-safe-progress", args: args("rebase", "-p", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), stderr: true, mutates: true,
		check: unchanged("top.qcow2")},
	{name: "rebase-safe-raw-backing", args: args("rebase", "-b", "r.img", "-F", "raw", "-T", "none", "top.qcow2"), out: "text", stderr: true, mutates: true,
		after: args("map", "--output=json", "top.qcow2"), afterOut: "text", check: unchanged("top.qcow2")},
	{name: "rebase-encrypted-none", args: args("rebase", "-b", "", encArgs), out: "text", stderr: true, mutates: true, check: encCheck(false)},
	// Errors.
	{name: "rebase-no-backing-option", args: args("rebase", "top.qcow2"), stderr: true},
	{name: "rebase-two-files", args: args("rebase", "-u", "top.qcow2", "r.img"), stderr: true},
	{name: "rebase-compress", args: args("rebase", "-c", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"), stderr: true},
	{name: "rebase-bad-cache", args: args("rebase", "-t", "foo", "-b", "other.qcow2", "top.qcow2"), stderr: true},
	{name: "rebase-bad-src-cache", args: args("rebase", "-T", "foo", "-b", "other.qcow2", "top.qcow2"), stderr: true},
	{name: "rebase-missing-backing", args: args("rebase", "-b", "nosuch.qcow2", "-F", "qcow2", "top.qcow2"), stderr: true, mutates: true},
	{name: "rebase-relative-missing", args: args("rebase", "-b", "other.qcow2", "-F", "qcow2", "sub/t.qcow2"), stderr: true, mutates: true},
	{name: "rebase-bad-format", args: args("rebase", "-b", "other.qcow2", "-F", "foo", "top.qcow2"), stderr: true, mutates: true},
	{name: "rebase-no-format", args: args("rebase", "-b", "other.qcow2", "top.qcow2"), stderr: true, mutates: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual"},
	{name: "rebase-unsafe-no-format", args: args("rebase", "-u", "-b", "other.qcow2", "top.qcow2"), stderr: true, mutates: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual"},
	{name: "rebase-raw", args: args("rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", "-f", "raw", "r.img"), stderr: true, mutates: true},
	{name: "rebase-raw-safe-probed", args: args("rebase", "-b", "other.qcow2", "-F", "qcow2", "r.img"), stderr: true, mutates: true},
	{name: "rebase-raw-none", args: args("rebase", "-u", "-b", "", "-f", "raw", "r.img"), stderr: true, mutates: true},
	{name: "rebase-luks", args: args("rebase", "-u", "-b", "r.img", "-F", "raw", lk("l1.img")), stderr: true, mutates: true},
	{name: "rebase-name-too-long", args: args("rebase", "-u", "-b", strings.Repeat("n", 1024), "-F", "qcow2", "top.qcow2"), stderr: true, mutates: true},
	{name: "rebase-header-full", args: args("rebase", "-u", "-b", strings.Repeat("n", 450), "-F", "qcow2", "small.qcow2"), stderr: true, mutates: true,
		after: args("info", "--output=json", "small.qcow2"), afterOut: "json-noactual"},
	{name: "rebase-encrypted-relative", args: args("rebase", "-b", "other.qcow2", "-F", "qcow2", encArgs), stderr: true, mutates: true},

	// commit
	{name: "commit", args: args("commit", "top.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("top.qcow2", "base.qcow2")},
	{name: "commit-keep", args: args("commit", "-d", "top.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("top.qcow2", "base.qcow2")},
	{name: "commit-3-layers", args: args("commit", "top2.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("top2.qcow2", "top.qcow2", "base.qcow2")},
	{name: "commit-base", args: args("commit", "-b", "base.qcow2", "top2.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("top2.qcow2", "top.qcow2", "base.qcow2")},
	{name: "commit-relative", args: args("commit", "-b", "../base.qcow2", "sub/t.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("sub/t.qcow2", "base.qcow2")},
	{name: "commit-quiet-rate", args: args("commit", "-q", "-r", "1G", "-t", "none", "top2.qcow2"), out: "text", stderr: true, mutates: true,
		check: committed("top2.qcow2", "top.qcow2", "base.qcow2")},
	{name: "commit-progress", args: args("commit", "-p", "top.qcow2"), stderr: true, mutates: true,
		check: committed("top.qcow2", "base.qcow2")},
	{name: "commit-encrypted", args: args("commit", encArgs), out: "text", stderr: true, mutates: true, check: encCheck(true)},
	{name: "commit-encrypted-keep", args: args("commit", "-d", encArgs), out: "text", stderr: true, mutates: true, check: encCheck(true)},
	{name: "commit-no-backing", args: args("commit", "base.qcow2"), stderr: true, mutates: true},
	{name: "commit-raw", args: args("commit", "r.img"), stderr: true, mutates: true},
	{name: "commit-base-missing", args: args("commit", "-b", "nosuch.qcow2", "top2.qcow2"), stderr: true, mutates: true},
	{name: "commit-base-self", args: args("commit", "-b", "top2.qcow2", "top2.qcow2"), stderr: true, mutates: true},
	{name: "commit-relative-wrong", args: args("commit", "-b", "base.qcow2", "sub/t.qcow2"), stderr: true, mutates: true},
	{name: "commit-bad-rate", args: args("commit", "-r", "foo", "top.qcow2"), stderr: true},
	{name: "commit-negative-rate", args: args("commit", "-r", "-1", "top.qcow2"), stderr: true},
	{name: "commit-bad-cache", args: args("commit", "-t", "foo", "top.qcow2"), stderr: true},
	{name: "commit-no-file", args: args("commit"), stderr: true},
	{name: "commit-force-share", args: args("commit", "-U", "top.qcow2"), stderr: true},
}

func init() { diffCases = append(diffCases, rebaseCommitCases...) }

// unchanged checks an image a safe rebase changed: its contents are the
// fixture's, in both directories, and chainCheck holds.
func unchanged(img string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		for _, d := range []string{qdir, bdir} {
			mustRun(t, d, "qemu-img", "compare", filepath.Join(fixtureDir, img), img)
		}
		chainCheck(img)(t, qdir, bdir)
	}
}

// chainCheck checks images after both tools changed them: qemu-img
// finds blockd-img's clean, with the same contents as qemu-img's and the
// same allocation (host offsets aside).
func chainCheck(imgs ...string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		for _, img := range imgs {
			mustRun(t, bdir, "qemu-img", "check", img)
			mustRun(t, bdir, "qemu-img", "compare", filepath.Join(qdir, img), img)
			if q, b := mapLayout(t, qdir, img), mapLayout(t, bdir, img); !reflect.DeepEqual(q, b) {
				t.Errorf("%s: allocation differs\nqemu-img:   %v\nblockd-img: %v", img, q, b)
			}
		}
	}
}

// committed checks a commit of top down to base: every image is clean
// and as qemu-img left it (contents and allocation), and the top image
// still shows its original contents.
func committed(top string, below ...string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		chainCheck(append([]string{top}, below...)...)(t, qdir, bdir)
		mustRun(t, bdir, "qemu-img", "compare", filepath.Join(fixtureDir, top), top)
	}
}

// mapLayout is qemu-img map's JSON of img without host offsets, runs of
// the same kind merged.
func mapLayout(t *testing.T, dir, img string) []string {
	t.Helper()
	var ext []struct {
		Start, Length, Depth int64
		Present, Zero, Data  bool
	}
	if err := json.Unmarshal([]byte(mustRun(t, dir, "qemu-img", "map", "--output=json", img)), &ext); err != nil {
		t.Fatal(err)
	}
	var out []string
	var last string
	start, end := int64(0), int64(0)
	for _, e := range ext {
		kind := fmt.Sprintf("depth %d present %v zero %v data %v", e.Depth, e.Present, e.Zero, e.Data)
		if kind != last && end > start {
			out = append(out, fmt.Sprintf("[%d, %d) %s", start, end, last))
			start = e.Start
		}
		last, end = kind, e.Start+e.Length
	}
	return append(out, fmt.Sprintf("[%d, %d) %s", start, end, last))
}

// encCheck checks the encrypted chain after both tools changed it: both
// images are clean and the top shows its original contents; after a
// commit the base holds them too.
func encCheck(commit bool) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		for _, d := range []string{qdir, bdir} {
			top := "driver=qcow2,encrypt.key-secret=s0,file.filename=enctop.qcow2"
			if commit {
				top = encChain
			}
			for _, img := range []string{"driver=qcow2,encrypt.key-secret=s0,file.filename=encbase.qcow2", top} {
				mustRun(t, d, "qemu-img", "check", "--object", objPW, "--image-opts", img)
			}
			reads := []string{"-c", "read -P 9 0 64k", "-c", "read -P 8 64k 128k", "-c", "read -P 0 192k 64k"}
			out := mustRun(t, d, "qemu-io", append([]string{"--object", objPW, "--image-opts", top}, reads...)...)
			if commit {
				out += mustRun(t, d, "qemu-io", append([]string{"--object", objPW, "--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=encbase.qcow2"}, reads...)...)
			}
			if strings.Contains(out, "Pattern verification failed") {
				t.Errorf("%s: contents changed:\n%s", d, out)
			}
		}
	}
}
