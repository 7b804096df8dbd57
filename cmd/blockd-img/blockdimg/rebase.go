package blockdimg

import (
	"bytes"
	"errors"
	"strings"
	"syscall"

	"blockd/graph"
)

// qemuFormats are the format names qemu-img 7.2's bdrv_find_format knows
// (its --help list): -F takes any of them, as the name is only written to
// the image header.
var qemuFormats = map[string]bool{}

func init() {
	for _, f := range []string{"blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
		"copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom",
		"host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co",
		"nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd",
		"replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"} {
		qemuFormats[f] = true
	}
}

// rebaseOpts are rebase's command line.
type rebaseOpts struct {
	o                 openOpts
	srcCache          string
	base, baseFmt     string
	hasBase           bool
	unsafe, progress  bool
	forceShare, quiet bool
}

// cmdRebase is qemu-img's img_rebase: with -u only the header changes;
// otherwise every range the image leaves to its backing file and where the
// old and the new backing file differ is first copied from the old one
// into the image, so its contents stay the same.
func cmdRebase(e *env, args []string) error {
	ro, file, err := parseRebase(e, args)
	if err != nil {
		return err
	}
	if _, _, _, ok := cacheFlags(ro.o.cache); !ok {
		return failf("Invalid cache option: %s", ro.o.cache)
	}
	if _, _, _, ok := cacheFlags(ro.srcCache); !ok {
		return failf("Invalid source cache option: %s", ro.srcCache)
	}
	im, err := e.open(file, ro.o)
	if err != nil {
		return err
	}
	defer im.close()
	prog := newProgress(e, ro.progress, im.size(), "rebase")
	if ro.baseFmt != "" && !qemuFormats[ro.baseFmt] && e.g.Driver(ro.baseFmt) == nil {
		prog.abort()
		return failf("Invalid format name: '%s'", ro.baseFmt)
	}
	if !ro.unsafe {
		if err := rebaseCopy(e, im, ro, prog); err != nil {
			prog.abort()
			return err
		}
	}
	if err := changeBacking(e, im, ro.base, ro.baseFmt); err != nil {
		prog.abort()
		return err
	}
	prog.finish()
	return nil
}

func parseRebase(e *env, args []string) (rebaseOpts, string, error) {
	opts, rest, err := getopt(args, ":hf:F:b:upt:T:qU", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
	})
	if err != nil {
		return rebaseOpts{}, "", err
	}
	ro := rebaseOpts{o: openOpts{write: true}}
	for _, p := range opts {
		switch p.id {
		case 'h':
			return ro, "", helpRequested(e)
		case 'f':
			ro.o.fmt = p.arg
		case 'F':
			ro.baseFmt = p.arg
		case 'b':
			ro.base, ro.hasBase = p.arg, true
		case 'u':
			ro.unsafe = true
		case 'p':
			ro.progress = true
		case 't':
			ro.o.cache = p.arg
		case 'T':
			ro.srcCache = p.arg
		case 'q':
			ro.quiet = true
		case 'U':
			ro.forceShare = true
		case optObject:
			if err := e.addObject(p.arg); err != nil {
				return ro, "", err
			}
		case optImageOpts:
			ro.o.imageOpts = true
		}
	}
	if ro.quiet {
		ro.progress = false
	}
	if len(rest) != 1 {
		return ro, "", usagef("Expecting one image file name")
	}
	if !ro.unsafe && !ro.hasBase {
		return ro, "", usagef("Must specify backing file (-b) or use unsafe mode (-u)")
	}
	// The old backing file is not opened in unsafe mode, so that a
	// missing or moved one can be named again.
	ro.o.noBacking = ro.unsafe
	ro.o.quiet = ro.quiet
	return ro, rest[0], nil
}

// rebaseSide is the old or the new backing file as rebase reads it.
type rebaseSide struct {
	c    *graph.Child // nil: none, reads as zeroes
	size int64
}

// read fills p with the side's data at off; zero reports that all of p
// lies past its end (or there is no file).
func (s rebaseSide) read(e *env, p []byte, off int64) (zero bool, err error) {
	if s.c == nil || off >= s.size {
		clear(p)
		return true, nil
	}
	return false, s.c.ReadAt(e.ctx, p, off)
}

// rebaseCopy copies into im what its old backing chain shows and the new
// backing file does not, chunk by chunk (img_rebase's loop).
func rebaseCopy(e *env, im *image, ro rebaseOpts, prog *progress) error {
	var old, nw rebaseSide
	if c := cowChild(im.bds); c != nil {
		old = rebaseSide{c: c, size: c.Size()}
	}
	var prefix *graph.BDS
	if ro.base != "" {
		full, msg, ok := fullBackingFromFilename(overlayFilename(im), ro.base)
		if !ok {
			return failf("Could not resolve backing filename: %s", msg)
		}
		if edge := findBackingImage(im.bds, full); edge != nil {
			// An image of the chain: read it through the chain, as QEMU
			// reuses its node.
			prefix = edge.BDS()
			nw = rebaseSide{c: edge, size: edge.Size()}
		} else {
			nb, err := e.open(full, openOpts{fmt: ro.baseFmt, forceShare: ro.forceShare, cache: ro.srcCache, quiet: true})
			if err != nil {
				var ee *exitError
				if errors.As(err, &ee) {
					// The reason alone, as blk_new_open reports it.
					msg := strings.TrimPrefix(ee.msg, "Could not open '"+full+"': ")
					return failf("Could not open new backing file '%s': %s", ro.base, msg)
				}
				return failf("Could not open new backing file '%s': %v", ro.base, err)
			}
			defer nb.close()
			nw = rebaseSide{c: nb.blk, size: nb.size()}
		}
	}
	size := im.size()
	bufOld, bufNew := make([]byte, ioBufSize), make([]byte, ioBufSize)
	for off := int64(0); off < size; {
		n := min(ioBufSize, size-off)
		st, err := statusOne(e.ctx, im.blk, off, n)
		if err != nil {
			return failf("error while reading image metadata: %s", errno(err))
		}
		n = st.length
		if st.allocated {
			off += n
			continue
		}
		if prefix != nil {
			// Unchanged since the new backing file: nothing to do.
			if old.c == nil || old.c.BDS() == prefix || off >= old.size {
				off += n
				continue
			}
			ab, err := statusAbove(e.ctx, old.c, prefix, off, min(n, old.size-off))
			if err != nil {
				return failf("error while reading image metadata: %s", errno(err))
			}
			if !ab.allocated {
				off += ab.length
				continue
			}
			n = ab.length
		}
		if off < old.size && off+n > old.size {
			n = old.size - off
		}
		if nw.c != nil && off < nw.size && off+n > nw.size {
			n = nw.size - off
		}
		oldZero, err := old.read(e, bufOld[:n], off)
		if err != nil {
			return failf("error while reading from old backing file")
		}
		if _, err := nw.read(e, bufNew[:n], off); err != nil {
			return failf("error while reading from new backing file")
		}
		if err := writeDiffering(e, im, bufOld[:n], bufNew[:n], off, oldZero); err != nil {
			return failf("Error while writing to COW image: %s", errno(err))
		}
		off += n
		prog.set(off)
	}
	return nil
}

// overlayFilename is the name new backing names are relative to: the
// image's filename (QEMU's exact_filename, else filename).
func overlayFilename(im *image) string {
	return im.bds.Filename()
}

// writeDiffering writes the 512-byte sectors where old and new differ
// (QEMU's compare_buffers runs), as zeroes when old lies past the end of
// the old backing file.
func writeDiffering(e *env, im *image, old, nw []byte, off int64, oldZero bool) error {
	const sector = 512
	for done := int64(0); done < int64(len(old)); {
		same := sectorSame(old, nw, done)
		run := done
		for run < int64(len(old)) && sectorSame(old, nw, run) == same {
			run = min(run+sector, int64(len(old)))
		}
		if !same {
			var err error
			if oldZero {
				err = im.blk.WriteZeroes(e.ctx, off+done, run-done, im.writeFlags())
			} else {
				err = im.blk.WriteAt(e.ctx, old[done:run], off+done, im.writeFlags())
			}
			if err != nil {
				return err
			}
		}
		done = run
	}
	return nil
}

func sectorSame(a, b []byte, at int64) bool {
	end := min(at+512, int64(len(a)))
	return bytes.Equal(a[at:end], b[at:end])
}

// changeBacking writes the new backing file name into the image header
// (bdrv_change_backing_file with the format required), with qemu-img's
// messages.
func changeBacking(e *env, im *image, base, baseFmt string) error {
	var err error
	switch ch, ok := im.bds.Node().(graph.BackingFileChanger); {
	case base != "" && baseFmt == "":
		return failf("Could not change the backing file to '%s': backing format must be specified", base)
	case !ok:
		err = graph.ErrNotSupported
	case base == "":
		err = ch.ChangeBackingFile(e.ctx, "", "")
	default:
		err = ch.ChangeBackingFile(e.ctx, base, baseFmt)
	}
	if err == nil {
		return nil
	}
	var why string
	switch {
	case errors.Is(err, graph.ErrNoSpace):
		return failf("Could not change the backing file to '%s': No space left in the file header", base)
	case errors.Is(err, graph.ErrNotSupported):
		why = "Operation not supported"
	case errors.Is(err, graph.ErrBackingName):
		why = "Invalid argument"
	case errors.Is(err, graph.ErrReadOnly):
		why = errno(syscall.EACCES)
	default:
		why = errno(err)
	}
	return failf("Could not change the backing file to '%s': %s", base, why)
}
