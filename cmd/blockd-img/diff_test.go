package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// extensionKeys are JSON members blockd-img reports beyond qemu-img 7.2's
// (LUKS2 and detached-header details; see docs/blockd-img.md).
var extensionKeys = map[string]bool{
	"detached-header": true, "version": true, "sector-size": true, "label": true, "subsystem": true,
	"keyslot": true, "kdf": true, "key-size": true, "area-size": true, "memory": true, "threads": true, "priority": true,
}

// diffCase is one command line run with both tools.
type diffCase struct {
	name string
	args []string
	// out says how stdout is compared: "text" (identical), "json" (field
	// for field), "first" (first line), "" (not at all).
	out string
	// stderr compares stderr too, with the program names normalised.
	stderr bool
	// mutates runs each tool on its own copy of the fixture.
	mutates bool
	// after runs a read-only qemu-img command in each tool's directory
	// afterwards and compares its output ("json" or "text" as afterOut).
	after    []string
	afterOut string
	// check is called with both directories afterwards.
	check func(t *testing.T, qdir, bdir string)
	// gap, when set, is a known difference (docs/blockd-img.md): the
	// case is skipped with that reason.
	gap string
}

// lk names a LUKS image opened with the passphrase in pw.
func lk(file string) []string {
	return []string{"--object", objPW, "--image-opts", "driver=luks,key-secret=s0,file.filename=" + file}
}

// lk2 is lk with the second passphrase (pw2, secret s1) defined too.
func lk2(file string) []string {
	return []string{"--object", objPW, "--object", objPW2, "--image-opts", "driver=luks,key-secret=s0,file.filename=" + file}
}

func args(a ...any) []string {
	var out []string
	for _, x := range a {
		switch v := x.(type) {
		case string:
			out = append(out, v)
		case []string:
			out = append(out, v...)
		}
	}
	return out
}

var diffCases = []diffCase{
	// info
	{name: "info-probe", args: args("info", "r.img"), out: "text"},
	{name: "info-json", args: args("info", "--output=json", "r.img"), out: "json"},
	{name: "info-json-space", args: args("info", "--output", "json", "-f", "raw", "r.img"), out: "text"},
	{name: "info-file-driver", args: args("info", "--output=json", "-f", "file", "r.img"), out: "json"},
	{name: "info-image-opts", args: args("info", "--output=json", "--image-opts", "driver=raw,file.filename=r.img"), out: "json"},
	{name: "info-json-filename", args: args("info", "--output=json", `json:{"driver":"raw","offset":512,"file":{"filename":"r.img"}}`), out: "json"},
	{name: "info-json-file-only", args: args("info", `json:{"file":{"driver":"file","filename":"r.img"}}`), out: "text"},
	{name: "info-chain", args: args("info", "--backing-chain", "--output=json", "r.img"), out: "json"},
	{name: "info-chain-human", args: args("info", "--backing-chain", "r.img"), out: "text"},
	{name: "info-force-share", args: args("info", "-U", "--output=json", "r.img"), out: "json"},
	{name: "info-odd", args: args("info", "--output=json", "odd.img"), out: "json"},
	{name: "info-luks-nokey", args: args("info", "--output=json", "l1.img"), out: "json"},
	{name: "info-luks-key", args: args("info", "--output=json", lk("l1.img")), out: "json"},
	{name: "info-missing", args: args("info", "nosuch.img"), stderr: true},
	{name: "info-bad-output", args: args("info", "--output=xml", "r.img"), stderr: true},
	{name: "info-no-file", args: args("info"), stderr: true},
	{name: "info-two-files", args: args("info", "r.img", "r2.img"), stderr: true},
	{name: "info-bad-option", args: args("info", "--bogus", "r.img"), stderr: true},
	{name: "info-missing-arg", args: args("info", "r.img", "-f"), stderr: true},
	{name: "info-image-opts-and-f", args: args("info", "-f", "raw", "--image-opts", "driver=raw,file.filename=r.img"), stderr: true},
	{name: "info-bad-object", args: args("info", "--object", "secret,id=x", "r.img"), stderr: true},
	{name: "info-bad-driver", args: args("info", "-f", "nosuch", "r.img")},
	{name: "no-command", args: args("nosuch"), stderr: true},

	// map
	{name: "map-human", args: args("map", "r.img"), out: "text", stderr: true},
	{name: "map-json", args: args("map", "--output=json", "r.img"), out: "text"},
	{name: "map-json-src", args: args("map", "--output=json", "-f", "raw", "src.img"), out: "text"},
	{name: "map-range", args: args("map", "--output=json", "--start-offset=1M", "--max-length", "3M", "r.img"), out: "text"},
	{name: "map-luks-json", args: args("map", "--output=json", lk("l1.img")), out: "text"},
	{name: "map-luks-human", args: args("map", lk("l1.img")), out: "text", stderr: true},
	{name: "map-luks-nokey", args: args("map", "l1.img"), stderr: true},

	// check
	{name: "check-raw", args: args("check", "r.img"), stderr: true},
	{name: "check-raw-json", args: args("check", "--output=json", "-f", "raw", "r.img"), out: "text", stderr: true},
	{name: "check-luks", args: args("check", lk("l1.img")), stderr: true},
	{name: "check-bad-r", args: args("check", "-r", "some", "r.img"), stderr: true},

	// compare
	{name: "compare-same", args: args("compare", "r.img", "r.img"), out: "text"},
	{name: "compare-differ", args: args("compare", "r.img", "r2.img"), out: "text"},
	{name: "compare-size", args: args("compare", "r.img", "r3.img"), out: "text"},
	{name: "compare-strict-size", args: args("compare", "-s", "r.img", "r3.img"), out: "text"},
	{name: "compare-quiet", args: args("compare", "-q", "r.img", "r2.img"), out: "text"},
	{name: "compare-missing", args: args("compare", "r.img", "nosuch.img"), stderr: true},
	{name: "compare-one", args: args("compare", "r.img"), stderr: true},
	{name: "compare-luks-raw", args: args("compare", "--object", objPW, "--image-opts",
		"driver=luks,key-secret=s0,file.filename=l1.img", "driver=luks,key-secret=s0,file.filename=l1.img"), out: "text"},
	{name: "compare-formats", args: args("compare", "-f", "raw", "-F", "raw", "r3.img", "src.img"), out: "text"},

	// measure
	{name: "measure-raw", args: args("measure", "-O", "raw", "r.img"), out: "text"},
	{name: "measure-raw-json", args: args("measure", "--output=json", "-O", "raw", "src.img"), out: "json"},
	{name: "measure-size", args: args("measure", "--size", "1G", "-O", "raw"), out: "text"},
	{name: "measure-luks", args: args("measure", "--object", objPW, "--size", "1G", "-O", "luks", "-o", "key-secret=s0"), out: "text"},
	{name: "measure-luks-json", args: args("measure", "--object", objPW, "--output=json", "-O", "luks", "-o", "key-secret=s0", "r.img"), out: "json"},
	{name: "measure-luks-nokey", args: args("measure", "--size", "1G", "-O", "luks"), stderr: true},
	{name: "measure-both", args: args("measure", "--size", "1G", "r.img"), stderr: true},
	{name: "measure-none", args: args("measure"), stderr: true},

	// snapshot
	{name: "snapshot-list-raw", args: args("snapshot", "-l", "r.img"), out: "text", stderr: true},
	{name: "snapshot-create-raw", args: args("snapshot", "-c", "s1", "r.img"), mutates: true, stderr: true},
	{name: "snapshot-apply-raw", args: args("snapshot", "-a", "s1", "r.img"), mutates: true, stderr: true},
	{name: "snapshot-delete-raw", args: args("snapshot", "-d", "s1", "r.img"), mutates: true, stderr: true},
	{name: "snapshot-mix", args: args("snapshot", "-l", "-c", "x", "r.img"), stderr: true},

	// resize
	{name: "resize-grow", args: args("resize", "-f", "raw", "r.img", "+1M"), out: "text", mutates: true,
		after: args("info", "--output=json", "-f", "raw", "r.img"), afterOut: "json"},
	{name: "resize-abs", args: args("resize", "-f", "raw", "r.img", "64M"), out: "text", mutates: true,
		after: args("info", "--output=json", "-f", "raw", "r.img"), afterOut: "json"},
	{name: "resize-shrink-refused", args: args("resize", "-f", "raw", "r.img", "-1M"), mutates: true, stderr: true},
	{name: "resize-shrink", args: args("resize", "-f", "raw", "--shrink", "r.img", "-1M"), out: "text", mutates: true,
		after: args("map", "--output=json", "-f", "raw", "r.img"), afterOut: "text"},
	{name: "resize-zero", args: args("resize", "-f", "raw", "r.img", "0"), mutates: true, stderr: true},
	{name: "resize-prealloc", args: args("resize", "-f", "raw", "--preallocation=full", "r.img", "+1M"), out: "text", mutates: true,
		after: args("map", "--output=json", "-f", "raw", "r.img"), afterOut: "text"},
	{name: "resize-bad-prealloc", args: args("resize", "-f", "raw", "--preallocation=foo", "r.img", "+1M"), stderr: true},
	{name: "resize-bad-size", args: args("resize", "-f", "raw", "r.img", "1x"), stderr: true},
	{name: "resize-luks", args: args("resize", lk("l1.img"), "+4M"), out: "text", mutates: true,
		after: args("info", "--output=json", "-f", "raw", "l1.img"), afterOut: "json"},

	// create
	{name: "create-raw", args: args("create", "-f", "raw", "new.img", "1G"), out: "text", mutates: true,
		after: args("map", "--output=json", "-f", "raw", "new.img"), afterOut: "text"},
	{name: "create-raw-odd", args: args("create", "-f", "raw", "new.img", "1000"), out: "text", mutates: true,
		after: args("info", "--output=json", "-f", "raw", "new.img"), afterOut: "json"},
	{name: "create-raw-fraction", args: args("create", "new.img", "1.5M"), out: "text", mutates: true,
		after: args("info", "--output=json", "-f", "raw", "new.img"), afterOut: "json"},
	{name: "create-raw-prealloc", args: args("create", "-f", "raw", "-o", "preallocation=full", "new.img", "4M"), out: "text", mutates: true,
		after: args("map", "--output=json", "-f", "raw", "new.img"), afterOut: "text"},
	{name: "create-raw-options", args: args("create", "-f", "raw", "-o", "nocow=on", "-o", "extent_size_hint=2M", "new.img", "4M"), out: "text", mutates: true},
	{name: "create-raw-size-option", args: args("create", "-f", "raw", "-o", "size=3M", "new.img"), out: "text", mutates: true},
	{name: "create-quiet", args: args("create", "-q", "-f", "raw", "new.img", "1M"), out: "text", mutates: true},
	{name: "create-file", args: args("create", "-f", "file", "new.img", "1M"), out: "text", mutates: true},
	{name: "create-bad-option", args: args("create", "-f", "raw", "-o", "foo=1", "new.img", "1M"), stderr: true},
	{name: "create-bad-size", args: args("create", "-f", "raw", "new.img", "1Q"), stderr: true},
	{name: "create-no-size", args: args("create", "-f", "raw", "new.img"), stderr: true},
	{name: "create-size-twice", args: args("create", "-f", "raw", "-o", "size=1M", "new.img", "2M"), stderr: true},
	{name: "create-backing-raw", args: args("create", "-f", "raw", "-b", "r.img", "new.img"), stderr: true},
	{name: "create-bad-bool", args: args("create", "-f", "raw", "-o", "nocow=maybe", "new.img", "1M"), stderr: true},
	{name: "create-bad-list", args: args("create", "-f", "raw", "-o", ",nocow=on", "new.img", "1M"), stderr: true},
	{name: "create-unknown-fmt", args: args("create", "-f", "nosuch", "new.img", "1M"), stderr: true},
	{name: "create-no-create", args: args("create", "-f", "null-co", "new.img", "1M")},
	{name: "create-luks-nokey", args: args("create", "-f", "luks", "new.img", "1M"), out: "text", stderr: true, mutates: true},
	{name: "create-help", args: args("create", "-f", "raw", "-o", "help"), out: "text"},
	{name: "create-extra-arg", args: args("create", "-f", "raw", "new.img", "1M", "x"), stderr: true},
	{name: "create-luks", args: args("create", "--object", objPW, "-f", "luks", "-o", "key-secret=s0,iter-time=100", "new.img", "8M"),
		out: "text", mutates: true, check: checkLUKSCreate},

	// amend
	{name: "amend-luks-add", args: args("amend", "-o", "state=active,new-secret=s1,iter-time=100", lk2("l1.img")), mutates: true, stderr: true, check: checkSlots(map[int]bool{0: true, 1: true})},
	{name: "amend-luks-slot", args: args("amend", "-o", "state=active,new-secret=s1,keyslot=5,iter-time=100", lk2("l1.img")), mutates: true, stderr: true, check: checkSlots(map[int]bool{0: true, 5: true})},
	{name: "amend-luks-erase-last", args: args("amend", "-o", "state=inactive,keyslot=0", lk("l1.img")), mutates: true, stderr: true},
	{name: "amend-luks-erase-inactive", args: args("amend", "-o", "state=inactive,keyslot=3", lk("l1.img")), mutates: true, stderr: true},
	{name: "amend-luks-erase-pw", args: args("amend", "-o", "state=inactive,old-secret=s0", lk("l1.img")), mutates: true, stderr: true},
	{name: "amend-luks-force", args: args("amend", "--force", "-o", "state=inactive,keyslot=0", lk("l1.img")), mutates: true, stderr: true,
		after: args("info", "--output=json", "l1.img"), afterOut: "json"},
	{name: "amend-luks-no-state", args: args("amend", "-o", "keyslot=0", lk("l1.img")), mutates: true, stderr: true},
	{name: "amend-help", args: args("amend", "-f", "luks", "-o", "help")},
	{name: "amend-raw", args: args("amend", "-f", "raw", "-o", "size=1M", "r.img"), stderr: true},
	{name: "amend-no-options", args: args("amend", "r.img"), stderr: true},
	{name: "amend-bad-option", args: args("amend", "-o", "foo=bar", lk("l1.img")), stderr: true},
	{name: "amend-create-option", args: args("amend", "-o", "cipher-alg=aes-128", lk("l1.img")), stderr: true},

	// convert
	{name: "convert-raw", args: args("convert", "-f", "raw", "-O", "raw", "src.img", "out.img"), out: "text", mutates: true,
		after: args("map", "--output=json", "-f", "raw", "out.img"), afterOut: "text", check: sameAs("src.img", "out.img")},
	{name: "convert-probe", args: args("convert", "src.img", "out.img"), out: "text", mutates: true, check: sameAs("src.img", "out.img")},
	{name: "convert-S0", args: args("convert", "-S", "0", "-f", "raw", "-O", "raw", "src.img", "out.img"), mutates: true,
		after: args("map", "--output=json", "-f", "raw", "out.img"), afterOut: "text", check: sameAs("src.img", "out.img")},
	{name: "convert-S64k", args: args("convert", "-S", "64k", "-O", "raw", "r.img", "out.img"), mutates: true,
		after: args("map", "--output=json", "-f", "raw", "out.img"), afterOut: "text", check: sameAs("r.img", "out.img")},
	{name: "convert-W-m1", args: args("convert", "-W", "-m", "1", "-O", "raw", "src.img", "out.img"), mutates: true, check: sameAs("src.img", "out.img")},
	{name: "convert-progress", args: args("convert", "-p", "-O", "raw", "src.img", "out.img"), mutates: true, check: sameAs("src.img", "out.img")},
	{name: "convert-concat", args: args("convert", "-O", "raw", "r.img", "odd.img", "src.img", "out.img"), mutates: true,
		after: args("info", "--output=json", "-f", "raw", "out.img"), afterOut: "json"},
	{name: "convert-prealloc", args: args("convert", "-O", "raw", "-o", "preallocation=falloc", "r.img", "out.img"), mutates: true,
		check: sameAs("r.img", "out.img")},
	{name: "convert-from-luks", args: args("convert", "-O", "raw", lk("l1.img"), "out.img"), mutates: true,
		after: args("map", "--output=json", "-f", "raw", "out.img"), afterOut: "text"},
	{name: "convert-to-luks", args: args("convert", "--object", objPW, "-O", "luks", "-o", "key-secret=s0,iter-time=100", "src.img", "out.img"),
		mutates: true, check: sameLUKS("src.img", "out.img")},
	{name: "convert-n-target-opts", args: args("convert", "--object", objPW, "-n", "--target-image-opts", "src.img",
		"driver=luks,key-secret=s0,file.filename=l2.img"), mutates: true},
	{name: "convert-n", args: args("convert", "-n", "-O", "raw", "r.img", "src.img"), mutates: true, check: samePrefix("r.img", "src.img")},
	{name: "convert-n-small", args: args("convert", "-n", "-O", "raw", "src.img", "r.img"), mutates: true, stderr: true},
	{name: "convert-compress-raw", args: args("convert", "-c", "-O", "raw", "r.img", "out.img"), mutates: true, stderr: true},
	{name: "convert-o-with-n", args: args("convert", "-n", "-o", "preallocation=full", "r.img", "out.img"), stderr: true},
	{name: "convert-tio-without-n", args: args("convert", "--target-image-opts", "r.img", "driver=raw,file.filename=out.img"), stderr: true},
	{name: "convert-bad-m", args: args("convert", "-m", "17", "r.img", "out.img"), stderr: true},
	{name: "convert-bad-S", args: args("convert", "-S", "1000", "r.img", "out.img"), stderr: true},
	{name: "convert-one-arg", args: args("convert", "r.img"), stderr: true},
	{name: "convert-missing", args: args("convert", "nosuch.img", "out.img"), stderr: true},

	// qcow2
	{name: "qcow2-info", args: args("info", "q.qcow2"), out: "text"},
	{name: "qcow2-info-json", args: args("info", "--output=json", "q.qcow2"), out: "json"},
	{name: "qcow2-info-chain", args: args("info", "--backing-chain", "top.qcow2"), out: "text"},
	{name: "qcow2-info-chain-json", args: args("info", "--backing-chain", "--output=json", "top.qcow2"), out: "json"},
	{name: "qcow2-map-chain", args: args("map", "--output=json", "top.qcow2"), out: "text"},
	{name: "qcow2-map-unallocated", args: args("map", "--output=json", "--start-offset=12M", "q.qcow2"), out: "text"},
	{name: "qcow2-compare", args: args("compare", "q.qcow2", "src.img"), out: "text"},
	{name: "qcow2-compare-chain", args: args("compare", "top.qcow2", "base.qcow2"), out: "text"},
	{name: "qcow2-compare-strict", args: args("compare", "-s", "q.qcow2", "src.img"), out: "text"},
	{name: "qcow2-check", args: args("check", "q.qcow2"), out: "text"},
	{name: "qcow2-check-json", args: args("check", "--output=json", "q.qcow2"), out: "json"},
	{name: "qcow2-check-chain", args: args("check", "top.qcow2"), out: "text"},
	{name: "qcow2-check-repair", args: args("check", "-r", "all", "q.qcow2"), out: "text", mutates: true},
	{name: "qcow2-check-leaks", args: args("check", "leak.qcow2"), out: "text"},
	{name: "qcow2-check-leaks-json", args: args("check", "--output=json", "leak.qcow2"), out: "json"},
	{name: "qcow2-check-fix-leaks", args: args("check", "-r", "leaks", "leak.qcow2"), out: "text", mutates: true,
		after: args("check", "leak.qcow2"), afterOut: "text"},
	{name: "qcow2-check-dirty", args: args("check", "dirty.qcow2"), out: "text"},
	{name: "qcow2-check-dirty-json", args: args("check", "--output=json", "dirty.qcow2"), out: "json"},
	// QEMU rebuilds the refcount structures at the end of the file where
	// blockd corrects them in place: the image end offsets differ.
	{name: "qcow2-check-fix-dirty", args: args("check", "-r", "all", "dirty.qcow2"), out: "text-noend", mutates: true,
		after: args("check", "dirty.qcow2"), afterOut: "text-noend", check: checkedBoth("dirty.qcow2")},
	{name: "qcow2-check-fix-dirty-leaks", args: args("check", "-r", "leaks", "dirty.qcow2"), out: "text-noend", mutates: true},
	// Tables past the end of the file: QEMU opens such images (the part
	// past the end reads as zeroes) and its check reports them.
	{name: "qcow2-check-l1-past-end", args: args("check", "l1past.qcow2"), out: "text"},
	{name: "qcow2-check-l1-past-end-json", args: args("check", "--output=json", "l1past.qcow2"), out: "json"},
	{name: "qcow2-check-l1-past-end-fix", args: args("check", "-r", "all", "l1past.qcow2"), out: "text", mutates: true},
	{name: "qcow2-check-l1-past-end-fix-leaks", args: args("check", "-r", "leaks", "l1past.qcow2"), out: "text", mutates: true},
	{name: "qcow2-info-l1-past-end", args: args("info", "--output=json", "l1past.qcow2"), out: "json"},
	{name: "qcow2-check-reftable-past-end", args: args("check", "rtpast.qcow2"), out: "text"},
	{name: "qcow2-check-reftable-past-end-json", args: args("check", "--output=json", "rtpast.qcow2"), out: "json"},
	{name: "qcow2-check-reftable-past-end-fix", args: args("check", "-r", "all", "rtpast.qcow2"), out: "text-noend", mutates: true,
		after: args("check", "rtpast.qcow2"), afterOut: "text-noend", check: checkedBoth("rtpast.qcow2")},
	{name: "qcow2-check-reftable-past-end-fix-leaks", args: args("check", "-r", "leaks", "rtpast.qcow2"), out: "text", mutates: true},
	{name: "qcow2-check-l1-at-end", args: args("check", "l1end.qcow2"), out: "text"},
	{name: "qcow2-check-l1-at-end-fix", args: args("check", "-r", "all", "l1end.qcow2"), out: "text-noend", mutates: true,
		after: args("check", "l1end.qcow2"), afterOut: "text-noend", check: checkedBoth("l1end.qcow2")},
	{name: "qcow2-measure", args: args("measure", "-O", "qcow2", "src.img"), out: "text"},
	// Metadata preallocation: the file's holes read as zeroes.
	{name: "qcow2-prealloc-map", args: args("map", "--output=json", "pm.qcow2"), out: "text"},
	{name: "qcow2-prealloc-map-human", args: args("map", "pm.qcow2"), out: "text"},
	{name: "qcow2-prealloc-measure", args: args("measure", "-O", "qcow2", "pm.qcow2"), out: "text"},
	{name: "qcow2-prealloc-convert", args: args("convert", "-O", "qcow2", "pm.qcow2", "out.qcow2"), mutates: true,
		after: args("map", "--output=json", "out.qcow2"), afterOut: "text"},
	{name: "qcow2-encrypted-info-nokey", args: args("info", "enc.qcow2"), out: "text"},
	{name: "qcow2-encrypted-info-nokey-json", args: args("info", "--output=json", "enc.qcow2"), out: "json"},
	{name: "qcow2-encrypted-map-nokey", args: args("map", "enc.qcow2"), stderr: true},
	{name: "qcow2-encrypted-check", args: args("check", "--object", objPW, "--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2"), out: "text"},
	{name: "qcow2-snapshot-list", args: args("snapshot", "-l", "q.qcow2"), out: "text"},
	{name: "qcow2-snapshot-list-some", args: args("snapshot", "-l", "snap.qcow2"), out: "text"},
	{name: "qcow2-snapshot-info", args: args("info", "snap.qcow2"), out: "text"},
	{name: "qcow2-snapshot-info-json", args: args("info", "--output=json", "snap.qcow2"), out: "json"},
	{name: "qcow2-snapshot-create", args: args("snapshot", "-c", "new", "snap.qcow2"), out: "text", mutates: true, stderr: true,
		check: snapshotCheck("snap.qcow2", "s1", "s2", "new")},
	{name: "qcow2-snapshot-create-fresh", args: args("snapshot", "-c", "new", "q.qcow2"), out: "text", mutates: true, stderr: true,
		check: snapshotCheck("q.qcow2", "new")},
	{name: "qcow2-snapshot-apply", args: args("snapshot", "-a", "s1", "snap.qcow2"), out: "text", mutates: true, stderr: true,
		check: snapshotCheck("snap.qcow2", "s1", "s2")},
	{name: "qcow2-snapshot-apply-id", args: args("snapshot", "-a", "2", "snap.qcow2"), out: "text", mutates: true, stderr: true,
		check: snapshotCheck("snap.qcow2", "s1", "s2")},
	{name: "qcow2-snapshot-apply-missing", args: args("snapshot", "-a", "nosuch", "snap.qcow2"), out: "text", mutates: true, stderr: true},
	{name: "qcow2-snapshot-delete", args: args("snapshot", "-d", "s1", "snap.qcow2"), out: "text", mutates: true, stderr: true,
		check: snapshotCheck("snap.qcow2", "s2")},
	{name: "qcow2-snapshot-delete-both", args: args("snapshot", "-d", "s2", "snap.qcow2"), out: "text", mutates: true, stderr: true,
		after: args("snapshot", "-d", "s1", "snap.qcow2"), afterOut: "text", check: snapshotCheck("snap.qcow2")},
	{name: "qcow2-snapshot-convert", args: args("convert", "-l", "s1", "-O", "raw", "snap.qcow2", "out.img"), mutates: true, check: sameOutput("out.img")},
	{name: "qcow2-snapshot-convert-id", args: args("convert", "-l", "snapshot.id=2", "-O", "raw", "snap.qcow2", "out.img"), mutates: true, check: sameOutput("out.img")},
	{name: "qcow2-snapshot-convert-both", args: args("convert", "-l", "snapshot.id=2,snapshot.name=s2", "-O", "qcow2", "snap.qcow2", "out.qcow2"), mutates: true,
		after: args("map", "--output=json", "out.qcow2"), afterOut: "text"},
	{name: "qcow2-snapshot-convert-mismatch", args: args("convert", "-l", "snapshot.id=1,snapshot.name=s2", "-O", "raw", "snap.qcow2", "out.img"), mutates: true, stderr: true},
	{name: "qcow2-snapshot-convert-missing", args: args("convert", "-l", "nosuch", "-O", "raw", "snap.qcow2", "out.img"), mutates: true, stderr: true},
	{name: "qcow2-snapshot-convert-bad-param", args: args("convert", "-l", "snapshot.foo=1", "-O", "raw", "snap.qcow2", "out.img"), mutates: true, stderr: true},
	{name: "qcow2-snapshot-convert-two", args: args("convert", "-l", "s1", "-O", "raw", "snap.qcow2", "snap.qcow2", "out.img"), mutates: true, stderr: true},
	{name: "qcow2-snapshot-convert-raw", args: args("convert", "-l", "x", "-O", "raw", "r.img", "out.img"), mutates: true, stderr: true},
	{name: "qcow2-snapshot-measure", args: args("measure", "-l", "s1", "-O", "qcow2", "snap.qcow2"), out: "text"},
	{name: "qcow2-snapshot-delete-missing", args: args("snapshot", "-d", "nosuch", "snap.qcow2"), out: "text", mutates: true, stderr: true},
	{name: "qcow2-to-raw", args: args("convert", "-O", "raw", "q.qcow2", "out.img"), mutates: true, check: sameAs("src.img", "out.img"),
		after: args("map", "--output=json", "-f", "raw", "out.img"), afterOut: "text"},
	{name: "qcow2-chain-to-raw", args: args("convert", "-O", "raw", "top.qcow2", "out.img"), mutates: true,
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "top.qcow2", "out.img")
			sameAs("out.img", "out.img")(t, qdir, bdir)
		}},
	{name: "raw-to-qcow2", args: args("convert", "-O", "qcow2", "src.img", "out.qcow2"), mutates: true,
		after: args("map", "--output=json", "out.qcow2"), afterOut: "text",
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "check", "out.qcow2")
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "out.qcow2", "src.img")
		}},
	{name: "raw-to-qcow2-W", args: args("convert", "-W", "-O", "qcow2", "-o", "cluster_size=4k", "src.img", "out.qcow2"), mutates: true,
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "check", "out.qcow2")
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "out.qcow2", "src.img")
		}},
	{name: "raw-to-qcow2-compressed", args: args("convert", "-c", "-O", "qcow2", "src.img", "out.qcow2"), mutates: true,
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "check", "out.qcow2")
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "out.qcow2", "src.img")
			// Compressed like qemu-img's (the deflate streams differ,
			// so the sizes do, a little).
			qs, bs := sizeOf(t, filepath.Join(qdir, "out.qcow2")), sizeOf(t, filepath.Join(bdir, "out.qcow2"))
			if bs > qs+qs/10 {
				t.Errorf("blockd-img's compressed image is %d bytes, qemu-img's %d", bs, qs)
			}
		}},
	// One worker: its buffer holds data when it reaches the hole.
	{name: "raw-to-qcow2-compressed-m1", args: args("convert", "-c", "-m", "1", "-O", "qcow2", "src.img", "out.qcow2"), mutates: true,
		after: args("map", "--output=json", "out.qcow2"), afterOut: "text-nooffsets",
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "check", "out.qcow2")
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "out.qcow2", "src.img")
		}},
	{name: "raw-to-qcow2-compressed-zstd", args: args("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4k", "src.img", "out.qcow2"), mutates: true,
		check: func(t *testing.T, qdir, bdir string) {
			mustRun(t, bdir, "qemu-img", "check", "out.qcow2")
			mustRun(t, bdir, "qemu-img", "compare", "-F", "raw", "out.qcow2", "src.img")
		}},
	{name: "qcow2-create", args: args("create", "-f", "qcow2", "new.qcow2", "1G"), out: "text", mutates: true,
		after: args("info", "--output=json", "new.qcow2"), afterOut: "json"},
	{name: "qcow2-create-options", args: args("create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=8", "new.qcow2", "64M"),
		out: "text", mutates: true, after: args("info", "--output=json", "new.qcow2"), afterOut: "json"},
	{name: "qcow2-create-v2", args: args("create", "-f", "qcow2", "-o", "compat=0.10", "new.qcow2", "64M"),
		out: "text", mutates: true, after: args("info", "--output=json", "new.qcow2"), afterOut: "json"},
	{name: "qcow2-create-extl2", args: args("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "new.qcow2", "64M"),
		out: "text", mutates: true, after: args("info", "--output=json", "new.qcow2"), afterOut: "json"},
	{name: "qcow2-create-prealloc", args: args("create", "-f", "qcow2", "-o", "preallocation=metadata", "new.qcow2", "64M"),
		out: "text", mutates: true, after: args("check", "new.qcow2"), afterOut: "text"},
	{name: "qcow2-create-backing", args: args("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"),
		out: "text", mutates: true, after: args("info", "--output=json", "new.qcow2"), afterOut: "json"},
	{name: "qcow2-create-backing-nofmt", args: args("create", "-f", "qcow2", "-b", "base.qcow2", "new.qcow2"), out: "text", stderr: true},
	{name: "qcow2-create-backing-u", args: args("create", "-u", "-f", "qcow2", "-b", "nosuch.qcow2", "-F", "qcow2", "new.qcow2", "1M"),
		out: "text", mutates: true, after: args("info", "--output=json", "-U", "--image-opts", "driver=qcow2,file.filename=new.qcow2,backing="), afterOut: "json"},
	{name: "qcow2-create-bad-compat", args: args("create", "-f", "qcow2", "-o", "compat=2", "new.qcow2", "1M"), out: "text"},
	{name: "qcow2-resize-shrink", args: args("resize", "--shrink", "q.qcow2", "9M"), out: "text", mutates: true,
		after: args("check", "q.qcow2"), afterOut: "text", check: checkedBoth("q.qcow2")},
	{name: "qcow2-resize-shrink-chain", args: args("resize", "--shrink", "top.qcow2", "-8200k"), out: "text", mutates: true,
		after: args("map", "--output=json", "top.qcow2"), afterOut: "text", check: checkedBoth("top.qcow2")},
	{name: "qcow2-resize-shrink-no-flag", args: args("resize", "q.qcow2", "9M"), out: "text", stderr: true},
	{name: "qcow2-resize", args: args("resize", "q.qcow2", "+1M"), out: "text", mutates: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json"},
	{name: "qcow2-amend-lazy-on", args: args("amend", "-o", "lazy_refcounts=on", "q.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json-noactual", check: checkedBoth("q.qcow2")},
	// QEMU repairs the dirty image on open, printing what it repairs on
	// stderr and rebuilding the refcount structures elsewhere; blockd
	// repairs it in place, silently.
	{name: "qcow2-amend-lazy-off", args: args("amend", "-o", "lazy_refcounts=off", "dirty.qcow2"), mutates: true,
		check: checkedBoth("dirty.qcow2")},
	{name: "qcow2-amend-compat-v2", args: args("amend", "-o", "compat=0.10", "q.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json-noactual", check: checkedBoth("q.qcow2")},
	{name: "qcow2-amend-compat-v2-zero", args: args("amend", "-o", "compat=0.10", "top.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual", check: checkedBoth("top.qcow2")},
	{name: "qcow2-amend-compat-v2-check", args: args("amend", "-o", "compat=0.10", "top.qcow2"), mutates: true, stderr: true,
		after: args("check", "top.qcow2"), afterOut: "text", check: checkedBoth("top.qcow2")},
	{name: "qcow2-amend-compat-v2-zero-nobacking", args: args("amend", "-o", "compat=v2", "base.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "base.qcow2"), afterOut: "json-noactual", check: checkedBoth("base.qcow2")},
	{name: "qcow2-amend-compat-bad", args: args("amend", "-o", "compat=2", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-compat-v3", args: args("amend", "-o", "compat=1.1", "v2.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "v2.qcow2"), afterOut: "json-noactual", check: checkedBoth("v2.qcow2")},
	{name: "qcow2-amend-compat-v3-lazy", args: args("amend", "-o", "compat=1.1,lazy_refcounts=on", "v2.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "v2.qcow2"), afterOut: "json-noactual", check: checkedBoth("v2.qcow2")},
	{name: "qcow2-amend-lazy-on-v2", args: args("amend", "-o", "lazy_refcounts=on", "v2.qcow2"), mutates: true, stderr: true,
		after: args("check", "v2.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-backing", args: args("amend", "-o", "backing_file=x", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-backing-same", args: args("amend", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "top.qcow2"), afterOut: "json-noactual", check: checkedBoth("top.qcow2")},
	{name: "qcow2-amend-size-grow", args: args("amend", "-o", "size=64M", "q.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json-noactual", check: checkedBoth("q.qcow2")},
	{name: "qcow2-amend-size-shrink", args: args("amend", "-o", "size=16M", "q.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json-noactual", check: checkedBoth("q.qcow2")},
	{name: "qcow2-amend-refcount8", args: args("amend", "-o", "refcount_bits=8", "q.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "q.qcow2"), afterOut: "json-noactual", check: checkedBoth("q.qcow2")},
	{name: "qcow2-amend-refcount8-check", args: args("amend", "-o", "refcount_bits=8", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text", check: checkedBoth("q.qcow2")},
	{name: "qcow2-amend-refcount64-check", args: args("amend", "-o", "refcount_bits=64", "top.qcow2"), mutates: true, stderr: true,
		after: args("check", "top.qcow2"), afterOut: "text", check: checkedBoth("top.qcow2")},
	{name: "qcow2-amend-refcount1-snap", args: args("amend", "-o", "refcount_bits=1", "snap.qcow2"), mutates: true, stderr: true,
		after: args("check", "snap.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-refcount-bad", args: args("amend", "-o", "refcount_bits=3", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-refcount-v2", args: args("amend", "-o", "refcount_bits=8", "v2.qcow2"), mutates: true, stderr: true,
		after: args("check", "v2.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-cluster-size", args: args("amend", "-o", "cluster_size=4k", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-data-file-raw", args: args("amend", "-o", "data_file_raw=on", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-data-file", args: args("amend", "-o", "data_file=x", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-encrypt-add", args: args("amend", "--object", objPW, "--object", objPW2, "-o", "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
		"--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2"), mutates: true, stderr: true, check: encSlots(map[int]bool{0: true, 1: true})},
	{name: "qcow2-amend-encrypt-slot", args: args("amend", "--object", objPW, "--object", objPW2, "-o", "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10,encrypt.keyslot=4",
		"--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2"), mutates: true, stderr: true, check: encSlots(map[int]bool{0: true, 4: true})},
	{name: "qcow2-amend-encrypt-erase-last", args: args("amend", "--object", objPW, "-o", "encrypt.state=inactive,encrypt.keyslot=0",
		"--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2"), mutates: true, stderr: true},
	{name: "qcow2-amend-encrypt-erase-force", args: args("amend", "--force", "--object", objPW, "-o", "encrypt.state=inactive,encrypt.old-secret=s0",
		"--image-opts", "driver=qcow2,encrypt.key-secret=s0,file.filename=enc.qcow2"), mutates: true, stderr: true, check: encSlots(map[int]bool{})},
	{name: "qcow2-amend-encrypt", args: args("amend", "-o", "encrypt.new-secret=s0", "q.qcow2"), mutates: true, stderr: true,
		after: args("check", "q.qcow2"), afterOut: "text"},
	{name: "qcow2-amend-snapshots-v2", args: args("amend", "-o", "compat=0.10", "snap.qcow2"), mutates: true, stderr: true,
		after: args("info", "--output=json", "snap.qcow2"), afterOut: "json-noactual", check: checkedBoth("snap.qcow2")},

	// bench
	{name: "bench-read", args: args("bench", "-c", "2000", "-d", "8", "-f", "raw", "r.img"), out: "first"},
	{name: "bench-write", args: args("bench", "-w", "-c", "2000", "-d", "8", "-s", "8k", "--flush-interval=500", "-f", "raw", "r.img"),
		out: "first", mutates: true},
	{name: "bench-flush-read", args: args("bench", "--flush-interval=10", "r.img"), stderr: true},
	{name: "bench-flush-depth", args: args("bench", "-w", "--flush-interval=10", "-d", "64", "-f", "raw", "r.img"), stderr: true},
}

// TestDifferential runs every case with qemu-img and blockd-img on the
// same images and compares exit status and output.
func TestDifferential(t *testing.T) {
	fx := fixture(t)
	for _, tc := range diffCases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.gap != "" {
				t.Skipf("known difference: %s", tc.gap)
			}
			qdir, bdir := fx, fx
			if tc.mutates {
				qdir, bdir = copyDir(t, fx), copyDir(t, fx)
			}
			q := qemuImg(t, qdir, tc.args...)
			b := blockdImg(t, bdir, tc.args...)
			if q.code != b.code {
				t.Fatalf("exit status: qemu-img %d, blockd-img %d\nqemu-img:\n%s%s\nblockd-img:\n%s%s", q.code, b.code, q.stdout, q.stderr, b.stdout, b.stderr)
			}
			compareOutput(t, "stdout", tc.out, q.stdout, b.stdout)
			if tc.stderr {
				compareOutput(t, "stderr", "text", q.stderr, strings.ReplaceAll(b.stderr, "blockd-img", "qemu-img"))
			}
			if tc.after != nil {
				qa := mustRun(t, qdir, "qemu-img", tc.after...)
				ba := mustRun(t, bdir, "qemu-img", tc.after...)
				compareOutput(t, "after", tc.afterOut, qa, ba)
			}
			if tc.check != nil {
				if q.code != 0 {
					t.Fatalf("both tools failed:\n%s%s", q.stderr, b.stderr)
				}
				tc.check(t, qdir, bdir)
			}
		})
	}
}

func compareOutput(t *testing.T, what, mode, q, b string) {
	t.Helper()
	switch mode {
	case "text":
		if q != b {
			t.Errorf("%s differs\nqemu-img:\n%s\nblockd-img:\n%s", what, q, b)
		}
	case "text-noend":
		re := regexp.MustCompile(`Image end offset: [0-9]+`)
		compareOutput(t, what, "text", re.ReplaceAllString(q, ""), re.ReplaceAllString(b, ""))
	case "json-noactual":
		// Allocation differs a little between the tools' writes.
		re := regexp.MustCompile(`"actual-size": [0-9]+,?`)
		compareOutput(t, what, "json", re.ReplaceAllString(q, ""), re.ReplaceAllString(b, ""))
	case "text-nooffsets":
		// Host offsets depend on compressed sizes.
		re := regexp.MustCompile(`, "offset": [0-9]+`)
		if qs, bs := re.ReplaceAllString(q, ""), re.ReplaceAllString(b, ""); qs != bs {
			t.Errorf("%s differs (offsets aside)\nqemu-img:\n%s\nblockd-img:\n%s", what, qs, bs)
		}
	case "first":
		ql, _, _ := strings.Cut(q, "\n")
		bl, _, _ := strings.Cut(b, "\n")
		if ql != bl {
			t.Errorf("%s first line differs\nqemu-img:   %s\nblockd-img: %s", what, ql, bl)
		}
	case "json":
		var qv, bv any
		if err := decodeJSON(q, &qv); err != nil {
			t.Fatalf("qemu-img %s is not JSON: %v\n%s", what, err, q)
		}
		if err := decodeJSON(b, &bv); err != nil {
			t.Fatalf("blockd-img %s is not JSON: %v\n%s", what, err, b)
		}
		for _, d := range jsonDiff("", qv, bv) {
			t.Errorf("%s: %s", what, d)
		}
	}
}

func decodeJSON(s string, v *any) error {
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	return d.Decode(v)
}

// jsonDiff compares qemu-img's JSON q with blockd-img's b member by
// member; members only blockd-img has must be known extensions.
func jsonDiff(path string, q, b any) []string {
	switch qv := q.(type) {
	case map[string]any:
		bm, ok := b.(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: qemu-img has an object, blockd-img %T", path, b)}
		}
		var out []string
		for k, v := range qv {
			bvv, ok := bm[k]
			if !ok {
				out = append(out, fmt.Sprintf("%s.%s: missing in blockd-img (qemu-img: %v)", path, k, v))
				continue
			}
			out = append(out, jsonDiff(path+"."+k, v, bvv)...)
		}
		for k, v := range bm {
			if _, ok := qv[k]; !ok && !extensionKeys[k] {
				out = append(out, fmt.Sprintf("%s.%s: only in blockd-img (%v)", path, k, v))
			}
		}
		return out
	case []any:
		bl, ok := b.([]any)
		if !ok || len(bl) != len(qv) {
			return []string{fmt.Sprintf("%s: qemu-img %v, blockd-img %v", path, q, b)}
		}
		var out []string
		for i := range qv {
			out = append(out, jsonDiff(fmt.Sprintf("%s[%d]", path, i), qv[i], bl[i])...)
		}
		return out
	}
	if !reflect.DeepEqual(q, b) {
		return []string{fmt.Sprintf("%s: qemu-img %v, blockd-img %v", path, q, b)}
	}
	return nil
}

// sameAs checks that a converted image has the source's contents in both
// directories, by qemu-img compare, and that both outputs are equal.
func sameAs(src, out string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		for _, d := range []string{qdir, bdir} {
			mustRun(t, d, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, out)
		}
		qb, _ := os.ReadFile(filepath.Join(qdir, out))
		bb, _ := os.ReadFile(filepath.Join(bdir, out))
		if !bytes.Equal(qb, bb) {
			t.Errorf("%s differs between the tools", out)
		}
	}
}

// samePrefix checks that dst starts with src (convert -n into a larger
// image) in both directories.
func samePrefix(src, dst string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		qb, _ := os.ReadFile(filepath.Join(qdir, dst))
		bb, _ := os.ReadFile(filepath.Join(bdir, dst))
		if !bytes.Equal(qb, bb) {
			t.Errorf("%s differs between the tools", dst)
		}
		sb, _ := os.ReadFile(filepath.Join(bdir, src))
		if !bytes.HasPrefix(bb, sb) {
			t.Errorf("%s does not start with %s", dst, src)
		}
	}
}

// sameLUKS checks a LUKS image converted from a raw one, with qemu-img.
func sameLUKS(src, out string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		for _, d := range []string{qdir, bdir} {
			mustRun(t, d, "qemu-img", "compare", "--object", objPW, "--image-opts",
				"driver=raw,file.filename="+src, "driver=luks,key-secret=s0,file.filename="+out)
			mustRun(t, d, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw", out)
		}
	}
}

// checkLUKSCreate checks the LUKS images both tools created.
func checkLUKSCreate(t *testing.T, qdir, bdir string) {
	for _, d := range []string{qdir, bdir} {
		mustRun(t, d, "cryptsetup", "open", "--test-passphrase", "--key-file", "pw", "new.img")
	}
	q := mustRun(t, qdir, "qemu-img", "info", "--output=json", "new.img")
	b := mustRun(t, bdir, "qemu-img", "info", "--output=json", "new.img")
	var qv, bv map[string]any
	_ = json.Unmarshal([]byte(q), &qv)
	_ = json.Unmarshal([]byte(b), &bv)
	for _, k := range []string{"virtual-size", "format", "encrypted"} {
		if !reflect.DeepEqual(qv[k], bv[k]) {
			t.Errorf("%s: qemu-img %v, blockd-img %v", k, qv[k], bv[k])
		}
	}
	qs := qv["format-specific"].(map[string]any)["data"].(map[string]any)
	bs := bv["format-specific"].(map[string]any)["data"].(map[string]any)
	for _, k := range []string{"cipher-alg", "cipher-mode", "ivgen-alg", "hash-alg", "payload-offset"} {
		if !reflect.DeepEqual(qs[k], bs[k]) {
			t.Errorf("%s: qemu-img %v, blockd-img %v", k, qs[k], bs[k])
		}
	}
}

// checkSlots checks which keyslots of l1.img are active in both
// directories, and that each active one opens with its passphrase.
func checkSlots(want map[int]bool) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		for _, d := range []string{qdir, bdir} {
			out := mustRun(t, d, "qemu-img", "info", "--output=json", "l1.img")
			var v map[string]any
			_ = json.Unmarshal([]byte(out), &v)
			slots := v["format-specific"].(map[string]any)["data"].(map[string]any)["slots"].([]any)
			for i, s := range slots {
				if got := s.(map[string]any)["active"].(bool); got != want[i] {
					t.Errorf("%s: slot %d active %v, want %v", d, i, got, want[i])
				}
			}
			for slot := range want {
				key := "pw"
				if slot != 0 {
					key = "pw2"
				}
				mustRun(t, d, "cryptsetup", "open", "--test-passphrase", "--key-file", key, "-S", fmt.Sprint(slot), "l1.img")
			}
		}
	}
}

// sizeOf returns the size of a file.
func sizeOf(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// snapshotCheck checks an image both tools changed: qemu-img finds
// blockd-img's copy clean, with the same contents as qemu-img's and the
// snapshots named (in order), each with the same contents in both.
func snapshotCheck(img string, names ...string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		q, b := filepath.Join(qdir, img), filepath.Join(bdir, img)
		mustRun(t, bdir, "qemu-img", "check", b)
		mustRun(t, bdir, "qemu-img", "compare", q, b)
		list := mustRun(t, bdir, "qemu-img", "snapshot", "-l", b)
		var got []string
		for _, l := range strings.Split(list, "\n") {
			if f := strings.Fields(l); len(f) > 2 && f[0] != "ID" && f[0] != "Snapshot" {
				got = append(got, f[1])
			}
		}
		if strings.Join(got, ",") != strings.Join(names, ",") {
			t.Fatalf("snapshots %v, want %v\n%s", got, names, list)
		}
		for _, n := range names {
			qs, bs := filepath.Join(qdir, "sq.raw"), filepath.Join(bdir, "sb.raw")
			mustRun(t, bdir, "qemu-img", "convert", "-l", "snapshot.name="+n, "-O", "raw", q, qs)
			mustRun(t, bdir, "qemu-img", "convert", "-l", "snapshot.name="+n, "-O", "raw", b, bs)
			mustRun(t, bdir, "qemu-img", "compare", "-f", "raw", "-F", "raw", qs, bs)
		}
	}
}

// sameOutput checks that both tools wrote the same file.
func sameOutput(out string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		qb, _ := os.ReadFile(filepath.Join(qdir, out))
		bb, _ := os.ReadFile(filepath.Join(bdir, out))
		if len(qb) == 0 || !bytes.Equal(qb, bb) {
			t.Errorf("%s differs between the tools (%d and %d bytes)", out, len(qb), len(bb))
		}
	}
}

// checkedBoth runs qemu-img check on the image both tools changed and
// compares their contents.
func checkedBoth(img string) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		t.Helper()
		q, b := filepath.Join(qdir, img), filepath.Join(bdir, img)
		if r := qemuImg(t, bdir, "check", b); r.code != 0 && r.code != 3 {
			t.Fatalf("qemu-img check of blockd-img's image: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		mustRun(t, bdir, "qemu-img", "compare", q, b)
	}
}

// encSlots checks the keyslots of enc.qcow2 after both tools amended it:
// which are active, and that the passphrases open them.
func encSlots(want map[int]bool) func(t *testing.T, qdir, bdir string) {
	return func(t *testing.T, qdir, bdir string) {
		for _, d := range []string{qdir, bdir} {
			out := mustRun(t, d, "qemu-img", "info", "--output=json", "enc.qcow2")
			var v map[string]any
			_ = json.Unmarshal([]byte(out), &v)
			enc := v["format-specific"].(map[string]any)["data"].(map[string]any)["encrypt"].(map[string]any)
			for i, s := range enc["slots"].([]any) {
				if got := s.(map[string]any)["active"].(bool); got != want[i] {
					t.Errorf("%s: slot %d active %v, want %v", d, i, got, want[i])
				}
			}
			for slot := range want {
				obj, id := objPW, "s0"
				if slot != 0 {
					obj, id = objPW2, "s1"
				}
				mustRun(t, d, "qemu-io", "--object", obj, "--image-opts", "driver=qcow2,encrypt.key-secret="+id+",file.filename=enc.qcow2", "-c", "read -P 9 0 128k")
			}
		}
	}
}
