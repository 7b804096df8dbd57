package daemon

import (
	"context"

	"blockd/qmp"
)

// reopenArgs is blockdev-reopen's arguments: the complete options of each
// node to reopen.
type reopenArgs struct {
	Options []any `json:"options"`
}

// registerReopen adds blockdev-reopen (graph.ReopenOptions).
func (d *Daemon) registerReopen() {
	qmp.Handle(d.QMP, "blockdev-reopen", func(ctx context.Context, m *qmp.Monitor, a *reopenArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, d.Graph.ReopenOptions(ctx, a.Options)
	})
}
