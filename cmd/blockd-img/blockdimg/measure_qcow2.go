package blockdimg

import (
	"errors"
	"fmt"
	"math/bits"
	"strings"

	"blockd/drivers/qcow2"
	"blockd/graph"
)

// This file is bdrv_measure for qcow2 (QEMU 7.2's qcow2_measure): the
// metadata of a fully allocated image of the virtual size, plus the data
// clusters a copy of the source would write.

// qcow2 limits the measure options are checked against (block/qcow2.h).
const (
	qcow2MinClusterBits   = 9
	qcow2MaxClusterBits   = 21
	qcow2MaxL1Bytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	qcow2ExtL2Subclusters = 32
	qcow2DefaultCluster   = 65536
)

// qcow2Measure is qcow2_measure. size is the virtual size: the --size
// value or the source's length.
func qcow2Measure(e *env, opts *qemuOpts, in *image, size int64) (*BlockMeasureInfo, error) {
	// The options, checked in QEMU's order so that the same error wins.
	extL2 := opts.getBool("extended_l2", false)
	cs := uint64(qcow2DefaultCluster)
	if v, ok := opts.vals["cluster_size"]; ok {
		cs = v.num
	}
	if err := qcow2CheckClusterSize(cs, extL2); err != nil {
		return nil, err
	}
	version := 3
	if v, ok := opts.get("compat"); ok {
		switch v {
		case "0.10":
			version = 2
		case "1.1":
		default:
			return nil, fmt.Errorf("Invalid compatibility level: '%s'", v)
		}
	}
	refcountBits := uint64(16)
	if v, ok := opts.vals["refcount_bits"]; ok {
		refcountBits = v.num
	}
	if refcountBits > 64 || bits.OnesCount64(refcountBits) != 1 {
		return nil, errors.New("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if version < 3 && refcountBits != 16 {
		return nil, errors.New("Different refcount widths than 16 bits require compatibility level 1.1 " +
			"or above (use compat=1.1 or greater)")
	}
	prealloc := "off"
	if v, ok := opts.get("preallocation"); ok {
		switch v {
		case "off", "metadata", "falloc", "full":
			prealloc = v
		default:
			return nil, fmt.Errorf("invalid parameter value: %s", v)
		}
	}
	_, hasBacking := opts.get("backing_file")
	var luksSize uint64
	if f, _ := opts.get("encrypt.format"); f == "luks" {
		hdr, err := e.qcow2LuksHeaderSize(opts)
		if err != nil {
			return nil, err
		}
		luksSize = qcow2RoundUp(uint64(hdr), cs)
	}

	// The L1 table must fit: QEMU checks the size option (0 when measuring
	// a source without -o size), not the source's length.
	l2e := uint64(8)
	if extL2 {
		l2e = 16
	}
	optSize := qcow2RoundUp(opts.vals["size"].num, cs)
	if l2Tables := qcow2DivUp(optSize/cs, cs/l2e); l2Tables*8 > qcow2MaxL1Bytes {
		return nil, errors.New("The image size is too large (try using a larger cluster size)")
	}

	virtual := qcow2RoundUp(uint64(size), cs)
	var required uint64 // data bytes a copy writes
	if in != nil {
		if hasBacking {
			// How much the new image's backing file shares with the
			// source is unknown: assume every cluster is written.
			required = virtual
		} else {
			n, err := qcow2DataClusters(e, in, cs)
			if err != nil {
				return nil, err
			}
			required = n
		}
	}
	// Metadata is always counted, so only full and falloc change this.
	if prealloc == "full" || prealloc == "falloc" {
		required = virtual
	}

	full := luksSize + qcow2PreallocSize(virtual, cs, uint(bits.TrailingZeros64(refcountBits)), l2e)
	info := &BlockMeasureInfo{
		FullyAllocated: int64(full),
		// The metadata of the fully allocated image stays counted: an
		// overestimate, as in QEMU.
		Required: int64(full - virtual + required),
	}
	if version >= 3 && in != nil {
		if bm, ok := qcow2SourceBitmapsSize(in, cs); ok {
			info.Bitmaps = &bm
		}
	}
	return info, nil
}

// qcow2CheckClusterSize is validate_cluster_size.
func qcow2CheckClusterSize(cs uint64, extL2 bool) error {
	if bits.OnesCount64(cs) != 1 || cs < 1<<qcow2MinClusterBits || cs > 1<<qcow2MaxClusterBits {
		return fmt.Errorf("Cluster size must be a power of two between %d and %dk",
			1<<qcow2MinClusterBits, 1<<(qcow2MaxClusterBits-10))
	}
	if minCS := uint64(1<<qcow2MinClusterBits) * qcow2ExtL2Subclusters; extL2 && cs < minCS {
		return fmt.Errorf("Extended L2 entries are only supported with cluster sizes of at least %d bytes", minCS)
	}
	return nil
}

// qcow2DataClusters walks the source's block status (its whole backing
// chain) and counts the bytes of the clusters holding data: each data
// extent is widened to cluster boundaries, zero ranges are skipped.
func qcow2DataClusters(e *env, in *image, cs uint64) (uint64, error) {
	var n uint64
	end := in.size()
	for off := int64(0); off < end; {
		st, err := statusAbove(e.ctx, in.blk, nil, off, end-off)
		if err != nil {
			return 0, fmt.Errorf("Unable to get block status: %s", errno(err))
		}
		pnum := st.length
		if !st.zero && st.data && st.allocated {
			// Count from the start of off's cluster to the end of the
			// extent's last cluster, and go on after that.
			pnum = int64(qcow2RoundUp(uint64(off+pnum), cs)) - off
			n += uint64(off)%cs + uint64(pnum)
		}
		off += pnum
	}
	return n, nil
}

// qcow2PreallocSize is qcow2_calc_prealloc_size: the file size of a fully
// allocated image of size bytes (a cluster multiple) with l2e-byte L2
// entries.
func qcow2PreallocSize(size, cs uint64, refcountOrder uint, l2e uint64) uint64 {
	meta := cs // header
	l2Entries := qcow2RoundUp(size/cs, cs/l2e)
	meta += l2Entries * l2e
	l1Entries := qcow2RoundUp(l2Entries*l2e/cs, cs/8)
	meta += l1Entries * 8
	meta += qcow2RefcountMetadataSize((meta+size)/cs, cs, refcountOrder)
	return meta + size
}

// qcow2RefcountMetadataSize is qcow2_refcount_metadata_size without the
// generous increase: the bytes of refcount blocks and table needed to
// count clusters clusters plus themselves, found as a fixed point.
func qcow2RefcountMetadataSize(clusters, cs uint64, refcountOrder uint) uint64 {
	perBlock := cs * 8 >> refcountOrder // refcounts in a refcount block
	perTable := cs / 8                  // refcount blocks a table cluster covers
	var blocks, table uint64
	for total := uint64(0); ; {
		blocks = qcow2DivUp(clusters+table+blocks, perBlock)
		table = qcow2DivUp(blocks, perTable)
		if n := clusters + blocks + table; n != total {
			total = n
			continue
		}
		return (blocks + table) * cs
	}
}

// qcow2SourceBitmapsSize is what QEMU reports as "bitmaps" when the source
// can have persistent bitmaps (a qcow2 v3 image): room for each of its
// bitmaps, fully allocated, with its table and directory entry
// (qcow2_get_persistent_dirty_bitmap_size).
func qcow2SourceBitmapsSize(in *image, cs uint64) (int64, bool) {
	if in.bds == nil || in.bds.Driver().Name != "qcow2" {
		return 0, false
	}
	spec, ok := in.bds.ImageInfo(false).FormatSpecific.(graph.ImageInfoSpecific)
	if !ok {
		return 0, false
	}
	fs, ok := spec.Data.(qcow2.FormatSpecific)
	if !ok || fs.Compat == "0.10" {
		return 0, false
	}
	var total, dir uint64
	for _, b := range fs.Bitmaps {
		bytes := qcow2DivUp(qcow2DivUp(uint64(in.size()), uint64(b.Granularity)), 8)
		clusters := qcow2DivUp(bytes, cs)
		total += clusters*cs + qcow2RoundUp(clusters*8, cs)
		dir += qcow2RoundUp(uint64(24+len(b.Name)), 8) // directory entry, no extra data
	}
	return int64(total + qcow2RoundUp(dir, cs)), true
}

// qcow2LuksHeaderSize is the size of the LUKS header the encrypt.* options
// describe (qcrypto_block_calculate_payload_offset with the "encrypt."
// prefix).
func (e *env) qcow2LuksHeaderSize(opts *qemuOpts) (int64, error) {
	lo := newOpts(luksCreateOpts)
	for k, v := range opts.vals {
		if name, ok := strings.CutPrefix(k, "encrypt."); ok && lo.find(name) != nil {
			lo.vals[name] = v
		}
	}
	if !lo.has("key-secret") {
		return 0, errors.New("Parameter 'encrypt.key-secret' is required for cipher")
	}
	return e.luksPayloadOffset(lo)
}

func qcow2RoundUp(n, align uint64) uint64 { return (n + align - 1) / align * align }

func qcow2DivUp(n, d uint64) uint64 { return (n + d - 1) / d }
