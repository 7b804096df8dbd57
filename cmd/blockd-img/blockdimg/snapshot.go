package blockdimg

import (
	"fmt"
	"time"
)

// snapshotOps are the internal snapshot operations of a format (qcow2);
// a nil function means the format lacks it.
type snapshotOps struct {
	list   func() ([]SnapshotInfo, error)
	create func(name string, date time.Time) error
	apply  func(name string) error
	delete func(name string) error
}

func cmdSnapshot(e *env, args []string) error {
	opts, rest, err := getopt(args, ":la:c:d:hqU", []longOpt{
		{"help", false, 'h'}, {"object", true, optObject}, {"image-opts", false, optImageOpts}, {"force-share", false, 'U'},
	})
	if err != nil {
		return err
	}
	o := openOpts{write: true}
	action, name, quiet := 0, "", false
	for _, p := range opts {
		switch p.id {
		case 'h':
			return helpRequested(e)
		case 'l', 'a', 'c', 'd':
			if action != 0 {
				return usagef("Cannot mix '-l', '-a', '-c', '-d'")
			}
			action, name = p.id, p.arg
			if p.id == 'l' {
				o.write = false
			}
		case 'q':
			quiet = true
		case 'U':
			o.forceShare = true
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
	o.quiet = quiet
	im, err := e.open(rest[0], o)
	if err != nil {
		return err
	}
	defer im.close()
	ops := formatSnapshots(im)
	switch action {
	case 'l':
		if ops.list == nil {
			return nil
		}
		list, err := ops.list()
		if err != nil || len(list) == 0 {
			return nil
		}
		fmt.Fprintf(e.stdout, "Snapshot list:\n")
		dumpSnapshotHeader(e.stdout)
		for _, s := range list {
			dumpSnapshot(e.stdout, s)
		}
	case 'c':
		if ops.create == nil {
			return failf("Could not create snapshot '%s': -95 (Operation not supported)", name)
		}
		if err := ops.create(name, time.Now()); err != nil {
			return failf("Could not create snapshot '%s': %s", name, errno(err))
		}
	case 'a':
		if ops.apply == nil {
			if im.probedRaw != "" {
				// QEMU reopens the image to look for snapshots in its file,
				// which warns a second time.
				e.warnProbedRaw(im.probedRaw, im.quiet)
			}
			return failf("Could not apply snapshot '%s': Block driver does not support snapshots", name)
		}
		if err := ops.apply(name); err != nil {
			return failf("Could not apply snapshot '%s': Failed to load snapshot: %s", name, errno(err))
		}
	case 'd':
		found := false
		if ops.list != nil {
			list, _ := ops.list()
			for _, s := range list {
				if s.ID == name || s.Name == name {
					found = true
				}
			}
		}
		if !found || ops.delete == nil {
			return failf("Could not delete snapshot '%s': snapshot not found", name)
		}
		if err := ops.delete(name); err != nil {
			return failf("Could not delete snapshot '%s': %s", name, errno(err))
		}
	}
	return nil
}
