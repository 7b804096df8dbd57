package blockdimg

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
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

// snapshotSpec is the argument of -l (convert, measure): options
// snapshot.id= and snapshot.name=, or a plain ID or name.
type snapshotSpec struct {
	set      bool
	opts     bool
	id, name string
	idOrName string
}

// parseSnapshotSpec parses -l as qemu-img does.
func parseSnapshotSpec(arg string) (snapshotSpec, error) {
	if !strings.HasPrefix(arg, "snapshot.") {
		return snapshotSpec{set: true, idOrName: arg}, nil
	}
	o := newOpts([]optDesc{{name: "snapshot.id", typ: optString}, {name: "snapshot.name", typ: optString}})
	if err := o.parse(arg); err != nil {
		return snapshotSpec{}, failf("%v\n%s: Failed in parsing snapshot param '%s'", err, Prog, arg)
	}
	sp := snapshotSpec{set: true, opts: true}
	sp.id, _ = o.get("snapshot.id")
	sp.name, _ = o.get("snapshot.name")
	return sp, nil
}

// snapshotLoader is a read-only image that can show a snapshot instead of
// its current contents (bdrv_snapshot_load_tmp).
type snapshotLoader interface {
	LoadSnapshot(ctx context.Context, id, name string) error
}

// load switches a read-only image to the snapshot sp names.
func (sp snapshotSpec) load(e *env, im *image) error {
	var l snapshotLoader
	if im.bds != nil {
		l, _ = im.bds.Node().(snapshotLoader)
	}
	if l == nil {
		return failf("Failed to load snapshot: Block format '%s' used by device '' does not support temporarily loading internal snapshots", im.format)
	}
	var err error
	switch {
	case sp.opts && sp.id == "" && sp.name == "":
		err = errors.New("snapshot_id and name are both NULL")
	case sp.opts:
		err = l.LoadSnapshot(e.ctx, sp.id, sp.name)
	default:
		// By ID first, then by name.
		if err = l.LoadSnapshot(e.ctx, sp.idOrName, ""); errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.EINVAL) {
			err = l.LoadSnapshot(e.ctx, "", sp.idOrName)
		}
	}
	if err != nil {
		return failf("Failed to load snapshot: %v", err)
	}
	return nil
}
