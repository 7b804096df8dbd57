package qcow2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// rewriteHeader changes the header of a qcow2 image in place.
func rewriteHeader(t *testing.T, path string, mod func(h *qcow2fmt.Header)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	h, err := qcow2fmt.Parse(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	mod(h)
	b, err := h.Marshal(true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
}

// TestImageNamesOnlyPlainFiles: the backing file and external data file
// names an image stores are followed only as plain file names, resolved
// next to the image; json: descriptions and protocol prefixes, which would
// let a hostile image open any file or host with options of its choice,
// are refused, and a metadata-only open does not open the data file.
func TestImageNamesOnlyPlainFiles(t *testing.T) {
	dir := t.TempDir()
	secret := bytes.Repeat([]byte("secret!\n"), 65536/8)
	target := filepath.Join(dir, "target.raw")
	if err := os.WriteFile(target, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	// The daemon runs elsewhere: relative names must not depend on it.
	t.Chdir(t.TempDir())

	withBacking := func(t *testing.T, name, format string) string {
		p := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_", "{", "", "}", "", `"`, "", ",", "_").Replace(t.Name())+".qcow2")
		blockdevCreate(t, p, `,"size":65536`)
		rewriteHeader(t, p, func(h *qcow2fmt.Header) { h.BackingFile, h.BackingFormat = name, format })
		return p
	}
	jsonFile := fmt.Sprintf(`json:{"driver":"file","filename":%q}`, target)
	jsonRaw := fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"file","filename":%q}}`, target)
	refused := []struct{ name, format string }{
		{jsonFile, "raw"},
		{jsonFile, ""},
		{jsonRaw, "raw"},
		{`json:{"file":{"driver":"file","filename":"` + target + `"}}`, ""},
		{"nbd:unix:/tmp/nbd.sock", "raw"},
		{"nbd+unix:///disk?socket=/tmp/nbd.sock", "raw"},
		{"rbd:pool/image", "raw"},
		{"file:json:{}", "raw"},
	}
	for _, c := range refused {
		t.Run("backing "+c.name, func(t *testing.T) {
			p := withBacking(t, c.name, c.format)
			err := openErr(t, p, `,"read-only":true`)
			if err == nil || !strings.Contains(err.Error(), "is not a plain file name") {
				t.Fatalf("got %v, want a refusal of the backing file name", err)
			}
			// Naming the backing node in the options still opens it.
			if err := openErr(t, p, fmt.Sprintf(`,"read-only":true,"backing":{"driver":"raw","file":{"driver":"file","filename":%q}}`, target)); err != nil {
				t.Fatalf("explicit backing: %v", err)
			}
		})
	}
	for _, format := range []string{"file", "blkdebug", "null-co", "nbd"} {
		t.Run("backing format "+format, func(t *testing.T) {
			p := withBacking(t, "target.raw", format)
			err := openErr(t, p, `,"read-only":true`)
			if err == nil || !strings.Contains(err.Error(), "is not an image format") {
				t.Fatalf("got %v, want a refusal of the backing format", err)
			}
		})
	}
	// Plain names open, relative ones next to the image whatever the
	// current directory; "file:" names a plain file.
	for _, name := range []string{"target.raw", "file:target.raw", target} {
		t.Run("backing plain "+name, func(t *testing.T) {
			p := withBacking(t, name, "raw")
			g, _ := newGraph(t)
			c := openQcow2(t, g, "q", p, `,"read-only":true`)
			if got := readAll(t, c); !bytes.Equal(got, secret) {
				t.Fatal("backing file not read through the plain name")
			}
		})
	}

	// External data files.
	data := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(data, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	g, _ := newGraph(t)
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"d","filename":%q}`, data))
	dimg := filepath.Join(dir, "df.qcow2")
	if err := os.WriteFile(dimg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"f","filename":%q}`, dimg))
	if err := g.Create(t.Context(), map[string]any{"driver": "qcow2", "file": "f", "data-file": "d", "data-file-raw": true, "size": json.Number("65536")}); err != nil {
		t.Fatal(err)
	}
	g.Close()
	orig, _ := os.ReadFile(dimg)
	withData := func(t *testing.T, name string) string {
		p := filepath.Join(dir, "df-"+strings.NewReplacer("/", "_", ":", "_", "{", "", "}", "", `"`, "", ",", "_").Replace(t.Name())+".qcow2")
		if err := os.WriteFile(p, orig, 0o644); err != nil {
			t.Fatal(err)
		}
		rewriteHeader(t, p, func(h *qcow2fmt.Header) { h.DataFile = name })
		return p
	}
	for _, name := range []string{jsonFile, jsonRaw, "nbd:unix:/tmp/nbd.sock", "nbd://127.0.0.1/x"} {
		t.Run("data-file "+name, func(t *testing.T) {
			p := withData(t, name)
			err := openErr(t, p, `,"read-only":true`)
			if err == nil || !strings.Contains(err.Error(), "is not a plain file name") {
				t.Fatalf("got %v, want a refusal of the data file name", err)
			}
			if err := openErr(t, p, fmt.Sprintf(`,"read-only":true,"data-file":{"driver":"file","filename":%q}`, target)); err != nil {
				t.Fatalf("explicit data-file: %v", err)
			}
		})
	}
	for _, name := range []string{"target.raw", target} {
		t.Run("data-file plain "+name, func(t *testing.T) {
			p := withData(t, name)
			g, _ := newGraph(t)
			c := openQcow2(t, g, "q", p, `,"read-only":true`)
			if got := readAll(t, c); !bytes.Equal(got, secret) {
				t.Fatal("data file not read through the plain name")
			}
		})
	}
	// Metadata only (blockd-img info): the data file is not opened, even
	// one that does not exist, and I/O is refused.
	t.Run("data-file metadata only", func(t *testing.T) {
		p := withData(t, "missing.raw")
		if err := openErr(t, p, `,"read-only":true`); err == nil {
			t.Fatal("a missing data file opened")
		}
		g, _ := newGraph(t)
		g.MetadataOnly = true
		c := openQcow2(t, g, "q", p, `,"read-only":true`)
		g.MetadataOnly = false
		if err := c.ReadAt(t.Context(), make([]byte, 512), 0); !errors.Is(err, graph.ErrNotSupported) {
			t.Fatalf("read of a metadata-only node: %v", err)
		}
	})
}
