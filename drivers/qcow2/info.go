package qcow2

import (
	"context"

	"blockd/drivers/luks/qcrypto"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// EncryptInfo is ImageInfoSpecificQCow2Encryption: the format and, for
// LUKS, QCryptoBlockInfoLUKS (QEMU 7.2's members only).
type EncryptInfo struct {
	Format string `json:"format"`
	qcrypto.Info[qcrypto.Slot]
}

// BitmapInfo is Qcow2BitmapInfo.
type BitmapInfo struct {
	Name        string   `json:"name"`
	Granularity uint32   `json:"granularity"`
	Flags       []string `json:"flags"`
}

// FormatSpecific is ImageInfoSpecificQCow2 (QEMU 7.2), members in QAPI
// order.
type FormatSpecific struct {
	Compat          string       `json:"compat"`
	DataFile        *string      `json:"data-file,omitempty"`
	DataFileRaw     *bool        `json:"data-file-raw,omitempty"`
	ExtendedL2      *bool        `json:"extended-l2,omitempty"`
	LazyRefcounts   *bool        `json:"lazy-refcounts,omitempty"`
	Corrupt         *bool        `json:"corrupt,omitempty"`
	RefcountBits    int          `json:"refcount-bits"`
	Encrypt         *EncryptInfo `json:"encrypt,omitempty"`
	Bitmaps         []BitmapInfo `json:"bitmaps,omitempty"`
	CompressionType string       `json:"compression-type"`
}

func ptr[T any](v T) *T { return &v }

// Info implements graph.Infoer.
func (n *node) Info() graph.ImageInfo {
	n.metaMu.Lock()
	h := n.h.Clone()
	snaps := n.snapshotInfosLocked()
	backName := n.backName // ChangeBackingFile sets it under metaMu
	n.metaMu.Unlock()
	dirty := h.IncompatibleFeatures&qcow2fmt.IncompatDirty != 0
	fs := FormatSpecific{RefcountBits: h.RefcountBits(), CompressionType: "zlib"}
	if h.CompressionType == qcow2fmt.CompressionZstd {
		fs.CompressionType = "zstd"
	}
	if h.Version == 2 {
		fs.Compat = "0.10"
	} else {
		fs.Compat = "1.1"
		fs.LazyRefcounts = ptr(h.CompatibleFeatures&qcow2fmt.CompatLazyRefcounts != 0)
		fs.Corrupt = ptr(h.IncompatibleFeatures&qcow2fmt.IncompatCorrupt != 0)
		fs.ExtendedL2 = ptr(h.ExtendedL2())
		if h.HasDataFileName {
			fs.DataFile = ptr(h.DataFile)
		}
		if h.HasDataFile() {
			fs.DataFileRaw = ptr(h.DataFileRaw())
		}
		if h.Bitmaps != nil {
			if bms, err := qcow2fmt.Bitmaps(graph.NewSectionIO(context.Background(), n.file, 0, -1), h, n.file.Size()); err == nil {
				for _, b := range bms {
					bi := BitmapInfo{Name: b.Name, Granularity: uint32(1) << (b.GranularityBits & 31), Flags: []string{}}
					if b.Flags&qcow2fmt.BitmapInUse != 0 {
						bi.Flags = append(bi.Flags, "in-use")
					}
					if b.Flags&qcow2fmt.BitmapAuto != 0 {
						bi.Flags = append(bi.Flags, "auto")
					}
					fs.Bitmaps = append(fs.Bitmaps, bi)
				}
			}
		}
	}
	if n.luks != nil {
		fs.Encrypt = &EncryptInfo{Format: "luks", Info: qcrypto.NewInfo(n.luks.Info())}
	}
	return graph.ImageInfo{
		ActualSize:            -1,
		ClusterSize:           n.cs(),
		DirtyFlag:             &dirty,
		Encrypted:             n.luks != nil,
		BackingFilename:       h.BackingFile,
		FullBackingFilename:   backName,
		BackingFilenameFormat: h.BackingFormat,
		Snapshots:             snaps,
		FormatSpecific:        graph.ImageInfoSpecific{Type: "qcow2", Data: fs},
	}
}
