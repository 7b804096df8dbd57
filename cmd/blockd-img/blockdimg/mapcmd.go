package blockdimg

import (
	"fmt"
	"math"
)

// mapEntry is QEMU's MapEntry.
type mapEntry struct {
	start, length int64
	data, zero    bool
	offset        int64
	hasOffset     bool
	depth         int
	present       bool
	filename      string
	hasFilename   bool
}

func (c *mapEntry) mergeable(n *mapEntry) bool {
	if c.length == 0 {
		return false
	}
	if c.zero != n.zero || c.data != n.data || c.depth != n.depth || c.present != n.present ||
		c.hasFilename != n.hasFilename || c.hasOffset != n.hasOffset {
		return false
	}
	if c.hasFilename && c.filename != n.filename {
		return false
	}
	if c.hasOffset && c.offset+c.length != n.offset {
		return false
	}
	return true
}

func cmdMap(e *env, args []string) error {
	opts, rest, err := getopt(args, ":f:s:l:hU", []longOpt{
		{"help", false, 'h'}, {"format", true, 'f'}, {"output", true, optOutput},
		{"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
		{"start-offset", true, 's'}, {"max-length", true, 'l'},
	})
	if err != nil {
		return err
	}
	var o openOpts
	output := ""
	start, maxLen := int64(0), int64(-1)
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
		case 's':
			if start, err = cvtnum("start offset", p.arg, 0, math.MaxInt64); err != nil {
				return err
			}
		case 'l':
			if maxLen, err = cvtnum("max length", p.arg, 0, math.MaxInt64); err != nil {
				return err
			}
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
	im, err := e.open(rest[0], o)
	if err != nil {
		return err
	}
	defer im.close()
	if json {
		fmt.Fprint(e.stdout, "[")
	} else {
		fmt.Fprintf(e.stdout, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	length := im.size()
	if maxLen != -1 {
		length = min(start+maxLen, length)
	}
	curr := mapEntry{start: start}
	for curr.start+curr.length < length {
		off := curr.start + curr.length
		st, err := statusAbove(e.ctx, im.blk, nil, off, length-off)
		if err != nil {
			return failf("Could not read file metadata: %s", errno(err))
		}
		next := mapEntry{start: off, length: st.length, data: st.data, zero: st.zero, depth: st.depth,
			present: st.allocated, hasOffset: st.offsetValid, offset: st.offset}
		if st.offsetValid && st.file != nil {
			next.hasFilename, next.filename = true, st.file.Filename()
		}
		if curr.mergeable(&next) {
			curr.length += next.length
			continue
		}
		if curr.length > 0 {
			if err := dumpMapEntry(e, json, &curr, &next); err != nil {
				return err
			}
		}
		curr = next
	}
	err = dumpMapEntry(e, json, &curr, nil)
	if json {
		fmt.Fprintln(e.stdout, "]")
	}
	return err
}

// dumpMapEntry is qemu-img's dump_map_entry.
func dumpMapEntry(e *env, json bool, c, next *mapEntry) error {
	if !json {
		if c.data && !c.hasOffset {
			return failf("File contains external, encrypted or compressed clusters.")
		}
		if c.data && !c.zero {
			fn := ""
			if c.hasFilename {
				fn = c.filename
			}
			off := int64(0)
			if c.hasOffset {
				off = c.offset
			}
			fmt.Fprintf(e.stdout, "%-16s%-16s%-16s%s\n", hexAlt(c.start), hexAlt(c.length), hexAlt(off), fn)
		}
		if next != nil && (!next.data || next.zero) {
			next.data, next.zero = false, true
		}
		return nil
	}
	fmt.Fprintf(e.stdout, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
		c.start, c.length, c.depth, c.present, c.zero, c.data)
	if c.hasOffset {
		fmt.Fprintf(e.stdout, `, "offset": %d`, c.offset)
	}
	fmt.Fprint(e.stdout, "}")
	if next != nil {
		fmt.Fprintln(e.stdout, ",")
	}
	return nil
}

// hexAlt is C's "%#x": 0 has no prefix.
func hexAlt(v int64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
