package blockdimg

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"

	"blockd/drivers/nbd"
	"blockd/graph"
	"blockd/internal/keyval"
)

// openOpts say how a command opens an image; they correspond to the flags
// qemu-img passes to blk_new_open.
type openOpts struct {
	imageOpts  bool   // the name is a keyval option list (--image-opts)
	fmt        string // -f; "" probes the format
	write      bool   // BDRV_O_RDWR
	resize     bool   // BDRV_O_RESIZE
	noShare    bool   // BDRV_O_NO_SHARE: share only reads
	forceShare bool   // -U
	noIO       bool   // BDRV_O_NO_IO: metadata only (info)
	noBacking  bool   // BDRV_O_NO_BACKING
	check      bool   // BDRV_O_CHECK: no repair on open
	cache      string // -t / -T; "" is writeback
	unmap      bool   // discard=unmap (convert targets)
	quiet      bool
	// extra are options merged into the image's root (key-secret for a
	// freshly created target).
	extra map[string]string
}

// image is an opened image: a root node in the env's graph and the
// backend edge the command does its I/O through.
type image struct {
	e        *env
	spec     string // the name as given on the command line
	node     string // root node name
	bds      *graph.BDS
	blk      *graph.Child
	format   string
	wthrough bool // cache mode with writethrough: every write is FUA
	// meta is set instead of bds for a LUKS image opened for its metadata
	// only (info without key-secret).
	meta *luksMeta
	// probedRaw is the file name when the format was probed as raw and
	// the image is writable (QEMU warns about it).
	probedRaw string
	quiet     bool
	// toolNoBacking: the tool (not the user) left the backing file
	// closed, as qemu-img's BDRV_O_NO_BACKING; that does not make the
	// image's name a json: one.
	toolNoBacking bool
	// tree is the options tree the image was opened from (kv: keyval
	// strings), for commands that open it again differently.
	tree map[string]any
	kv   bool
}

// cacheFlags maps a qemu-img cache mode to cache.direct, cache.no-flush and
// writethrough (QEMU's bdrv_parse_cache_mode).
func cacheFlags(mode string) (direct, noFlush, writethrough bool, ok bool) {
	switch mode {
	case "", "writeback":
		return false, false, false, true
	case "none", "off":
		return true, false, false, true
	case "directsync":
		return true, false, true, true
	case "writethrough":
		return false, false, true, true
	case "unsafe":
		return false, true, false, true
	}
	return false, false, false, false
}

// protocolDrivers are the drivers whose nodes are named after a filename.
var protocolDrivers = map[string]bool{"file": true, "host_device": true, "null-co": true, "null-aio": true}

// buildTree turns an image name into a BlockdevOptions tree. keyvalMode
// tells whether its leaves are strings (--image-opts) or JSON values.
func (e *env) buildTree(name string, o openOpts) (map[string]any, bool, error) {
	var tree map[string]any
	kv := false
	switch {
	case o.imageOpts:
		if o.fmt != "" {
			return nil, false, failf("--image-opts and --format are mutually exclusive")
		}
		t, err := keyval.Parse(name, "")
		if err != nil {
			return nil, false, failf("%v", err)
		}
		tree, kv = t, len(name) == 0 || name[0] != '{'
	case strings.HasPrefix(name, "json:"):
		js := strings.TrimPrefix(name, "json:")
		if !strings.HasPrefix(strings.TrimLeft(js, " \t\n"), "{") {
			return nil, false, failf("Could not open '%s': Could not parse the JSON options", name)
		}
		t, err := keyval.Parse(js, "")
		if err != nil {
			return nil, false, failf("Could not open '%s': Could not parse the JSON options: %v", name, err)
		}
		tree = t
		if o.fmt != "" {
			if d, ok := tree["driver"].(string); ok && d != o.fmt {
				return nil, false, failf("Could not open '%s': Cannot use driver '%s' for a json: image of driver '%s'", name, o.fmt, d)
			}
			tree["driver"] = o.fmt
		}
	case nbd.IsURI(name):
		// An NBD export, named as qemu-img names it. Its format is not
		// probed: raw unless -f says otherwise.
		t, err := nbd.ParseURI(name)
		if err != nil {
			return nil, false, failf("Could not open '%s': %v", name, err)
		}
		tree = t
		if o.fmt != "nbd" {
			tree = map[string]any{"driver": cmp.Or(o.fmt, "raw"), "file": t}
		}
	default:
		fn := strings.TrimPrefix(name, "file:")
		if o.fmt != "" && protocolDrivers[o.fmt] {
			tree = map[string]any{"driver": o.fmt, "filename": fn}
		} else {
			tree = map[string]any{"file": map[string]any{"driver": "file", "filename": fn}}
			if o.fmt != "" {
				tree["driver"] = o.fmt
			}
		}
	}
	fillProtocols(tree, true)
	return tree, kv, nil
}

// fillProtocols gives child definitions that name a file but no driver the
// file protocol, as QEMU derives the protocol from the filename. At the
// root a bare filename becomes the file child of a probed format.
func fillProtocols(m map[string]any, root bool) {
	if _, ok := m["driver"]; !ok {
		if fn, ok := m["filename"]; ok {
			if root {
				delete(m, "filename")
				m["file"] = map[string]any{"driver": "file", "filename": fn}
			} else {
				m["driver"] = "file"
			}
		}
	}
	for k, v := range m {
		if c, ok := v.(map[string]any); ok && k != "encrypt" && k != "cache" {
			fillProtocols(c, false)
		}
	}
}

// forEachNode calls fn for the root and every inline child definition.
func forEachNode(m map[string]any, fn func(map[string]any)) {
	if _, ok := m["driver"]; ok {
		fn(m)
	}
	for k, v := range m {
		if c, ok := v.(map[string]any); ok && k != "encrypt" && k != "cache" {
			forEachNode(c, fn)
		}
	}
}

func bv(kv bool, b bool) any {
	if !kv {
		return b
	}
	if b {
		return "on"
	}
	return "off"
}

// setDefault sets m[key] (a dotted path) unless it is already set.
func setDefault(m map[string]any, key string, v any) {
	parts := strings.Split(key, ".")
	for _, p := range parts[:len(parts)-1] {
		c, ok := m[p].(map[string]any)
		if !ok {
			if _, exists := m[p]; exists {
				return
			}
			c = map[string]any{}
			m[p] = c
		}
		m = c
	}
	if _, ok := m[parts[len(parts)-1]]; !ok {
		m[parts[len(parts)-1]] = v
	}
}

// Magic numbers of the formats probing recognises.
var (
	qcow2Magic = []byte("QFI\xfb")
	luksMagic  = []byte("LUKS\xba\xbe")
	otherMagic = map[string]string{"KDMV": "vmdk", "QED\x00": "qed", "conectix": "vpc", "vhdxfile": "vhdx", "WithoutFreeSpace": "parallels", "ParallelsDiskImage": "parallels"}
)

// probeFormat guesses the format of the file at path from its first bytes,
// as QEMU's bdrv_probe_all does.
func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, 512)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", err
	}
	buf = buf[:n]
	switch {
	case bytes.HasPrefix(buf, qcow2Magic) && len(buf) >= 8:
		if binary.BigEndian.Uint32(buf[4:]) >= 2 {
			return "qcow2", nil
		}
		return "qcow", nil
	case bytes.HasPrefix(buf, luksMagic) && len(buf) >= 8:
		if v := binary.BigEndian.Uint16(buf[6:]); v == 1 || v == 2 {
			return "luks", nil
		}
	case len(buf) >= 0x40 && bytes.Equal(buf[0x40-4:0x40], []byte{0x7f, 0x10, 0xda, 0xbe}):
		return "vdi", nil
	}
	for m, f := range otherMagic {
		if bytes.HasPrefix(buf, []byte(m)) {
			return f, nil
		}
	}
	return "raw", nil
}

// open opens an image the way qemu-img's img_open does.
func (e *env) open(name string, o openOpts) (*image, error) {
	if _, _, _, ok := cacheFlags(o.cache); !ok {
		return nil, failf("Invalid cache option: %s", o.cache)
	}
	tree, kv, err := e.buildTree(name, o)
	if err != nil {
		return nil, err
	}
	return e.openTree(name, tree, kv, o)
}

// openTree opens the image named name from its options tree (keyval
// strings when kv); the tree keeps what open added to it (the probed
// driver, the node name, the defaults), so that it can be opened again.
func (e *env) openTree(name string, tree map[string]any, kv bool, o openOpts) (*image, error) {
	direct, noFlush, wt, ok := cacheFlags(o.cache)
	if !ok {
		return nil, failf("Invalid cache option: %s", o.cache)
	}
	var err error
	for k, v := range o.extra {
		setDefault(tree, k, v)
	}
	drv, _ := tree["driver"].(string)
	probedRaw := ""
	if drv == "" {
		fc, _ := tree["file"].(map[string]any)
		fn, _ := fc["filename"].(string)
		if fn == "" {
			return nil, failf("Could not open '%s': A block device must be specified for \"file\"", name)
		}
		drv, err = probeFormat(fn)
		if err != nil {
			drv = "raw" // let the file driver report the error in QEMU's words
		} else if drv == "raw" && o.write {
			probedRaw = fn
			e.warnProbedRaw(fn, o.quiet)
		}
		if e.g.Driver(drv) == nil {
			return nil, failf("Could not open '%s': Image format '%s' is not supported by %s", name, drv, Prog)
		}
		tree["driver"] = drv
	}
	if drv == "qcow2" {
		fillQcow2EncryptFormat(tree)
	}
	if o.noIO && drv == "luks" {
		if _, ok := tree["key-secret"]; !ok {
			return e.openLUKSMeta(name, tree, kv, o)
		}
	}
	if o.forceShare {
		if v, ok := tree["force-share"]; ok && v != bv(kv, true) && v != "on" {
			return nil, failf("--force-share/-U conflicts with image options")
		}
	}
	forEachNode(tree, func(m map[string]any) {
		if direct {
			setDefault(m, "cache.direct", bv(kv, true))
		}
		if noFlush {
			setDefault(m, "cache.no-flush", bv(kv, true))
		}
		if o.forceShare {
			setDefault(m, "force-share", bv(kv, true))
			setDefault(m, "read-only", bv(kv, true))
		}
		if o.unmap {
			setDefault(m, "discard", "unmap")
		}
	})
	if !o.write && !o.resize {
		setDefault(tree, "read-only", bv(kv, true))
	}
	toolNoBacking := false
	if _, given := tree["backing"]; o.noBacking && drv == "qcow2" && !given {
		toolNoBacking = true
		if kv {
			setDefault(tree, "backing", "")
		} else {
			setDefault(tree, "backing", nil)
		}
	}
	nn, _ := tree["node-name"].(string)
	if nn == "" {
		nn = e.nodeName("img")
		tree["node-name"] = nn
	}
	e.g.MetadataOnly, e.g.CheckOpen = o.noIO, o.check
	b, err := e.g.Add(e.ctx, tree, kv)
	e.g.MetadataOnly, e.g.CheckOpen = false, false
	if err != nil {
		return nil, failf("Could not open '%s': %v", name, err)
	}
	perm := graph.Perm(0)
	if !o.noIO {
		perm |= graph.PermRead
		if o.write {
			perm |= graph.PermWrite
		}
	}
	if o.resize {
		perm |= graph.PermResize
	}
	shared := graph.PermAll
	if o.noShare {
		shared = graph.PermRead | graph.PermWriteUnchanged
	}
	blk, err := e.g.NewBackend(nn, Prog, perm, shared)
	if err != nil {
		_ = e.g.Del(nn)
		return nil, failf("Could not open '%s': %v", name, err)
	}
	return &image{e: e, spec: name, node: nn, bds: b, blk: blk, format: drv, wthrough: wt, probedRaw: probedRaw, quiet: o.quiet, toolNoBacking: toolNoBacking, tree: tree, kv: kv}, nil
}

// warnProbedRaw is QEMU's warning for a raw image opened for writing
// without an explicit format.
func (e *env) warnProbedRaw(fn string, quiet bool) {
	if quiet {
		return
	}
	fmt.Fprintf(e.stderr, "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"+
		"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"+
		"         Specify the 'raw' format explicitly to remove the restrictions.\n", fn)
}

// close releases the image and closes its nodes (flushing them).
func (im *image) close() {
	if im == nil {
		return
	}
	if im.meta != nil {
		im.meta.close()
		return
	}
	im.e.g.ReleaseBackend(im.blk)
	_ = im.e.g.Del(im.node)
}

// size is the image's virtual size.
func (im *image) size() int64 {
	if im.meta != nil {
		return im.meta.virtualSize()
	}
	return im.blk.Size()
}

// writeFlags are the flags for data writes (FUA in writethrough modes).
func (im *image) writeFlags() graph.ReqFlags {
	if im.wthrough {
		return graph.FUA
	}
	return 0
}

// errno renders an I/O error the way qemu-img prints strerror(-ret) when
// it is a system error, else as its text.
func errno(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		s := en.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	return err.Error()
}

func asOpError(err error, target **graph.OpError) bool { return errors.As(err, target) }

// fillQcow2EncryptFormat adds encrypt.format to a qcow2 definition that
// has encrypt.key-secret only: QEMU takes the format from the image
// header then (crypt_method, a big-endian word at byte 32: 1 aes, 2 luks),
// while the qcow2 driver's options require it. Backing files named in the
// options (backing.driver=qcow2,...) are filled in the same way.
func fillQcow2EncryptFormat(tree map[string]any) {
	if bk, ok := tree["backing"].(map[string]any); ok && bk["driver"] == "qcow2" {
		fillQcow2EncryptFormat(bk)
	}
	enc, ok := tree["encrypt"].(map[string]any)
	if !ok {
		return
	}
	if _, ok := enc["format"]; ok {
		return
	}
	fc, _ := tree["file"].(map[string]any)
	fn, _ := fc["filename"].(string)
	f, err := os.Open(fn)
	if err != nil {
		return
	}
	defer f.Close()
	var b [4]byte
	if _, err := f.ReadAt(b[:], 32); err != nil {
		return
	}
	switch binary.BigEndian.Uint32(b[:]) {
	case 1:
		enc["format"] = "aes"
	case 2:
		enc["format"] = "luks"
	}
}
