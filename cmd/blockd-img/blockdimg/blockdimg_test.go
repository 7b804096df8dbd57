package blockdimg

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestGetopt(t *testing.T) {
	long := []longOpt{{"output", true, optOutput}, {"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'}}
	for _, tc := range []struct {
		args     []string
		opts     []parsedOpt
		operands []string
		err      string
	}{
		{args: []string{"-f", "raw", "a.img"}, opts: []parsedOpt{{'f', "raw", "-f"}}, operands: []string{"a.img"}},
		{args: []string{"a.img", "-fraw"}, opts: []parsedOpt{{'f', "raw", "-fraw"}}, operands: []string{"a.img"}},
		{args: []string{"-qU", "a"}, opts: []parsedOpt{{'q', "", "-qU"}, {'U', "", "-qU"}}, operands: []string{"a"}},
		{args: []string{"--output=json", "a"}, opts: []parsedOpt{{optOutput, "json", "--output=json"}}, operands: []string{"a"}},
		{args: []string{"--output", "json", "a"}, opts: []parsedOpt{{optOutput, "json", "--output"}}, operands: []string{"a"}},
		{args: []string{"--out=json", "a"}, opts: []parsedOpt{{optOutput, "json", "--out=json"}}, operands: []string{"a"}},
		{args: []string{"--image", "a"}, opts: []parsedOpt{{optImageOpts, "", "--image"}}, operands: []string{"a"}},
		{args: []string{"--", "-f"}, operands: []string{"-f"}},
		{args: []string{"-"}, operands: []string{"-"}},
		{args: []string{"--o=x"}, err: "unrecognized option '--o=x'"},
		{args: []string{"--bogus"}, err: "unrecognized option '--bogus'"},
		{args: []string{"--image-opts=1"}, err: "unrecognized option '--image-opts=1'"},
		{args: []string{"-z"}, err: "unrecognized option '-z'"},
		{args: []string{"a", "-f"}, err: "missing argument for option '-f'"},
		{args: []string{"--output"}, err: "missing argument for option '--output'"},
	} {
		opts, operands, err := getopt(tc.args, ":f:qU", long)
		if tc.err != "" {
			var ee *exitError
			if !errors.As(err, &ee) || ee.msg != tc.err || !ee.usage {
				t.Errorf("%v: error %v, want %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(opts, tc.opts) || !reflect.DeepEqual(operands, tc.operands) {
			t.Errorf("%v: %v %v %v, want %v %v", tc.args, opts, operands, err, tc.opts, tc.operands)
		}
	}
}

// TestSizeToStr uses values from QEMU's size_to_str as qemu-img prints them.
func TestSizeToStr(t *testing.T) {
	for v, want := range map[uint64]string{
		0: "0 B", 512: "512 B", 999: "999 B", 1000: "0.977 KiB", 1024: "1 KiB", 1536: "1.5 KiB",
		4096: "4 KiB", 262144: "256 KiB", 2064384: "1.97 MiB", 10485760: "10 MiB", 1 << 30: "1 GiB",
		1023 << 20: "0.999 GiB", 1 << 40: "1 TiB", 16777216 + 2068480: "18 MiB",
	} {
		if got := sizeToStr(v); got != want {
			t.Errorf("sizeToStr(%d) = %q, want %q", v, got, want)
		}
	}
}

func TestQemuOpts(t *testing.T) {
	o := newOpts(luksCreateOpts, fileCreateOpts)
	if err := o.parse("key-secret=s0,iter-time=0x10,size=1.5M,nocow=on,cipher-alg=a,,b"); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	o.print(&b)
	if want := "size=1572864 key-secret=s0 cipher-alg=a,,b iter-time=16 nocow=on"; b.String() != want {
		t.Errorf("print: %q, want %q", b.String(), want)
	}
	tree := map[string]any{}
	if err := o.qapiTree(tree); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(tree["iter-time"]) != "16" || tree["nocow"] != true || tree["size"] == nil {
		t.Errorf("tree: %v", tree)
	}
	for in, want := range map[string]string{
		"foo=1":         "Invalid parameter 'foo'",
		"nocow=maybe":   "Parameter 'nocow' expects 'on' or 'off'",
		"iter-time=x":   "Parameter 'iter-time' expects a number",
		"size=1Q":       "Parameter 'size' expects a non-negative number below 2^64",
		"id=x":          "Invalid parameter 'id'",
		"iter-time=1e3": "Parameter 'iter-time' expects a number",
	} {
		err := newOpts(luksCreateOpts, fileCreateOpts).parse(in)
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("%s: %v, want %q", in, err, want)
		}
	}
	q := newOpts(qcow2CreateOpts, fileCreateOpts)
	b.Reset()
	q.setNumber("size", 1<<30)
	q.print(&b)
	if want := "cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"; b.String() != want {
		t.Errorf("qcow2 defaults: %q", b.String())
	}
}

func TestValidOptionList(t *testing.T) {
	for s, want := range map[string]bool{"a=b": true, "": false, ",a": false, "a=b,": false, "a=b,,": true, "a=b,,,": false} {
		if validOptionList(s) != want {
			t.Errorf("%q: %v", s, !want)
		}
	}
}

func TestCompareHelpers(t *testing.T) {
	a := make([]byte, 4096)
	b := make([]byte, 4096)
	if firstMismatch(a, b) != -1 || firstNonZero(a) != -1 {
		t.Fatal("equal buffers differ")
	}
	b[1500] = 1
	if got := firstMismatch(a, b); got != 1024 {
		t.Errorf("firstMismatch = %d, want 1024", got)
	}
	if got := firstNonZero(b); got != 1024 {
		t.Errorf("firstNonZero = %d, want 1024", got)
	}
}

func TestProbeFormat(t *testing.T) {
	dir := t.TempDir()
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"qcow2": {append([]byte("QFI\xfb"), 0, 0, 0, 3), "qcow2"},
		"luks1": {append([]byte("LUKS\xba\xbe"), 0, 1), "luks"},
		"luks2": {append([]byte("LUKS\xba\xbe"), 0, 2), "luks"},
		"raw":   {[]byte("hello"), "raw"},
		"empty": {nil, "raw"},
		"vmdk":  {[]byte("KDMV...."), "vmdk"},
	} {
		p := dir + "/" + name
		if err := writeFile(p, tc.data); err != nil {
			t.Fatal(err)
		}
		if got, err := probeFormat(p); err != nil || got != tc.want {
			t.Errorf("%s: %q %v, want %q", name, got, err, tc.want)
		}
	}
}

func TestMainNoPanic(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main([]string{"--version"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "qemu-img 7.2 compatible") {
		t.Errorf("--version: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	if code := Main([]string{"nosuch"}, &out, &errb); code != 1 || errb.String() != "blockd-img: Command not found: nosuch\nTry 'blockd-img --help' for more information\n" {
		t.Errorf("nosuch: %d %q", code, errb.String())
	}
}

func writeFile(p string, b []byte) error { return os.WriteFile(p, b, 0o644) }
