package blockdimg

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"blockd/internal/keyval"
	"blockd/internal/qapi"
)

// This file is qemu-img's "-o" option handling (QEMU's QemuOpts with an
// option list per driver): the create and amend options of each format
// with QEMU's spellings, types and defaults, and their translation to the
// QAPI members blockdev-create and x-blockdev-amend take.

type optType int

const (
	optString optType = iota
	optBool
	optNumber
	optSizeT
)

// optDesc is a QemuOptDesc plus the QAPI member it becomes ("" when the
// tool handles it itself).
type optDesc struct {
	name string
	typ  optType
	help string
	def  string
	qapi string
}

// qopt is one parsed option value.
type qopt struct {
	str string
	num uint64
	b   bool
}

// qemuOpts is a QemuOpts: values for an option list.
type qemuOpts struct {
	desc []optDesc
	vals map[string]qopt
}

func newOpts(lists ...[]optDesc) *qemuOpts {
	o := &qemuOpts{vals: map[string]qopt{}}
	seen := map[string]bool{}
	for _, l := range lists {
		for _, d := range l {
			if !seen[d.name] {
				seen[d.name] = true
				o.desc = append(o.desc, d)
			}
		}
	}
	return o
}

func (o *qemuOpts) find(name string) *optDesc {
	for i := range o.desc {
		if o.desc[i].name == name {
			return &o.desc[i]
		}
	}
	return nil
}

// set parses and stores one value (qemu_opt_set).
func (o *qemuOpts) set(name, value string) error {
	d := o.find(name)
	if d == nil {
		return fmt.Errorf("Invalid parameter '%s'", name)
	}
	v := qopt{str: value}
	switch d.typ {
	case optBool:
		switch value {
		case "on", "yes", "true", "y":
			v.b = true
		case "off", "no", "false", "n":
		default:
			return fmt.Errorf("Parameter '%s' expects 'on' or 'off'", name)
		}
	case optNumber:
		n, err := strconv.ParseUint(value, 0, 64)
		if err != nil {
			if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
				return fmt.Errorf("Value '%s' is too large for parameter '%s'", value, name)
			}
			return fmt.Errorf("Parameter '%s' expects a number", name)
		}
		v.num = n
	case optSizeT:
		n, err := qapi.ParseSize(value)
		if err != nil {
			return fmt.Errorf("Parameter '%s' expects a non-negative number below 2^64\n"+
				"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"+
				"and exabytes, respectively.", name)
		}
		v.num = n
	}
	o.vals[name] = v
	return nil
}

func (o *qemuOpts) setNumber(name string, n uint64) {
	o.vals[name] = qopt{str: strconv.FormatUint(n, 10), num: n}
}

func (o *qemuOpts) has(name string) bool { _, ok := o.vals[name]; return ok }

func (o *qemuOpts) get(name string) (string, bool) {
	v, ok := o.vals[name]
	return v.str, ok
}

func (o *qemuOpts) getBool(name string, def bool) bool {
	if v, ok := o.vals[name]; ok {
		return v.b
	}
	if d := o.find(name); d != nil && d.def != "" {
		return d.def == "on"
	}
	return def
}

// parse parses a -o argument (qemu_opts_do_parse).
func (o *qemuOpts) parse(s string) error {
	l, err := keyval.ParseQemuOptsList(s, "")
	if err != nil {
		return err
	}
	if l.HasID {
		return fmt.Errorf("Invalid parameter 'id'")
	}
	for _, kv := range l.Opts {
		if err := o.set(kv.Name, kv.Value); err != nil {
			return err
		}
	}
	return nil
}

// print writes the options as qemu_opts_print does for "Formatting ...".
func (o *qemuOpts) print(w io.Writer) {
	sep := ""
	for _, d := range o.desc {
		v, ok := o.vals[d.name]
		value := d.def
		if ok {
			value = v.str
		}
		if !ok && value == "" {
			continue
		}
		switch {
		case d.typ == optString:
			fmt.Fprintf(w, "%s%s=%s", sep, d.name, strings.ReplaceAll(value, ",", ",,"))
		case (d.typ == optSizeT || d.typ == optNumber) && ok:
			fmt.Fprintf(w, "%s%s=%d", sep, d.name, int64(v.num))
		default:
			fmt.Fprintf(w, "%s%s=%s", sep, d.name, value)
		}
		sep = " "
	}
}

// printHelp is qemu_opts_print_help: one line per option, sorted.
func (o *qemuOpts) printHelp(w io.Writer) {
	types := map[optType]string{optString: "str", optBool: "bool (on/off)", optNumber: "num", optSizeT: "size"}
	var lines []string
	for _, d := range o.desc {
		line := fmt.Sprintf("  %s=<%s>", d.name, types[d.typ])
		if d.help != "" {
			line = fmt.Sprintf("%-24s - %s", line, d.help)
		}
		lines = append(lines, line)
	}
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

// qapiTree turns the options that have a QAPI name into a create or amend
// options tree (JSON values, dotted names nested).
func (o *qemuOpts) qapiTree(tree map[string]any) error {
	for _, d := range o.desc {
		v, ok := o.vals[d.name]
		if !ok || d.qapi == "" {
			continue
		}
		var val any
		switch d.typ {
		case optString:
			val = v.str
		case optBool:
			val = v.b
		default:
			val = json.Number(strconv.FormatUint(v.num, 10))
		}
		setDefault(tree, d.qapi, val)
	}
	return nil
}

// hasHelpOption is QEMU's has_help_option.
func hasHelpOption(s string) bool {
	l, err := keyval.ParseQemuOptsList(s, "")
	return err == nil && l.Help
}

// Option lists. The order is QEMU's, which "Formatting ..." follows.
var (
	sizeOpt = optDesc{name: "size", typ: optSizeT, help: "Virtual disk size", qapi: "size"}

	fileCreateOpts = []optDesc{
		sizeOpt,
		{name: "nocow", typ: optBool, help: "Turn off copy-on-write (valid only on btrfs)", qapi: "nocow"},
		{name: "preallocation", typ: optString, help: "Preallocation mode (allowed values: off, falloc, full)", qapi: "preallocation"},
		{name: "extent_size_hint", typ: optSizeT, help: "Extent size hint for the image file, 0 to disable", qapi: "extent-size-hint"},
	}

	rawCreateOpts = []optDesc{sizeOpt}

	luksFieldOpts = func(prefix, qprefix string) []optDesc {
		return []optDesc{
			{name: prefix + "key-secret", typ: optString, help: "ID of the secret that provides the keyslot passphrase", qapi: qprefix + "key-secret"},
			{name: prefix + "cipher-alg", typ: optString, help: "Name of encryption cipher algorithm", qapi: qprefix + "cipher-alg"},
			{name: prefix + "cipher-mode", typ: optString, help: "Name of encryption cipher mode", qapi: qprefix + "cipher-mode"},
			{name: prefix + "ivgen-alg", typ: optString, help: "Name of IV generator algorithm", qapi: qprefix + "ivgen-alg"},
			{name: prefix + "ivgen-hash-alg", typ: optString, help: "Name of IV generator hash algorithm", qapi: qprefix + "ivgen-hash-alg"},
			{name: prefix + "hash-alg", typ: optString, help: "Name of encryption hash algorithm", qapi: qprefix + "hash-alg"},
			{name: prefix + "iter-time", typ: optNumber, help: "Time to spend in PBKDF in milliseconds", qapi: qprefix + "iter-time"},
		}
	}

	// luksExtOpts are blockd's LUKS extensions (LUKS2).
	luksExtOpts = func(prefix, qprefix string) []optDesc {
		return []optDesc{
			{name: prefix + "luks-version", typ: optNumber, help: "LUKS version, 1 (default) or 2 (blockd extension)", qapi: qprefix + "luks-version"},
			{name: prefix + "pbkdf", typ: optString, help: "Key derivation: pbkdf2, argon2i or argon2id (blockd extension, LUKS2)", qapi: qprefix + "pbkdf"},
			{name: prefix + "sector-size", typ: optNumber, help: "Encryption sector size, 512 to 4096 (blockd extension, LUKS2)", qapi: qprefix + "sector-size"},
		}
	}

	luksCreateOpts = append(append(append([]optDesc{sizeOpt}, luksFieldOpts("", "")...),
		optDesc{name: "detached-header", typ: optBool, help: "Create a detached LUKS header"}),
		luksExtOpts("", "")...)

	luksAmendOpts = []optDesc{
		{name: "state", typ: optString, help: "Select new state of affected keyslots (active/inactive)", qapi: "state"},
		{name: "keyslot", typ: optNumber, help: "Select a single keyslot to modify explicitly", qapi: "keyslot"},
		{name: "old-secret", typ: optString, help: "Select all keyslots that match this password", qapi: "old-secret"},
		{name: "new-secret", typ: optString, help: "New secret to set in the matching keyslots. Empty string to erase", qapi: "new-secret"},
		{name: "iter-time", typ: optNumber, help: "Time to spend in PBKDF in milliseconds", qapi: "iter-time"},
		{name: "secret", typ: optString, help: "Secret that unlocks the volume key (default: key-secret; blockd extension)", qapi: "secret"},
		{name: "pbkdf", typ: optString, help: "Key derivation of the new keyslot (blockd extension, LUKS2)", qapi: "pbkdf"},
	}

	qcow2CommonOpts = []optDesc{
		sizeOpt,
		{name: "compat", typ: optString, help: "Compatibility level (v2 [0.10] or v3 [1.1])"},
		{name: "backing_file", typ: optString, help: "File name of a base image", qapi: "backing-file"},
		{name: "backing_fmt", typ: optString, help: "Image format of the base image", qapi: "backing-fmt"},
		{name: "data_file", typ: optString, help: "File name of an external data file"},
		{name: "data_file_raw", typ: optBool, help: "The external data file must stay valid as a raw image", qapi: "data-file-raw"},
		{name: "lazy_refcounts", typ: optBool, help: "Postpone refcount updates", def: "off", qapi: "lazy-refcounts"},
		{name: "refcount_bits", typ: optNumber, help: "Width of a reference count entry in bits", def: "16", qapi: "refcount-bits"},
	}

	qcow2CreateOpts = append(append(append([]optDesc{
		{name: "encryption", typ: optBool, help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"},
		{name: "encrypt.format", typ: optString, help: "Encrypt the image, format choices: 'aes', 'luks'", qapi: "encrypt.format"},
	}, luksFieldOpts("encrypt.", "encrypt.")...), []optDesc{
		{name: "cluster_size", typ: optSizeT, help: "qcow2 cluster size", def: "65536", qapi: "cluster-size"},
		{name: "extended_l2", typ: optBool, help: "Extended L2 tables", def: "off", qapi: "extended-l2"},
		{name: "preallocation", typ: optString, help: "Preallocation mode (allowed values: off, metadata, falloc, full)", qapi: "preallocation"},
		{name: "compression_type", typ: optString, help: "Compression method used for image cluster compression", def: "zlib", qapi: "compression-type"},
	}...), qcow2CommonOpts...)

	qcow2AmendOpts = append([]optDesc{
		{name: "encrypt.state", typ: optString, help: "Select new state of affected keyslots (active/inactive)", qapi: "encrypt.state"},
		{name: "encrypt.keyslot", typ: optNumber, help: "Select a single keyslot to modify explicitly", qapi: "encrypt.keyslot"},
		{name: "encrypt.old-secret", typ: optString, help: "Select all keyslots that match this password", qapi: "encrypt.old-secret"},
		{name: "encrypt.new-secret", typ: optString, help: "New secret to set in the matching keyslots. Empty string to erase", qapi: "encrypt.new-secret"},
		{name: "encrypt.iter-time", typ: optNumber, help: "Time to spend in PBKDF in milliseconds", qapi: "encrypt.iter-time"},
	}, qcow2CommonOpts...)
)

// createOptsFor returns a format's create option list, or nil when the
// format cannot create images.
func createOptsFor(format string) []optDesc {
	switch format {
	case "raw":
		return rawCreateOpts
	case "file":
		return fileCreateOpts
	case "luks":
		return luksCreateOpts
	case "qcow2":
		return qcow2CreateOpts
	}
	return nil
}

// amendOptsFor returns a format's amend option list.
func amendOptsFor(format string) []optDesc {
	switch format {
	case "luks":
		return luksAmendOpts
	case "qcow2":
		return qcow2AmendOpts
	}
	return nil
}
