package blockdimg

import (
	"path/filepath"
	"strings"

	"blockd/graph"
)

// This file holds what rebase and commit need to know about backing
// chains: how QEMU names backing files relative to an image and how it
// finds an image in a chain by name.

// hasProtocolPrefix is QEMU's path_has_protocol: "proto:" before any slash.
func hasProtocolPrefix(name string) bool {
	i := strings.IndexAny(name, ":/")
	return i > 0 && name[i] == ':'
}

// pathCombine is QEMU's path_combine: name relative to the directory of
// base (text up to its last slash, or after its protocol prefix).
func pathCombine(base, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	cut := 0
	if i := strings.IndexByte(base, ':'); hasProtocolPrefix(base) {
		cut = i + 1
	}
	if i := strings.LastIndexByte(base, '/'); i+1 > cut {
		cut = i + 1
	}
	return base[:cut] + name
}

// fullBackingFromFilename is QEMU's
// bdrv_get_full_backing_filename_from_filename: the name a backing file
// name stands for when image backed names it. ok is false (with QEMU's
// message) when a relative name cannot be resolved.
func fullBackingFromFilename(backed, name string) (string, string, bool) {
	switch {
	case name == "":
		return "", "", true
	case hasProtocolPrefix(name) || filepath.IsAbs(name):
		return name, "", true
	case backed == "" || strings.HasPrefix(backed, "json:"):
		return "", "Cannot use relative backing file names for '" + backed + "'", false
	}
	return pathCombine(backed, name), "", true
}

// realPath is realpath(3): an absolute name with symbolic links resolved;
// ok is false when the file does not exist.
func realPath(name string) (string, bool) {
	p, err := filepath.Abs(name)
	if err != nil {
		return "", false
	}
	p, err = filepath.EvalSymlinks(p)
	return p, err == nil
}

// backingOverridden is QEMU's bdrv_backing_overridden for node b, whose
// backing node is below: its options named a backing node that is not
// exactly the one its header names.
func backingOverridden(b, below *graph.BDS) bool {
	eb, ok := b.Node().(graph.ExplicitBackinger)
	if !ok {
		return false
	}
	header, explicit := eb.ExplicitBacking()
	return explicit && header != below.Filename()
}

// findBackingImage is QEMU's bdrv_find_backing_image: the backing edge,
// somewhere in the chain below top, whose node is the image name. A
// relative name is taken relative to each image in turn and compared by
// real path with the backing file that image names; an overridden backing
// node is compared by its filename; a protocol name as it is.
func findBackingImage(top *graph.BDS, name string) *graph.Child {
	isProto := hasProtocolPrefix(name)
	for cur := top; ; {
		edge := cowChild(cur)
		if edge == nil {
			return nil
		}
		below := edge.BDS()
		ii := cur.ImageInfo(false)
		full := ii.FullBackingFilename
		if full == "" && ii.BackingFilename != "" {
			full, _, _ = fullBackingFromFilename(cur.Filename(), ii.BackingFilename)
		}
		switch {
		case backingOverridden(cur, below):
			if name == below.Filename() {
				return edge
			}
		case isProto || hasProtocolPrefix(ii.BackingFilename):
			if name == ii.BackingFilename || name == full {
				return edge
			}
		default:
			want, ok := "", false
			if f := cur.Filename(); f != "" && !strings.HasPrefix(f, "json:") {
				want, ok = realPath(pathCombine(f, name))
			}
			have, ok2 := realPath(full)
			if ok && ok2 && full != "" && want == have {
				return edge
			}
		}
		cur = below
	}
}
