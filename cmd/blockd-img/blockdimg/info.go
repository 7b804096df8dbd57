package blockdimg

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"blockd/graph"
	"blockd/internal/qapi"
)

// SnapshotInfo is QEMU's SnapshotInfo, as the graph reports it.
type SnapshotInfo = graph.SnapshotInfo

// ImageInfo is QEMU 7.2's ImageInfo, the graph's (the JSON encoder puts
// its members in QEMU's QDict order).
type ImageInfo = graph.ImageInfoQAPI

// imageInfo builds the ImageInfo of an opened image from what the graph
// reports for its root node (BDS.ImageInfo) plus qemu-img's extras.
func (im *image) imageInfo() *ImageInfo {
	if im.meta != nil {
		return im.meta.info()
	}
	gi := im.bds.ImageInfo(false)
	if im.toolNoBacking {
		if so, ok := im.bds.Node().(graph.StrongOptioner); ok {
			if opts := so.StrongOptions(); len(opts) == 1 && opts[0].Name == "backing" {
				for _, c := range im.bds.Children() {
					if c.Name() == "file" {
						gi.Filename = c.BDS().Filename()
					}
				}
			}
		}
	}
	ii := gi
	if ii.DirtyFlag == nil && hasDriverInfo[ii.Format] && !rawOverNBD(im.bds) {
		// QEMU reports dirty-flag for every driver with bdrv_get_info.
		f := false
		ii.DirtyFlag = &f
	}
	ii.Snapshots = snapshotList(im)
	if ii.BackingFilename != "" && ii.FullBackingFilename == "" {
		ii.FullBackingFilename = fullBackingName(ii.Filename, ii.BackingFilename)
	}
	return ii
}

// hasDriverInfo lists the formats whose QEMU driver implements get_info.
// rawOverNBD reports a raw node over an nbd node: raw_get_info asks its
// file, and nbd has no bdrv_get_info, so QEMU shows no dirty-flag.
func rawOverNBD(b *graph.BDS) bool {
	if b.Driver().Name != "raw" {
		return false
	}
	for _, c := range b.Children() {
		if c.Name() == "file" && c.BDS().Driver().Name == "nbd" {
			return true
		}
	}
	return false
}

var hasDriverInfo = map[string]bool{"raw": true, "luks": true, "qcow2": true}

// fullBackingName resolves a backing file name relative to the image, as
// bdrv_get_full_backing_filename_from_filename does.
func fullBackingName(image, backing string) string {
	if backing == "" || strings.HasPrefix(backing, "json:") || filepath.IsAbs(backing) || strings.Contains(backing, "://") {
		return backing
	}
	if strings.HasPrefix(image, "json:") {
		return ""
	}
	return filepath.Join(filepath.Dir(image), backing)
}

func cmdInfo(e *env, args []string) error {
	opts, rest, err := getopt(args, ":f:hU", []longOpt{
		{"help", false, 'h'}, {"format", true, 'f'}, {"output", true, optOutput},
		{"backing-chain", false, optBackingChain}, {"object", true, optObject},
		{"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	var o openOpts
	output, chain := "", false
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'f':
			o.fmt = p.arg
		case 'U':
			o.forceShare = true
		case optOutput:
			output = p.arg
		case optBackingChain:
			chain = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return err
			}
		case optImageOpts:
			o.imageOpts = true
		}
	}
	if len(rest) != 1 {
		return usagef("Expecting one image file name")
	}
	json, err := outputFormat(output)
	if err != nil {
		return err
	}
	list, err := e.collectImageInfo(rest[0], o, chain)
	if err != nil {
		return err
	}
	switch {
	case !json:
		for i, ii := range list {
			if i > 0 {
				fmt.Fprintln(e.stdout)
			}
			dumpImageInfo(e.stdout, ii)
		}
	case chain:
		fmt.Fprintf(e.stdout, "%s\n", qapi.MarshalPretty(list))
	default:
		fmt.Fprintf(e.stdout, "%s\n", qapi.MarshalPretty(list[0]))
	}
	return nil
}

// outputFormat parses --output: true for json.
func outputFormat(s string) (bool, error) {
	switch s {
	case "", "human":
		return false, nil
	case "json":
		return true, nil
	}
	return false, failf("--output must be used with human or json as argument.")
}

// collectImageInfo opens an image (and with chain its backing files) for
// its metadata, as qemu-img's collect_image_info_list.
func (e *env) collectImageInfo(name string, o openOpts, chain bool) ([]*ImageInfo, error) {
	var list []*ImageInfo
	seen := map[string]bool{}
	o.noIO, o.noBacking = true, true
	for name != "" {
		if seen[name] {
			return nil, failf("Backing file '%s' creates an infinite loop.", name)
		}
		seen[name] = true
		im, err := e.open(name, o)
		if err != nil {
			return nil, err
		}
		ii := im.imageInfo()
		im.close()
		list = append(list, ii)
		name, o.fmt, o.imageOpts = "", "", false
		if chain {
			if ii.FullBackingFilename != "" {
				name = ii.FullBackingFilename
			} else if ii.BackingFilename != "" {
				return nil, failf("Could not determine absolute backing filename, but backing filename '%s' present", ii.BackingFilename)
			}
			o.fmt = ii.BackingFilenameFormat
		}
	}
	return list, nil
}

// dumpImageInfo is QEMU's bdrv_image_info_dump.
func dumpImageInfo(w io.Writer, ii *ImageInfo) {
	dsize := "unavailable"
	if ii.ActualSize != nil {
		dsize = sizeToStr(uint64(*ii.ActualSize))
	}
	fmt.Fprintf(w, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		ii.Filename, ii.Format, sizeToStr(uint64(ii.VirtualSize)), ii.VirtualSize, dsize)
	if ii.Encrypted {
		fmt.Fprintf(w, "encrypted: yes\n")
	}
	if ii.ClusterSize != 0 {
		fmt.Fprintf(w, "cluster_size: %d\n", ii.ClusterSize)
	}
	if ii.DirtyFlag != nil && *ii.DirtyFlag {
		fmt.Fprintf(w, "cleanly shut down: no\n")
	}
	if ii.BackingFilename != "" {
		fmt.Fprintf(w, "backing file: %s", ii.BackingFilename)
		if ii.FullBackingFilename == "" {
			fmt.Fprintf(w, " (cannot determine actual path)")
		} else if ii.FullBackingFilename != ii.BackingFilename {
			fmt.Fprintf(w, " (actual path: %s)", ii.FullBackingFilename)
		}
		fmt.Fprintln(w)
		if ii.BackingFilenameFormat != "" {
			fmt.Fprintf(w, "backing file format: %s\n", ii.BackingFilenameFormat)
		}
	}
	if ii.Snapshots != nil {
		fmt.Fprintf(w, "Snapshot list:\n")
		dumpSnapshotHeader(w)
		for _, s := range ii.Snapshots {
			dumpSnapshot(w, s)
		}
	}
	if ii.FormatSpecific != nil {
		fmt.Fprintf(w, "Format specific information:\n")
		v, err := parseOrdered(qapi.Marshal(ii.FormatSpecific))
		if err == nil {
			for _, m := range v.members {
				if m.name == "data" {
					dumpQObject(w, 1, m.value)
				}
			}
		}
	}
}

// dumpSnapshotHeader and dumpSnapshot are QEMU's bdrv_snapshot_dump.
func dumpSnapshotHeader(w io.Writer) {
	fmt.Fprintf(w, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
}

func dumpSnapshot(w io.Writer, s SnapshotInfo) {
	date := time.Unix(s.DateSec, 0).Local().Format("2006-01-02 15:04:05")
	ns := s.VMClockSec*1000000000 + s.VMClockNsec
	secs := ns / 1000000000
	clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (ns/1000000)%1000)
	icount := ""
	if s.Icount != nil {
		icount = fmt.Sprint(*s.Icount)
	}
	fmt.Fprintf(w, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, sizeToStr(uint64(s.VMStateSize)), date, clock, icount)
}

// cowChild returns the backing edge of a node, or nil.
func cowChild(b *graph.BDS) *graph.Child {
	for _, c := range b.Children() {
		if c.Role()&graph.RoleCOW != 0 {
			return c
		}
	}
	return nil
}
