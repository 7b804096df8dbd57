package blockdimg

import (
	"context"
	"reflect"
	"time"

	"blockd/graph"
)

// This file finds the optional capabilities of format nodes that the
// graph has no interface for: check, internal snapshots, host offsets,
// compressed writes. A driver gains the feature here by implementing the
// matching method on its node. Methods whose results are structs are
// matched by shape (field names are QEMU's BdrvCheckResult and
// QEMUSnapshotInfo members in Go spelling), so a driver need not import
// this package. Snapshots are listed from graph.ImageInfo.Snapshots.

// hostMapper: HostOffset returns where guest range [off, off+n) of the
// node starts in its file (or data-file) child, how much of the range is
// contiguous there, and ok false when the range has no host offset
// (unallocated, compressed, encrypted).
type hostMapper interface {
	HostOffset(ctx context.Context, off, n int64) (host, length int64, ok bool, err error)
}

// compressedWriter: WriteCompressed writes one whole cluster compressed.
type compressedWriterNode interface {
	WriteCompressed(ctx context.Context, p []byte, off int64) error
}

// snapshotter: internal snapshot operations by id or name.
type snapshotCreator interface {
	CreateSnapshot(ctx context.Context, name string, date time.Time) error
}
type snapshotApplier interface {
	ApplySnapshot(ctx context.Context, name string) error
}
type snapshotDeleter interface {
	DeleteSnapshot(ctx context.Context, name string) error
}

var ctxType = reflect.TypeOf((*context.Context)(nil)).Elem()
var errType = reflect.TypeOf((*error)(nil)).Elem()

// formatChecker returns the check capability of a node: a method
// Check(ctx context.Context, fix int) (R, error) where R (or *R) is a
// struct with BdrvCheckResult's fields, or nil.
func formatChecker(n graph.Node) checkFunc {
	m := reflect.ValueOf(n).MethodByName("Check")
	if !m.IsValid() {
		return nil
	}
	t := m.Type()
	if t.NumIn() != 2 || t.In(0) != ctxType || !isIntKind(t.In(1).Kind()) || t.NumOut() != 2 || t.Out(1) != errType {
		return nil
	}
	return func(ctx context.Context, fix int) (CheckResult, error) {
		out := m.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(fix).Convert(t.In(1))})
		var r CheckResult
		fillByName(out[0], &r)
		if e, _ := out[1].Interface().(error); e != nil {
			return r, e
		}
		return r, nil
	}
}

// formatSnapshots returns the internal snapshot operations of an image.
func formatSnapshots(im *image) snapshotOps {
	var ops snapshotOps
	if im.bds == nil {
		return ops
	}
	n := im.bds.Node()
	ctx := im.e.ctx
	// The list is what the node reports in its image info (the graph's
	// SnapshotInfo, as query-named-block-nodes shows it).
	b := im.bds
	ops.list = func() ([]SnapshotInfo, error) { return b.ImageInfo(false).Snapshots, nil }
	if c, ok := n.(snapshotCreator); ok {
		ops.create = func(name string, date time.Time) error { return c.CreateSnapshot(ctx, name, date) }
	}
	if a, ok := n.(snapshotApplier); ok {
		ops.apply = func(name string) error { return a.ApplySnapshot(ctx, name) }
	}
	if d, ok := n.(snapshotDeleter); ok {
		ops.delete = func(name string) error { return d.DeleteSnapshot(ctx, name) }
	}
	return ops
}

// snapshotList lists an image's internal snapshots (nil when it has no
// snapshot support).
func snapshotList(im *image) []SnapshotInfo {
	ops := formatSnapshots(im)
	if ops.list == nil {
		return nil
	}
	l, err := ops.list()
	if err != nil || len(l) == 0 {
		return nil
	}
	return l
}

// hostMapFunc maps a guest range of a format node to its place in a
// protocol node.
type hostMapFunc func(ctx context.Context, off, n int64) (host int64, file *graph.BDS, ok bool)

// formatHostMapper returns the host mapping capability of a node, or nil.
func formatHostMapper(b *graph.BDS) hostMapFunc {
	hm, ok := b.Node().(hostMapper)
	if !ok {
		return nil
	}
	var file *graph.BDS
	for _, c := range b.Children() {
		switch c.Name() {
		case "data-file":
			file = c.BDS()
		case "file":
			if file == nil {
				file = c.BDS()
			}
		}
	}
	return func(ctx context.Context, off, n int64) (int64, *graph.BDS, bool) {
		h, _, ok, err := hm.HostOffset(ctx, off, n)
		if err != nil || !ok || file == nil {
			return 0, nil, false
		}
		return h, file, true
	}
}

// compressFunc writes one compressed cluster.
type compressFunc func(ctx context.Context, p []byte, off int64) error

// compressedWriter returns the compressed write capability of an image's
// format, or nil.
func compressedWriter(im *image) compressFunc {
	if im.bds == nil {
		return nil
	}
	if cw, ok := im.bds.Node().(compressedWriterNode); ok {
		return cw.WriteCompressed
	}
	return nil
}

// clusterSize returns the cluster size of an image's format (0 if none).
func clusterSize(im *image) int64 {
	if im.bds == nil {
		return 0
	}
	return im.bds.ImageInfo(false).ClusterSize
}

// measureFunc is bdrv_measure of a format.
type measureFunc func(e *env, opts *qemuOpts, in *image, size int64) (*BlockMeasureInfo, error)

// formatMeasurer returns the measure function of a format, or nil.
func formatMeasurer(format string) measureFunc {
	if format == "qcow2" {
		return qcow2Measure
	}
	return nil
}

func isIntKind(k reflect.Kind) bool {
	return k >= reflect.Int && k <= reflect.Uint64
}

// fillByName copies the integer, string and *int64 fields of src (a struct
// or pointer to one, nested structs included) into the fields of dst with
// the same names.
func fillByName(src reflect.Value, dst any) {
	for src.Kind() == reflect.Pointer || src.Kind() == reflect.Interface {
		if src.IsNil() {
			return
		}
		src = src.Elem()
	}
	if src.Kind() != reflect.Struct {
		return
	}
	dv := reflect.ValueOf(dst).Elem()
	for i := 0; i < src.NumField(); i++ {
		f := src.Type().Field(i)
		if !f.IsExported() {
			continue
		}
		sv := src.Field(i)
		if sv.Kind() == reflect.Struct && f.Type != reflect.TypeOf(time.Time{}) {
			fillByName(sv, dst)
			continue
		}
		df := dv.FieldByName(f.Name)
		if !df.IsValid() || !df.CanSet() {
			continue
		}
		switch {
		case isIntKind(sv.Kind()) && isIntKind(df.Kind()):
			if sv.CanInt() {
				df.SetInt(sv.Int())
			} else {
				df.SetInt(int64(sv.Uint()))
			}
		case sv.Kind() == reflect.String && df.Kind() == reflect.String:
			df.SetString(sv.String())
		case sv.Type() == reflect.TypeOf([]string(nil)) && df.Type() == sv.Type():
			df.Set(sv)
		case df.Type() == reflect.TypeOf((*int64)(nil)) && sv.Kind() == reflect.Pointer && !sv.IsNil() && isIntKind(sv.Elem().Kind()):
			v := sv.Elem().Int()
			df.Set(reflect.ValueOf(&v))
		}
	}
}
