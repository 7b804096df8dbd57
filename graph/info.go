package graph

import (
	"blockd/internal/qapi"
)

// BlockdevCacheInfo is QEMU's cache member of BlockDeviceInfo.
type BlockdevCacheInfo struct {
	Writeback bool `json:"writeback"`
	Direct    bool `json:"direct"`
	NoFlush   bool `json:"no-flush"`
}

// ImageInfoQAPI is QEMU 7.2's ImageInfo, members in QAPI order: the
// "image" of query-named-block-nodes and what blockd-img info prints.
type ImageInfoQAPI struct {
	Filename              string         `json:"filename"`
	Format                string         `json:"format"`
	DirtyFlag             *bool          `json:"dirty-flag,omitempty"`
	ActualSize            *int64         `json:"actual-size,omitempty"`
	VirtualSize           int64          `json:"virtual-size"`
	ClusterSize           int64          `json:"cluster-size,omitempty"`
	Encrypted             bool           `json:"encrypted,omitempty"`
	Compressed            bool           `json:"compressed,omitempty"` // QEMU sets it for vmdk only
	BackingFilename       string         `json:"backing-filename,omitempty"`
	FullBackingFilename   string         `json:"full-backing-filename,omitempty"`
	BackingFilenameFormat string         `json:"backing-filename-format,omitempty"`
	Snapshots             []SnapshotInfo `json:"snapshots,omitempty"`
	BackingImage          *ImageInfoQAPI `json:"backing-image,omitempty"`
	FormatSpecific        any            `json:"format-specific,omitempty"`
}

// ImageInfoSpecific is QEMU's ImageInfoSpecific, a union on type: what
// drivers put in ImageInfo.FormatSpecific.
type ImageInfoSpecific struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// BlockDeviceInfo is QEMU 7.2's BlockDeviceInfo, members in QAPI order.
type BlockDeviceInfo struct {
	File             string            `json:"file"`
	NodeName         string            `json:"node-name"`
	RO               bool              `json:"ro"`
	Drv              string            `json:"drv"`
	BackingFile      string            `json:"backing_file,omitempty"`
	BackingFileDepth int64             `json:"backing_file_depth"`
	Encrypted        bool              `json:"encrypted"`
	DetectZeroes     string            `json:"detect_zeroes"`
	Bps              int64             `json:"bps"`
	BpsRd            int64             `json:"bps_rd"`
	BpsWr            int64             `json:"bps_wr"`
	Iops             int64             `json:"iops"`
	IopsRd           int64             `json:"iops_rd"`
	IopsWr           int64             `json:"iops_wr"`
	Image            *ImageInfoQAPI    `json:"image"`
	Cache            BlockdevCacheInfo `json:"cache"`
	WriteThreshold   uint64            `json:"write_threshold"`
}

// StrongOptioner is implemented by nodes whose options change what the
// node's data is (QEMU's strong runtime options that were given): file's
// filename, raw's offset and size, luks' key-secret, null-co's size. They
// appear in json: filenames; a non-protocol node with any of them has no
// plain filename.
type StrongOptioner interface {
	StrongOptions() qapi.Object
}

// ExplicitBackinger is implemented by format nodes with a backing child:
// ok reports that the options named the backing node (a reference or an
// inline tree) instead of leaving it to the image header, and header is the
// backing file name the header holds. QEMU calls such a backing overridden
// unless the node's filename is exactly the header's name
// (bdrv_backing_overridden), and then describes the parent by a json:
// filename that includes the backing node.
type ExplicitBackinger interface {
	ExplicitBacking() (header string, ok bool)
}

// backingOverridden reports whether the node's backing child differs from
// what its image header alone would open.
func (b *BDS) backingOverridden() bool {
	bk := b.backing()
	if bk == nil {
		return false
	}
	eb, ok := b.node.(ExplicitBackinger)
	if !ok {
		return false
	}
	header, explicit := eb.ExplicitBacking()
	return explicit && header != bk.Filename()
}

func (b *BDS) info() ImageInfo {
	if in, ok := b.node.(Infoer); ok {
		return in.Info()
	}
	return ImageInfo{ActualSize: -1}
}

// primary returns the node's primary child (file, or a filter's child).
func (b *BDS) primary() *Child {
	for _, c := range b.children {
		if c.role&(RolePrimary|RoleFiltered) != 0 {
			return c
		}
	}
	for _, c := range b.children {
		if c.name == "file" {
			return c
		}
	}
	return nil
}

// exactFilename is the plain filename that fully describes the node, or ""
// when only a json: description will do (QEMU's bdrv_refresh_filename).
func (b *BDS) exactFilename() string {
	if f := b.info().Filename; f != "" {
		return f
	}
	if b.opts.Driver.Protocol {
		return ""
	}
	if so, ok := b.node.(StrongOptioner); ok && len(so.StrongOptions()) > 0 {
		return ""
	}
	if b.backingOverridden() {
		return ""
	}
	// QEMU's bdrv_refresh_filename: a format node without strong options
	// and with its header's backing is named by its protocol child's
	// filename; other children (a data file) do not change that.
	p := b.primary()
	if p == nil || !p.n().opts.Driver.Protocol {
		return ""
	}
	return p.n().exactFilename()
}

// fullOptions is the QEMU "full open options" of a node, used in json:
// filenames.
func (b *BDS) fullOptions() qapi.Object {
	o := qapi.Object{{Name: "driver", Value: b.opts.Driver.Name}}
	if so, ok := b.node.(StrongOptioner); ok {
		o = append(o, so.StrongOptions()...)
	}
	overridden := b.backingOverridden()
	for _, c := range b.children {
		if c.role&RoleCOW != 0 && !overridden {
			continue
		}
		o = append(o, qapi.Member{Name: c.name, Value: c.n().fullOptions()})
	}
	return o
}

// Filename is the node's filename as QEMU reports it: a plain name when one
// describes the node, else json:{...}.
func (b *BDS) Filename() string {
	if f := b.exactFilename(); f != "" {
		return f
	}
	return "json:" + string(qapi.Marshal(b.fullOptions()))
}

func (b *BDS) actualSize() *int64 {
	in := b.info()
	if in.ActualSize >= 0 && (in.Filename != "" || b.opts.Driver.Protocol) {
		v := in.ActualSize
		return &v
	}
	if !b.opts.Driver.Protocol {
		// QEMU's bdrv_sum_allocated_file_size: a format or filter node
		// takes up what its data and metadata children do (a qcow2
		// image's data file, a luks node's detached header).
		var sum int64
		n := 0
		for _, c := range b.children {
			if c.role&(RoleData|RoleMetadata|RoleFiltered) == 0 {
				continue
			}
			v := c.n().actualSize()
			if v == nil {
				return nil
			}
			sum += *v
			n++
		}
		if n > 0 {
			return &sum
		}
	}
	if p := b.primary(); p != nil {
		return p.n().actualSize()
	}
	if in.ActualSize >= 0 {
		v := in.ActualSize
		return &v
	}
	return nil
}

func (b *BDS) backing() *BDS {
	for _, c := range b.children {
		if c.role&RoleCOW != 0 {
			return c.n()
		}
	}
	return nil
}

// ImageInfo builds the "image" member; with chain it nests backing images.
func (b *BDS) ImageInfo(chain bool) *ImageInfoQAPI {
	in := b.info()
	format := b.opts.Driver.Name
	ii := &ImageInfoQAPI{
		Filename:              b.Filename(),
		Format:                format,
		DirtyFlag:             in.DirtyFlag,
		ActualSize:            b.actualSize(),
		VirtualSize:           b.node.Size(),
		ClusterSize:           in.ClusterSize,
		Encrypted:             in.Encrypted,
		BackingFilename:       in.BackingFilename,
		FullBackingFilename:   in.FullBackingFilename,
		BackingFilenameFormat: in.BackingFilenameFormat,
		Snapshots:             in.Snapshots,
		FormatSpecific:        in.FormatSpecific,
	}
	if chain {
		if bk := b.backing(); bk != nil {
			ii.BackingImage = bk.ImageInfo(true)
		}
	}
	return ii
}

// DeviceInfo builds the node's query-named-block-nodes entry.
func (b *BDS) DeviceInfo(flat bool) BlockDeviceInfo {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	in := b.info()
	dz := string(b.opts.DetectZeroes)
	if dz == "" {
		dz = "off"
	}
	di := BlockDeviceInfo{
		File:           b.Filename(),
		NodeName:       b.name,
		RO:             b.readOnly,
		Drv:            b.opts.Driver.Name,
		Encrypted:      in.Encrypted,
		DetectZeroes:   dz,
		Image:          b.ImageInfo(!flat),
		Cache:          BlockdevCacheInfo{Writeback: true, Direct: b.opts.Direct(), NoFlush: b.opts.NoFlush()},
		WriteThreshold: b.writeThreshold.Load(),
	}
	if bk := b.backing(); bk != nil {
		// QEMU: the backing node's filename, whatever the header says.
		di.BackingFile = bk.Filename()
	}
	for x := di.Image.BackingImage; x != nil; x = x.BackingImage {
		di.BackingFileDepth++
	}
	return di
}

// QueryNamedBlockNodes implements query-named-block-nodes.
func (g *Graph) QueryNamedBlockNodes(flat bool) []BlockDeviceInfo {
	nodes := g.Nodes()
	out := make([]BlockDeviceInfo, 0, len(nodes))
	for _, b := range nodes {
		out = append(out, b.DeviceInfo(flat))
	}
	return out
}

// backingChild returns the node's backing edge, or nil.
func (b *BDS) backingChild() *Child {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	for _, c := range b.children {
		if c.role&RoleCOW != 0 {
			return c
		}
	}
	return nil
}
