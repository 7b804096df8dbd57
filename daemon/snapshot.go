package daemon

import (
	"context"

	"blockd/qmp"
)

// snapshotArgs is QEMU's BlockdevSnapshot.
type snapshotArgs struct {
	Node    string `json:"node"`
	Overlay string `json:"overlay"`
}

// registerSnapshot adds blockdev-snapshot: an external snapshot of a node
// onto an overlay added before (QEMU's external_snapshot_action).
func (d *Daemon) registerSnapshot() {
	qmp.Handle(d.QMP, "blockdev-snapshot", func(ctx context.Context, m *qmp.Monitor, a *snapshotArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.Graph.Snapshot(ctx, a.Node, a.Overlay)
	})
}
