package file

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCreate(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(existing, []byte(strings.Repeat("x", 100000)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, opts string
		file       string
		size       int64 // resulting file size
		allocated  int64 // minimum bytes allocated (-1: don't check)
		err        string
	}{
		{"empty", `"size":0`, "a", 0, 0, ""},
		{"off", `"size":1048576`, "b", 1 << 20, -1, ""},
		{"off explicit", `"size":1048576,"preallocation":"off"`, "c", 1 << 20, -1, ""},
		{"falloc", `"size":1048576,"preallocation":"falloc"`, "d", 1 << 20, 1 << 20, ""},
		{"full", `"size":1048576,"preallocation":"full"`, "e", 1 << 20, 1 << 20, ""},
		{"full odd", `"size":1000,"preallocation":"full"`, "f", 1000, 1000, ""},
		{"falloc odd", `"size":5000,"preallocation":"falloc"`, "g", 5000, 5000, ""},
		// QEMU writes a first block of 512 bytes into a new small file.
		{"tiny", `"size":100`, "h", 512, 512, ""},
		{"nocow and hint", `"size":65536,"nocow":true,"extent-size-hint":0`, "i", 65536, -1, ""},
		{"hint max", `"size":4096,"extent-size-hint":4294967295`, "j", 4096, -1, ""},
		{"truncates existing", `"size":4096`, "existing", 4096, -1, ""},
		{"metadata", `"size":4096,"preallocation":"metadata"`, "k", 0, -1, "Unsupported preallocation mode: metadata"},
		{"hint too large", `"size":4096,"extent-size-hint":4294967296`, "l", -1, -1, "Extent size hint is too large"},
		{"no dir", `"size":0`, "nodir/x", -1, -1, "Could not create '" + dir + "/nodir/x': No such file or directory"},
		{"directory", `"size":0`, "sub", -1, -1, "Could not create '" + dir + "/sub': Is a directory"},
		{"huge", `"size":18446744073709551615`, "m", 0, -1, "Could not resize file: Invalid argument"},

		{"missing size", ``, "n", -1, -1, "Parameter 'options.size' is missing"},
		{"unknown", `"size":0,"cluster-size":512`, "q", -1, -1, "Parameter 'options.cluster-size' is unexpected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.file)
			js := `{"driver":"file","filename":` + q(p)
			if tc.opts != "" {
				js += "," + tc.opts
			}
			g := newGraph()
			defer g.Close()
			err := g.Create(ctx, tree(t, js+"}"))
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("got %v, want %q", err, tc.err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			serr := unix.Stat(p, &st)
			if tc.size < 0 {
				if serr == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
					t.Fatalf("file created (%d bytes)", st.Size)
				}
				return
			}
			if serr != nil {
				t.Fatal(serr)
			}
			if st.Size != tc.size {
				t.Fatalf("size %d, want %d", st.Size, tc.size)
			}
			if tc.allocated >= 0 && st.Blocks*512 < tc.allocated {
				t.Fatalf("%d bytes allocated, want at least %d", st.Blocks*512, tc.allocated)
			}
			if tc.size > 0 {
				data, _ := os.ReadFile(p)
				if strings.Trim(string(data), "\x00") != "" {
					t.Fatal("new image is not all zeroes")
				}
			}
			if tc.err == "" && st.Mode&0o777 != 0o644 && tc.file != "existing" {
				t.Fatalf("mode %o", st.Mode&0o777)
			}
			// The image opens with blockd.
			b := addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
			if b.Node().Size() != roundSector(tc.size) {
				t.Fatalf("node size %d", b.Node().Size())
			}
		})
	}
}

func TestCreateCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	p := filepath.Join(t.TempDir(), "c")
	err := Create(ctx, &CreateOptions{Filename: p, Size: 64 << 20, Preallocation: "full"})
	if err != context.Canceled {
		t.Fatalf("got %v", err)
	}
	if st, err := os.Stat(p); err != nil || st.Size() != 0 {
		t.Fatalf("cancelled full preallocation left %v %v", st, err)
	}
}
