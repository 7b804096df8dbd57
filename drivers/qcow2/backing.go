package qcow2

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// chainKey carries the files of the backing chain being opened, to detect
// loops.
type chainKey struct{}

// maxChain bounds the depth of a backing chain.
const maxChain = 256

// imagePath returns the plain filename of a child's node, or "" when the
// node is not described by one (json: filenames).
func imagePath(c *graph.Child) string {
	f := c.BDS().Filename()
	if strings.HasPrefix(f, "json:") {
		return ""
	}
	return f
}

// resolveBacking resolves a backing file name against the directory of the
// image that names it (QEMU's bdrv_get_full_backing_filename).
func resolveBacking(file *graph.Child, name string) (string, error) {
	if name == "" || filepath.IsAbs(name) || strings.HasPrefix(name, "json:") || hasProtocol(name) {
		return name, nil
	}
	base := imagePath(file)
	if base == "" {
		return "", fmt.Errorf("Cannot use relative backing file names for '%s'", file.BDS().Filename())
	}
	return filepath.Join(filepath.Dir(base), name), nil
}

// hasProtocol reports a "proto:" prefix (without a slash before the colon).
func hasProtocol(name string) bool {
	i := strings.IndexByte(name, ':')
	return i > 0 && !strings.ContainsRune(name[:i], '/')
}

// plainName checks a file name that an image stores about itself (its
// backing file or external data file) and returns the name to open. Names
// from an image are followed only as plain file names: a json: description
// or a protocol prefix (nbd:, rbd:, ...) would let the image choose which
// file, host or driver options blockd opens, so they are refused, and the
// user names such a child in the options instead ('backing', 'data-file').
// QEMU since the CVE-2024-4467 fixes reads data-file names literally but
// still follows json: backing names; blockd refuses both. A "file:" prefix
// names a plain file and is dropped.
func plainName(what, image, name, option string) (string, error) {
	name = strings.TrimPrefix(name, "file:")
	if strings.HasPrefix(name, "json:") || hasProtocol(name) {
		return "", fmt.Errorf("%s name '%s' stored in '%s' is not a plain file name: an image may only name files, not options or protocols (give '%s' in the options to open it)", what, name, image, option)
	}
	return name, nil
}

// resolveDataFile finds the external data file named in the header,
// relative to the directory of the image (QEMU 7.2 resolves it against the
// current directory, which makes what an image opens depend on where the
// daemon runs).
func resolveDataFile(file *graph.Child, name string) (string, error) {
	name, err := plainName("Data file", file.BDS().Filename(), name, "data-file")
	if err != nil || filepath.IsAbs(name) {
		return name, err
	}
	base := imagePath(file)
	if base == "" {
		return "", fmt.Errorf("Cannot use relative data file names for '%s'", file.BDS().Filename())
	}
	return filepath.Join(filepath.Dir(base), name), nil
}

// fileRef makes an inline reference to a file node, read-only if asked.
func fileRef(g *graph.Graph, name string, readOnly bool) (*graph.Ref, error) {
	o, err := g.DecodeOptions(fileTree(name, readOnly), false)
	if err != nil {
		return nil, err
	}
	return &graph.Ref{Inline: o}, nil
}

// fileTree is the options tree of a plain file.
func fileTree(name string, readOnly bool) map[string]any {
	t := map[string]any{"driver": "file", "filename": name}
	if readOnly {
		t["read-only"] = true
	}
	return t
}

// probeFormat guesses the format of a backing file from its first bytes:
// qcow2, luks or raw.
func probeFormat(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "raw"
	}
	defer f.Close()
	var b [6]byte
	n, _ := f.ReadAt(b[:], 0)
	switch {
	case n >= 4 && b[0] == 'Q' && b[1] == 'F' && b[2] == 'I' && b[3] == 0xfb:
		return "qcow2"
	case n >= 6 && string(b[:6]) == "LUKS\xba\xbe":
		return "luks"
	}
	return "raw"
}

// sameFile reports whether two paths name one file.
func sameFile(a, b string) bool {
	if a == b {
		return true
	}
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}

// openBacking attaches the backing child: the one the options give, none
// for null, else the file the header names (read-only, format from the
// header or probed), as an automatically named node.
func (n *node) openBacking(ctx context.Context, o *graph.Opener, opts *Options, h *qcow2fmt.Header) error {
	if h.BackingFile != "" {
		if full, err := resolveBacking(n.file, h.BackingFile); err == nil {
			n.backName = full
		}
	}
	if opts.Backing != nil {
		if opts.Backing.Null {
			n.noBacking = h.BackingFile != ""
			return nil
		}
		c, err := o.Child(ctx, "backing", &opts.Backing.Ref, graph.ChildSpec{Role: graph.RoleCOW})
		if err != nil {
			return err
		}
		n.backing = c
		n.explicitBacking = true
		n.headerBacking = h.BackingFile
		return nil
	}
	if h.BackingFile == "" {
		return nil
	}
	name, err := plainName("Backing file", n.file.BDS().Filename(), h.BackingFile, "backing")
	if err != nil {
		return err
	}
	full, err := resolveBacking(n.file, name)
	if err != nil {
		return err
	}
	chain, _ := ctx.Value(chainKey{}).([]string)
	if len(chain) >= maxChain {
		return fmt.Errorf("Backing chain of '%s' is longer than %d images", imagePath(n.file), maxChain)
	}
	self := imagePath(n.file)
	if self != "" {
		chain = append(append([]string(nil), chain...), self)
	}
	for _, p := range chain {
		if sameFile(p, full) {
			return fmt.Errorf("Backing file '%s' of '%s' creates a loop in the backing chain", h.BackingFile, self)
		}
	}
	format := h.BackingFormat
	switch format {
	case "":
		format = probeFormat(full)
	case "raw", "qcow2", "luks":
	default:
		// The header chooses only among image formats over a file.
		return fmt.Errorf("Backing file format '%s' stored in '%s' is not an image format blockd opens from a name (raw, qcow2, luks)", format, self)
	}
	tree := map[string]any{"driver": format, "file": fileTree(full, false)}
	tree["read-only"] = true
	bo, err := o.Graph().DecodeOptions(tree, false)
	if err != nil {
		return fmt.Errorf("Could not open backing file: %w", err)
	}
	c, err := o.Child(context.WithValue(ctx, chainKey{}, chain), "backing", &graph.Ref{Inline: bo}, graph.ChildSpec{Role: graph.RoleCOW})
	if err != nil {
		return fmt.Errorf("Could not open backing file: %w", err)
	}
	n.backing = c
	n.fmtName = format
	return nil
}

// ExplicitBacking reports whether the options named the backing node and
// the backing file name in the header (graph.ExplicitBackinger).
func (n *node) ExplicitBacking() (string, bool) {
	n.metaMu.Lock() // ChangeBackingFile sets headerBacking under metaMu
	defer n.metaMu.Unlock()
	return n.headerBacking, n.explicitBacking
}
