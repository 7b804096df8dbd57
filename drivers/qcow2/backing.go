package qcow2

import (
	"context"
	"encoding/json"
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

// resolveDataFile finds the external data file named in the header: QEMU
// 7.2 resolves a relative name against the current directory; blockd also
// looks next to the image when that finds nothing.
func resolveDataFile(file *graph.Child, name string) string {
	if filepath.IsAbs(name) || strings.HasPrefix(name, "json:") {
		return name
	}
	if _, err := os.Stat(name); err == nil {
		return name
	}
	if base := imagePath(file); base != "" {
		p := filepath.Join(filepath.Dir(base), name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return name
}

// fileRef makes an inline reference to a file node (or to the options of a
// json: filename), read-only if asked.
func fileRef(g *graph.Graph, name string, readOnly bool) (*graph.Ref, error) {
	tree, err := protocolTree(name)
	if err != nil {
		return nil, err
	}
	if readOnly {
		tree["read-only"] = true
	}
	o, err := g.DecodeOptions(tree, false)
	if err != nil {
		return nil, err
	}
	return &graph.Ref{Inline: o}, nil
}

// protocolTree is the options tree for a filename: a json: description or
// a plain file.
func protocolTree(name string) (map[string]any, error) {
	if rest, ok := strings.CutPrefix(name, "json:"); ok {
		d := json.NewDecoder(strings.NewReader(rest))
		d.UseNumber()
		var tree map[string]any
		if err := d.Decode(&tree); err != nil {
			return nil, fmt.Errorf("Could not parse the JSON options: %v", err)
		}
		return tree, nil
	}
	return map[string]any{"driver": "file", "filename": name}, nil
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
	full, err := resolveBacking(n.file, h.BackingFile)
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
	if !strings.HasPrefix(full, "json:") {
		for _, p := range chain {
			if sameFile(p, full) {
				return fmt.Errorf("Backing file '%s' of '%s' creates a loop in the backing chain", h.BackingFile, self)
			}
		}
	}
	tree, err := protocolTree(full)
	if err != nil {
		return err
	}
	format := h.BackingFormat
	if _, ok := tree["driver"]; ok && strings.HasPrefix(full, "json:") {
		// A json: name describes the whole node (or its protocol layer).
		if d, _ := tree["driver"].(string); d == "file" || d == "host_device" || d == "nbd" || d == "null-co" {
			if format == "" {
				format = "raw"
				if d == "file" {
					if fn, _ := tree["filename"].(string); fn != "" {
						format = probeFormat(fn)
					}
				}
			}
			tree = map[string]any{"driver": format, "file": tree}
		}
	} else {
		if format == "" {
			format = probeFormat(full)
		}
		tree = map[string]any{"driver": format, "file": tree}
	}
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
func (n *node) ExplicitBacking() (string, bool) { return n.headerBacking, n.explicitBacking }
