package graph

import (
	"context"
	"errors"
)

// BackingFileChanger is implemented by format nodes whose image header
// names a backing file (qcow2), as QEMU's bdrv_change_backing_file. It
// changes what the header says, not the node's backing child: callers
// (qemu-img rebase and commit, the stream and commit block jobs) attach
// or drop children themselves. Nodes of formats without backing files
// (raw, luks) do not implement it; callers report ErrNotSupported.
type BackingFileChanger interface {
	// ChangeBackingFile stores name and format as the image's backing
	// file and backing format; name "" (with format "") removes the
	// backing file. The header changes in one write of the sector or
	// cluster that holds it, so that a crash leaves the old or the new
	// name, never a mixture. It returns ErrBackingName for a name or
	// format the format cannot store, ErrNoSpace when the name does not
	// fit in the header, and ErrReadOnly on a read-only node; on error the
	// header is unchanged.
	ChangeBackingFile(ctx context.Context, name, format string) error
}

// MakeEmptier is implemented by format nodes that can drop all their data
// at once, so that every range reads from the backing file again (QEMU's
// bdrv_make_empty, which qemu-img commit calls on the top image after it
// committed it).
type MakeEmptier interface {
	MakeEmpty(ctx context.Context) error
}

// ErrBackingName is returned by ChangeBackingFile for a backing file name
// or format the image cannot store (too long, a format without a name, a
// backing file for an image whose data file must stand alone); QEMU
// reports EINVAL. Nothing changed.
var ErrBackingName = errors.New("invalid backing file name or format")
