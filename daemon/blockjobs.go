package daemon

import (
	"context"

	"blockd/daemon/job"
	"blockd/qmp"
)

// The block-job commands (QEMU's blockdev.c): query-block-jobs and
// block-job-*, on the block jobs of d.Jobs (daemon/job's block-job layer).
// job-* (daemon/job) works on the same jobs.

type blockJobDeviceArgs struct {
	Device string `json:"device"`
}

type blockJobIDArgs struct {
	ID string `json:"id"`
}

type blockJobSpeedArgs struct {
	Device string `json:"device"`
	Speed  int64  `json:"speed"`
}

type blockJobCancelArgs struct {
	Device string `json:"device"`
	Force  *bool  `json:"force,omitempty"`
}

func (d *Daemon) registerBlockJobs() {
	jobs := d.Jobs
	qmp.Handle(d.QMP, "query-block-jobs", func(context.Context, *qmp.Monitor, *qmp.Empty) (any, error) {
		return jobs.QueryBlock(), nil
	})
	qmp.Handle(d.QMP, "block-job-set-speed", func(_ context.Context, _ *qmp.Monitor, a *blockJobSpeedArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, jobs.BlockSetSpeed(a.Device, a.Speed)
	})
	qmp.Handle(d.QMP, "block-job-cancel", func(_ context.Context, _ *qmp.Monitor, a *blockJobCancelArgs) (*qmp.Empty, error) {
		return &qmp.Empty{}, jobs.BlockCancel(a.Device, a.Force != nil && *a.Force)
	})
	type verb struct {
		name string
		fn   func(string) error
	}
	for _, v := range []verb{
		{"block-job-pause", jobs.BlockPause},
		{"block-job-resume", jobs.BlockResume},
		{"block-job-complete", jobs.BlockComplete},
	} {
		fn := v.fn
		qmp.Handle(d.QMP, v.name, func(_ context.Context, _ *qmp.Monitor, a *blockJobDeviceArgs) (*qmp.Empty, error) {
			return &qmp.Empty{}, fn(a.Device)
		})
	}
	for _, v := range []verb{
		{"block-job-finalize", jobs.BlockFinalize},
		{"block-job-dismiss", jobs.BlockDismiss},
	} {
		fn := v.fn
		qmp.Handle(d.QMP, v.name, func(_ context.Context, _ *qmp.Monitor, a *blockJobIDArgs) (*qmp.Empty, error) {
			return &qmp.Empty{}, fn(a.ID)
		})
	}
}

// blockJobOptions is what every block job command takes alike: job-id,
// speed, auto-finalize and auto-dismiss (both default to on).
func blockJobOptions(id *string, speed *int64, autoFinalize, autoDismiss *bool) job.BlockOptions {
	o := job.BlockOptions{}
	if id != nil {
		o.ID = *id
	}
	if speed != nil {
		o.Speed = *speed
	}
	o.ManualFinalize = autoFinalize != nil && !*autoFinalize
	o.ManualDismiss = autoDismiss != nil && !*autoDismiss
	return o
}
