package blockdimg

import (
	"encoding/json"
	"fmt"
	"strings"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/luks/qcrypto"
	"blockd/graph"
	"blockd/internal/qapi"
)

// luksMeta is a LUKS image opened for its metadata only, as qemu-img info
// opens images (BDRV_O_NO_IO): no key-secret is needed. The luks driver
// always unlocks a keyslot when it opens, so for this case the tool opens
// the file (and header) nodes through the graph and reads the header with
// the driver's own format package.
type luksMeta struct {
	e            *env
	file, header *graph.BDS
	fileBlk      *graph.Child
	hdrBlk       *graph.Child
	hdr          *luksfmt.Header
}

func (e *env) openLUKSMeta(name string, tree map[string]any, kv bool, o openOpts) (*image, error) {
	m := &luksMeta{e: e}
	openChild := func(role string) (*graph.BDS, *graph.Child, error) {
		v, ok := tree[role]
		if !ok {
			return nil, nil, nil
		}
		var nn string
		switch c := v.(type) {
		case string:
			nn = c
		case map[string]any:
			setDefault(c, "read-only", bv(kv, true))
			if o.forceShare {
				setDefault(c, "force-share", bv(kv, true))
			}
			nn, _ = c["node-name"].(string)
			if nn == "" {
				nn = e.nodeName("meta")
				c["node-name"] = nn
			}
			if _, err := e.g.Add(e.ctx, c, kv); err != nil {
				return nil, nil, err
			}
		default:
			return nil, nil, fmt.Errorf("Invalid parameter type for '%s', expected: BlockdevRef", role)
		}
		blk, err := e.g.NewBackend(nn, Prog, 0, graph.PermAll)
		if err != nil {
			return nil, nil, err
		}
		return e.g.Lookup(nn), blk, nil
	}
	fail := func(err error) (*image, error) {
		m.close()
		return nil, failf("Could not open '%s': %v", name, err)
	}
	var err error
	if m.file, m.fileBlk, err = openChild("file"); err != nil {
		return fail(err)
	}
	if m.file == nil {
		return fail(fmt.Errorf("Parameter 'file' is missing"))
	}
	if m.header, m.hdrBlk, err = openChild("header"); err != nil {
		return fail(err)
	}
	meta := m.fileBlk
	if m.hdrBlk != nil {
		meta = m.hdrBlk
	}
	m.hdr, err = luksfmt.Open(graph.NewSectionIO(e.ctx, meta, 0, -1), meta.Size())
	if err != nil {
		return fail(fmt.Errorf("luks: %w", err))
	}
	return &image{e: e, spec: name, format: "luks", meta: m}, nil
}

func (m *luksMeta) close() {
	for _, x := range []struct {
		b *graph.BDS
		c *graph.Child
	}{{m.file, m.fileBlk}, {m.header, m.hdrBlk}} {
		if x.c != nil {
			m.e.g.ReleaseBackend(x.c)
		}
		if x.b != nil {
			_ = m.e.g.Del(x.b.Name())
		}
	}
}

// virtualSize is what the luks driver reports as its size.
func (m *luksMeta) virtualSize() int64 {
	if sz, dyn := m.hdr.PayloadSize(); !dyn {
		return sz
	}
	s := m.fileBlk.Size() - m.hdr.PayloadOffset()
	s -= s % int64(m.hdr.SectorSize())
	return max(s, 0)
}

// info is the ImageInfo the luks driver would report.
func (m *luksMeta) info() *ImageInfo {
	in := m.hdr.Info()
	fi := m.file.ImageInfo(false)
	f := false
	name := fi.Filename
	if m.header != nil {
		// Like QEMU's bdrv_refresh_filename: two children need json:.
		name = "json:" + string(qapi.Marshal(qapi.Object{
			{Name: "driver", Value: "luks"},
			{Name: "file", Value: protocolOptions(m.file)},
			{Name: "header", Value: protocolOptions(m.header)},
		}))
	}
	return &ImageInfo{
		Filename:       name,
		Format:         "luks",
		DirtyFlag:      &f,
		ActualSize:     fi.ActualSize,
		VirtualSize:    m.virtualSize(),
		Encrypted:      true,
		FormatSpecific: graph.ImageInfoSpecific{Type: "luks", Data: qcrypto.NodeInfo(in)},
	}
}

// protocolOptions is the json: description of a protocol node.
func protocolOptions(b *graph.BDS) any {
	if !b.Driver().Protocol {
		fn := b.Filename()
		if v, ok := strings.CutPrefix(fn, "json:"); ok {
			return json.RawMessage(v)
		}
		return fn
	}
	return qapi.Object{{Name: "driver", Value: b.Driver().Name}, {Name: "filename", Value: b.Filename()}}
}
