package job

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"blockd/graph"
	"blockd/qmp"
)

// The block-job layer (QEMU's blockjob.c): a job with a speed and its rate
// limiter, an I/O status and error policies, listed by query-block-jobs,
// driven by the block-job-* commands and reported by the BLOCK_JOB_*
// events. Concrete jobs (commit, stream, mirror, backup) supply a
// BlockDriver.

// IOStatus is QEMU's BlockDeviceIoStatus.
type IOStatus string

// I/O statuses.
const (
	IOStatusOK      IOStatus = "ok"
	IOStatusFailed  IOStatus = "failed"
	IOStatusNoSpace IOStatus = "nospace"
)

// OnError is QEMU's BlockdevOnError: what a job does on an I/O error.
type OnError string

// Error policies. OnErrorAuto behaves as OnErrorEnospc in a job.
const (
	OnErrorReport OnError = "report"
	OnErrorIgnore OnError = "ignore"
	OnErrorEnospc OnError = "enospc"
	OnErrorStop   OnError = "stop"
	OnErrorAuto   OnError = "auto"
)

// EnumValues lists the policies for QAPI decoding (qapi.Enum).
func (OnError) EnumValues() []string { return []string{"report", "ignore", "enospc", "stop", "auto"} }

// ErrorAction is QEMU's BlockErrorAction: what the job is to do with an
// I/O error, as decided by BlockJob.ErrorAction.
type ErrorAction string

// Error actions.
const (
	ActionIgnore ErrorAction = "ignore" // go on as if the request had succeeded
	ActionReport ErrorAction = "report" // fail the job with the error
	ActionStop   ErrorAction = "stop"   // the job is paused; retry the request after a resume
)

// BlockDriver is what a kind of block job supplies (QEMU's BlockJobDriver).
// Only Run is required; the other members are as in Driver.
type BlockDriver struct {
	// Type is the JobType: "commit", "stream", "mirror", "backup".
	Type string
	// Run is the job's body. Between chunks it calls b.RateLimit (a pause
	// and cancel point), reports progress with b.ProgressUpdate and
	// decides I/O errors with b.ErrorAction.
	Run      func(ctx context.Context, b *BlockJob) error
	Complete func(b *BlockJob) error
	Cancel   func(b *BlockJob, force bool) bool
	Prepare  func(b *BlockJob) error
	Commit   func(b *BlockJob)
	Abort    func(b *BlockJob)
	Clean    func(b *BlockJob)
	// SetSpeed is told of a new speed (mirror resizes its buffers).
	SetSpeed func(b *BlockJob, speed int64)
}

// BlockOptions are the common arguments of the block-job commands.
type BlockOptions struct {
	ID    string
	Speed int64
	Options
}

// BlockJob is a running block job: the job's body gets one as its helper.
type BlockJob struct {
	*Job
	bdrv  *BlockDriver
	limit *rateLimit

	// Protected by the manager's lock.
	speed    int64
	iostatus IOStatus
}

// BlockJobInfo is one element of query-block-jobs.
type BlockJobInfo struct {
	Type         string   `json:"type"`
	Device       string   `json:"device"`
	Len          int64    `json:"len"`
	Offset       int64    `json:"offset"`
	Busy         bool     `json:"busy"`
	Paused       bool     `json:"paused"`
	Speed        int64    `json:"speed"`
	IOStatus     IOStatus `json:"io-status"`
	Ready        bool     `json:"ready"`
	Status       Status   `json:"status"`
	AutoFinalize bool     `json:"auto-finalize"`
	AutoDismiss  bool     `json:"auto-dismiss"`
	Error        string   `json:"error,omitempty"`
}

// BlockJobProgress is the data of BLOCK_JOB_READY and BLOCK_JOB_CANCELLED.
type BlockJobProgress struct {
	Type   string `json:"type"`
	Device string `json:"device"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Speed  int64  `json:"speed"`
}

// BlockJobCompleted is the data of BLOCK_JOB_COMPLETED.
type BlockJobCompleted struct {
	Type   string `json:"type"`
	Device string `json:"device"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Speed  int64  `json:"speed"`
	Error  string `json:"error,omitempty"`
}

// BlockJobPending is the data of BLOCK_JOB_PENDING.
type BlockJobPending struct {
	Type string `json:"type"`
	ID   string `json:"id"`
}

// BlockJobError is the data of BLOCK_JOB_ERROR.
type BlockJobError struct {
	Device    string      `json:"device"`
	Operation string      `json:"operation"`
	Action    ErrorAction `json:"action"`
}

// StartBlock creates and starts a block job (block_job_create, job_start).
// A negative speed fails after the job was created, as in QEMU: the job
// goes created → null.
func (m *Manager) StartBlock(bdrv *BlockDriver, o BlockOptions) (*BlockJob, error) {
	b := &BlockJob{bdrv: bdrv, limit: newRateLimit(), iostatus: IOStatusOK}
	drv := &Driver{
		Type:       bdrv.Type,
		Run:        func(ctx context.Context, _ *Job) error { return bdrv.Run(ctx, b) },
		UserResume: func(*Job) { b.iostatus = IOStatusOK }, // block_job_user_resume
		OnReady:    func(*Job) { m.emit("BLOCK_JOB_READY", b.progressLocked()) },
		OnPending: func(j *Job) {
			m.emit("BLOCK_JOB_PENDING", BlockJobPending{Type: bdrv.Type, ID: j.id})
		},
		OnCancelled: func(*Job) { m.emit("BLOCK_JOB_CANCELLED", b.progressLocked()) },
		OnCompleted: func(j *Job) {
			p := b.progressLocked()
			ev := BlockJobCompleted{Type: p.Type, Device: p.Device, Len: p.Len, Offset: p.Offset, Speed: p.Speed}
			if j.err != nil {
				ev.Error = j.err.Error()
			}
			m.emit("BLOCK_JOB_COMPLETED", ev)
		},
	}
	if bdrv.Complete != nil {
		drv.Complete = func(*Job) error { return bdrv.Complete(b) }
	}
	if bdrv.Cancel != nil {
		drv.Cancel = func(_ *Job, force bool) bool { return bdrv.Cancel(b, force) }
	}
	if bdrv.Prepare != nil {
		drv.Prepare = func(*Job) error { return bdrv.Prepare(b) }
	}
	for _, c := range []struct {
		dst *func(*Job)
		src func(*BlockJob)
	}{{&drv.Commit, bdrv.Commit}, {&drv.Abort, bdrv.Abort}, {&drv.Clean, bdrv.Clean}} {
		if src := c.src; src != nil {
			*c.dst = func(*Job) { src(b) }
		}
	}
	err := m.StartJob(o.ID, drv, o.Options, func(j *Job) error {
		b.Job = j
		j.block = b
		return m.setSpeed(b, o.Speed)
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

func (b *BlockJob) progressLocked() BlockJobProgress {
	return BlockJobProgress{Type: b.bdrv.Type, Device: b.id, Len: b.total, Offset: b.current, Speed: b.speed}
}

// setSpeed is block_job_set_speed_locked.
func (m *Manager) setSpeed(b *BlockJob, speed int64) error {
	if err := checkVerb(b.Job, VerbSetSpeed); err != nil {
		return err
	}
	if speed < 0 {
		return errors.New("Parameter 'speed' expects a non-negative value")
	}
	old := b.speed
	b.limit.setSpeed(uint64(speed), SliceTime)
	b.speed = speed
	if b.bdrv.SetSpeed != nil {
		m.mu.Unlock()
		b.bdrv.SetSpeed(b, speed)
		m.mu.Lock()
	}
	if speed != 0 && speed <= old {
		return nil
	}
	// A faster (or unlimited) job need not finish its current sleep.
	if b.sleeping {
		b.kickLocked()
	}
	return nil
}

// Speed returns the job's speed limit in bytes per second (0: none).
func (b *BlockJob) Speed() int64 {
	b.m.mu.Lock()
	defer b.m.mu.Unlock()
	return b.speed
}

// RateLimit records n bytes processed and sleeps as long as the speed
// limit asks (block_job_ratelimit_get_delay and job_sleep_ns; woken early,
// it sleeps again for what is left). It is a pause point even when no
// limit is set, and returns context.Canceled once the job has been
// force-cancelled.
func (b *BlockJob) RateLimit(n int64) error {
	d := b.limit.delay(uint64(n))
	for {
		b.Sleep(d)
		if b.IsCancelled() {
			return context.Canceled
		}
		if d == 0 {
			return nil
		}
		if d = b.limit.delay(0); d <= 0 {
			return nil
		}
	}
}

// ErrorAction is block_job_error_action: what to do with err, met while
// reading (read) or writing, under the policy onErr. It emits
// BLOCK_JOB_ERROR. For ActionStop the job is paused as if by the user,
// with io-status "failed" ("nospace" for ENOSPC), and the body is to retry
// the request after its next pause point (block-job-resume resets the
// status).
func (b *BlockJob) ErrorAction(onErr OnError, read bool, err error) ErrorAction {
	enospc := graph.Errno(err) == syscall.ENOSPC
	var action ErrorAction
	switch onErr {
	case OnErrorEnospc, OnErrorAuto:
		action = ActionReport
		if enospc {
			action = ActionStop
		}
	case OnErrorStop:
		action = ActionStop
	case OnErrorIgnore:
		action = ActionIgnore
	default:
		action = ActionReport
	}
	op := "write"
	if read {
		op = "read"
	}
	m := b.m
	m.mu.Lock()
	defer m.mu.Unlock()
	m.emit("BLOCK_JOB_ERROR", BlockJobError{Device: b.id, Operation: op, Action: action})
	if action == ActionStop {
		if !b.userPaused {
			b.pauseLocked()
			b.userPaused = true
		}
		if b.iostatus == IOStatusOK {
			b.iostatus = IOStatusFailed
			if enospc {
				b.iostatus = IOStatusNoSpace
			}
		}
	}
	return action
}

// notFound is find_block_job_locked's error.
func notFound(id string) error {
	return qmp.NewError(qmp.DeviceNotActive, "Block job '%s' not found", id)
}

// withBlock runs f on the block job with the given ID, under the lock.
func (m *Manager) withBlock(id string, f func(*BlockJob) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j := m.find(id)
	if j == nil || j.block == nil {
		return notFound(id)
	}
	return f(j.block)
}

// QueryBlock returns every block job, newest first (query-block-jobs).
func (m *Manager) QueryBlock() []BlockJobInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []BlockJobInfo{}
	for _, j := range m.jobs {
		b := j.block
		if b == nil {
			continue
		}
		in := BlockJobInfo{Type: b.bdrv.Type, Device: j.id, Len: j.total, Offset: j.current,
			Busy: j.busy, Paused: j.pauseCount > 0, Speed: b.speed, IOStatus: b.iostatus,
			Ready: j.status == Ready || j.status == Standby, Status: j.status,
			AutoFinalize: j.autoFinalize, AutoDismiss: j.autoDismiss}
		if j.err != nil {
			in.Error = j.err.Error()
		}
		out = append(out, in)
	}
	return out
}

// BlockSetSpeed is block-job-set-speed.
func (m *Manager) BlockSetSpeed(device string, speed int64) error {
	return m.withBlock(device, func(b *BlockJob) error { return m.setSpeed(b, speed) })
}

// BlockCancel is block-job-cancel: a cancel that the job may take as a
// request to complete early unless force is set (a ready mirror ends
// successfully without switching to its target).
func (m *Manager) BlockCancel(device string, force bool) error {
	return m.withBlock(device, func(b *BlockJob) error {
		if b.userPaused && !force {
			return fmt.Errorf("The block job for device '%s' is currently paused", device)
		}
		return m.userCancel(b.Job, force)
	})
}

// BlockPause is block-job-pause.
func (m *Manager) BlockPause(device string) error {
	return m.withBlock(device, func(b *BlockJob) error { return m.userPause(b.Job) })
}

// BlockResume is block-job-resume.
func (m *Manager) BlockResume(device string) error {
	return m.withBlock(device, func(b *BlockJob) error { return m.userResume(b.Job) })
}

// BlockComplete is block-job-complete.
func (m *Manager) BlockComplete(device string) error {
	return m.withBlock(device, func(b *BlockJob) error { return m.userComplete(b.Job) })
}

// BlockFinalize is block-job-finalize.
func (m *Manager) BlockFinalize(id string) error {
	return m.withBlock(id, func(b *BlockJob) error { return m.userFinalize(b.Job) })
}

// BlockDismiss is block-job-dismiss.
func (m *Manager) BlockDismiss(id string) error {
	return m.withBlock(id, func(b *BlockJob) error { return m.userDismiss(b.Job) })
}
