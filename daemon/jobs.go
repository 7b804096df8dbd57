package daemon

import (
	"context"
	"errors"
	"fmt"

	"blockd/graph"
	"blockd/internal/qapi"
	"blockd/qmp"
)

// blockdev-create and x-blockdev-amend run as jobs (daemon/job): the
// command validates its arguments and returns {} at once; the outcome is in
// query-jobs.

type createArgs struct {
	JobID   string      `json:"job-id"`
	Options qapi.Opaque `json:"options"`
}

type amendArgs struct {
	JobID    string      `json:"job-id"`
	NodeName string      `json:"node-name"`
	Options  qapi.Opaque `json:"options"`
	Force    *bool       `json:"force,omitempty"`
}

func (d *Daemon) registerJobs() {
	qmp.Handle(d.QMP, "blockdev-create", func(ctx context.Context, m *qmp.Monitor, a *createArgs) (*qmp.Empty, error) {
		drv, opts, err := d.Graph.DecodeCreateOptions(a.Options.V)
		if err != nil {
			return nil, err
		}
		return &qmp.Empty{}, d.Jobs.Start(a.JobID, "create", func(ctx context.Context) error {
			cc := d.Graph.NewCreateContext()
			defer cc.Release()
			return drv.Create(ctx, cc, opts)
		})
	})
	qmp.Handle(d.QMP, "x-blockdev-amend", func(ctx context.Context, m *qmp.Monitor, a *amendArgs) (*qmp.Empty, error) {
		drv, opts, err := d.Graph.DecodeAmendOptions(a.Options.V)
		if err != nil {
			return nil, err
		}
		b := d.Graph.Lookup(a.NodeName)
		if b == nil {
			return nil, fmt.Errorf("Cannot find device='' nor node-name='%s'", a.NodeName)
		}
		if b.Driver() != drv {
			return nil, errors.New("x-blockdev-amend doesn't support changing the block driver")
		}
		am, ok := b.Node().(graph.Amender)
		if !ok || drv.AmendOptions == nil {
			return nil, errors.New("Driver does not support x-blockdev-amend")
		}
		force := a.Force != nil && *a.Force
		return &qmp.Empty{}, d.Jobs.Start(a.JobID, "amend", func(ctx context.Context) error {
			return am.Amend(ctx, opts, force)
		})
	})
}
