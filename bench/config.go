package bench

import (
	"context"
)

// Config is one disk setup: its images and the --object/--blockdev
// arguments both daemons get. The exported node is always "disk".
type Config struct {
	Name string
	// BlockdOnly, when set, says why QSD 7.2 cannot run this setup; the
	// report then has blockd's figures alone.
	BlockdOnly string
	// NeedsQcow2: skipped unless blockd has the qcow2 driver.
	NeedsQcow2 bool
	// Make creates the images once per run.
	Make func(ctx context.Context, im *images) error
	// Fresh, when set, recreates the image before every daemon start.
	Fresh func(ctx context.Context, im *images) error
	// Args are the daemon arguments that open node "disk".
	Args func(im *images) []string
	// NBDKit, when set, gives nbdkit's plugin, filter and parameter
	// arguments for the same disk, so that nbdkit runs as a third peer;
	// NBDKitFilter names the filter it needs (checked before the run).
	NBDKit       func(im *images) []string
	NBDKitFilter string
}

func secretArgs(im *images) []string {
	return []string{"--object", "secret,id=sec0,file=" + im.pw()}
}

func fileArgs(node, path string) []string {
	return []string{"--blockdev", "driver=file,node-name=" + node + ",filename=" + path}
}

func luksArgs(file string) []string {
	return []string{"--blockdev", "driver=luks,node-name=disk,file=" + file + ",key-secret=sec0"}
}

func cat(parts ...[]string) []string {
	var all []string
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}

// configs are all setups, in report order.
var configs = []*Config{
	{
		Name: "raw",
		Make: func(ctx context.Context, im *images) error { return im.raw(ctx) },
		Args: func(im *images) []string {
			return cat(fileArgs("file0", im.path("raw.img")),
				[]string{"--blockdev", "driver=raw,node-name=disk,file=file0"})
		},
		NBDKit: func(im *images) []string { return []string{"file", "file=" + im.path("raw.img")} },
	},
	{
		Name: "luks",
		Make: func(ctx context.Context, im *images) error { return im.luks(ctx) },
		Args: func(im *images) []string {
			return cat(secretArgs(im), fileArgs("file0", im.path("luks.img")), luksArgs("file0"))
		},
		// nbdkit's luks filter reads LUKS1 with an embedded header, as
		// luks.img is.
		NBDKit: func(im *images) []string {
			return []string{"--filter=luks", "file", "file=" + im.path("luks.img"), "passphrase=+" + im.pw()}
		},
		NBDKitFilter: "luks",
	},
	{
		Name:       "luks-detached",
		BlockdOnly: "QSD 7.2's luks driver has no header option (QEMU 9.0 added it)",
		Make:       func(ctx context.Context, im *images) error { return im.detached(ctx) },
		Args: func(im *images) []string {
			return cat(secretArgs(im), fileArgs("file0", im.path("luks-data.img")), fileArgs("hdr0", im.path("luks-hdr.img")),
				[]string{"--blockdev", "driver=luks,node-name=disk,file=file0,header=hdr0,key-secret=sec0"})
		},
	},
	{
		Name: "luks-over-raw",
		Make: func(ctx context.Context, im *images) error { return im.luks(ctx) },
		Args: func(im *images) []string {
			return cat(secretArgs(im), fileArgs("file0", im.path("luks.img")),
				[]string{"--blockdev", "driver=raw,node-name=raw0,file=file0"}, luksArgs("raw0"))
		},
	},
	{
		Name:       "qcow2",
		NeedsQcow2: true,
		Make:       func(context.Context, *images) error { return nil },
		Fresh:      func(ctx context.Context, im *images) error { return im.qcow2(ctx, "fresh.qcow2", "off") },
		Args: func(im *images) []string {
			return cat(fileArgs("file0", im.path("fresh.qcow2")),
				[]string{"--blockdev", "driver=qcow2,node-name=disk,file=file0"})
		},
	},
	{
		Name:       "qcow2-prealloc",
		NeedsQcow2: true,
		Make: func(ctx context.Context, im *images) error {
			return im.once("prealloc.qcow2", func() error { return im.qcow2(ctx, "prealloc.qcow2", "full") })
		},
		Args: func(im *images) []string {
			return cat(fileArgs("file0", im.path("prealloc.qcow2")),
				[]string{"--blockdev", "driver=qcow2,node-name=disk,file=file0"})
		},
	},
	{
		Name:       "luks-over-qcow2",
		NeedsQcow2: true,
		Make:       func(ctx context.Context, im *images) error { return im.luksQcow2(ctx) },
		Args: func(im *images) []string {
			return cat(secretArgs(im), fileArgs("file0", im.path("luks.qcow2")),
				[]string{"--blockdev", "driver=qcow2,node-name=q0,file=file0"}, luksArgs("q0"))
		},
	},
}

// ConfigNames lists the setups in report order: the NBD setups, the
// backing chains of the block job rows, "convert" last.
func ConfigNames() []string {
	var n []string
	for _, c := range configs {
		n = append(n, c.Name)
	}
	for _, c := range chains {
		n = append(n, c.Name)
	}
	return append(n, "convert")
}
