// Package job is QEMU 7.2's job machinery (job.c) and, on top of it, its
// block-job layer (blockjob.c, blockjob.go here).
//
// A job is created (status "created"), started ("running") and runs its
// body in a goroutine. The body may pause at pause points ("paused", or
// "standby" once "ready"), announce that it is ready to complete, and
// returns; the job then goes "waiting" → "pending" and, once finalized
// (by itself with auto-finalize, or by job-finalize), "concluded", or
// "aborting" → "concluded" if it failed or was cancelled. A concluded job
// is removed ("null") by job-dismiss, or at once with auto-dismiss. Every
// status change emits JOB_STATUS_CHANGE, and the QMP verbs are checked
// against job.c's verb table, with its error texts.
//
// Locking: one mutex per Manager guards the job list and every job's
// fields. Events are emitted with it held, so that a job's events come out
// in order. Driver callbacks (Complete, Cancel, Prepare, Commit, Abort,
// Clean) run without it, as QEMU drops job_mutex around them.
package job

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Status is QEMU's JobStatus.
type Status string

// Job statuses.
const (
	Undefined Status = "undefined"
	Created   Status = "created"
	Running   Status = "running"
	Paused    Status = "paused"
	Ready     Status = "ready"
	Standby   Status = "standby"
	Waiting   Status = "waiting"
	Pending   Status = "pending"
	Aborting  Status = "aborting"
	Concluded Status = "concluded"
	Null      Status = "null"
)

// Verb is QEMU's JobVerb.
type Verb string

// Job verbs.
const (
	VerbCancel   Verb = "cancel"
	VerbPause    Verb = "pause"
	VerbResume   Verb = "resume"
	VerbSetSpeed Verb = "set-speed"
	VerbComplete Verb = "complete"
	VerbFinalize Verb = "finalize"
	VerbDismiss  Verb = "dismiss"
)

// transitions is job.c's JobSTT: the status changes that may happen.
var transitions = map[Status][]Status{
	Undefined: {Created},
	Created:   {Running, Aborting, Null},
	Running:   {Paused, Ready, Waiting, Aborting},
	Paused:    {Running},
	Ready:     {Standby, Waiting, Aborting},
	Standby:   {Ready},
	Waiting:   {Pending, Aborting},
	Pending:   {Aborting, Concluded},
	Aborting:  {Aborting, Concluded},
	Concluded: {Null},
}

// verbs is QEMU 7.2's JobVerbTable: the statuses in which a verb is
// accepted.
var verbs = map[Verb][]Status{
	VerbCancel:   {Created, Running, Paused, Ready, Standby, Waiting, Pending},
	VerbPause:    {Created, Running, Paused, Ready, Standby},
	VerbResume:   {Created, Running, Paused, Ready, Standby},
	VerbSetSpeed: {Created, Running, Paused, Ready, Standby},
	VerbComplete: {Ready, Standby},
	VerbFinalize: {Pending},
	VerbDismiss:  {Concluded},
}

func contains(l []Status, s Status) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// Error texts in this package are QEMU's, capitals and all.

// ErrNotFound is the error for an unknown job ID.
var ErrNotFound = errors.New("Job not found")

// canceledText is glibc's strerror(ECANCELED), which QEMU records for a
// job cancelled before it failed on its own.
const canceledText = "Operation canceled"

// Info is one element of query-jobs (QEMU's JobInfo).
type Info struct {
	ID              string `json:"id"`
	Type            string `json:"type"`
	Status          Status `json:"status"`
	CurrentProgress int64  `json:"current-progress"`
	TotalProgress   int64  `json:"total-progress"`
	Error           string `json:"error,omitempty"`
}

// StatusChange is the data of the JOB_STATUS_CHANGE event.
type StatusChange struct {
	ID     string `json:"id"`
	Status Status `json:"status"`
}

// EmitFunc sends an event (qmp.Server.Emit fits).
type EmitFunc func(event string, data any)

// Driver is what a kind of job supplies (QEMU's JobDriver). Only Run is
// required.
type Driver struct {
	// Type is the JobType reported by query-jobs ("create", "mirror", ...).
	Type string
	// Run is the job's body. Its context is cancelled when the job is
	// force-cancelled (IsCancelled). A job cancelled softly (a ready
	// mirror's block-job-cancel) sees CancelRequested and returns nil to
	// end successfully.
	Run func(ctx context.Context, j *Job) error
	// Complete is the "complete" verb for jobs that have one; it typically
	// records the request and calls j.Enter. nil: "cannot be completed".
	Complete func(j *Job) error
	// Cancel is called on every cancel request and returns whether it is
	// to be forced; nil: every cancel is forced.
	Cancel func(j *Job, force bool) bool
	// Prepare runs when the job is finalized after success; an error
	// turns the outcome into a failure (then Abort runs).
	Prepare func(j *Job) error
	// Commit or Abort runs once on finalization, then Clean.
	Commit, Abort, Clean func(j *Job)
	// UserResume runs when the user resumes the job (job-resume,
	// block-job-resume), with the manager's lock held.
	UserResume func(j *Job)

	// Notifications, emitted with the manager's lock held (the block
	// layer's events): OnReady after "ready", OnPending after "pending"
	// when the job waits for job-finalize, OnCompleted or OnCancelled on
	// finalization, before "concluded".
	OnReady, OnPending, OnCompleted, OnCancelled func(j *Job)
}

// Options are QEMU's job creation flags.
type Options struct {
	// ManualFinalize is !auto-finalize: the job waits in "pending" for
	// job-finalize.
	ManualFinalize bool
	// ManualDismiss is !auto-dismiss: the job waits in "concluded" for
	// job-dismiss.
	ManualDismiss bool
}

// Manager owns the jobs. It is safe for concurrent use.
type Manager struct {
	emit EmitFunc

	mu   sync.Mutex // protects jobs and every field of every job and block job
	jobs []*Job     // newest first, as QEMU lists them
	wg   sync.WaitGroup
}

// Job is one job. Its methods are for the job's body and driver.
type Job struct {
	m   *Manager
	id  string
	drv *Driver

	// All fields below are protected by m.mu.
	status       Status
	autoFinalize bool
	autoDismiss  bool
	busy         bool // the body is running (not sleeping, yielding or paused)
	paused       bool // the body waits in a pause point
	pauseCount   int
	userPaused   bool
	cancelled    bool // cancel requested (job_cancel_requested)
	forceCancel  bool // cancel forced (job_is_cancelled)
	deferred     bool // the body has returned
	finishing    bool // finalization is under way (driver callbacks running)
	sleeping     bool // a timed sleep is under way (QEMU's timer_pending)
	current      int64
	total        int64
	err          error // the outcome; nil while running and on success
	ctxCancel    context.CancelFunc
	wake         chan struct{} // one pending job_enter; see kickLocked
	done         chan struct{} // closed on "concluded"
	block        *BlockJob     // the block-job layer, nil for other jobs
}

// NewManager returns a manager that reports events through emit (which
// may be nil). emit is called with the manager's lock held, so that events
// of one job come out in order; it must not call back into the manager.
func NewManager(emit EmitFunc) *Manager {
	if emit == nil {
		emit = func(string, any) {}
	}
	return &Manager{emit: emit}
}

// ValidID reports whether id is a well-formed QEMU ID: a letter, then
// letters, digits, '-', '.' and '_' (util/id.c id_wellformed).
func ValidID(id string) bool {
	if id == "" || !isAlpha(id[0]) {
		return false
	}
	for i := 1; i < len(id); i++ {
		c := id[i]
		if !isAlpha(c) && !(c >= '0' && c <= '9') && c != '-' && c != '.' && c != '_' {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

// Start runs a job the way blockdev-create and x-blockdev-amend do:
// auto-finalize, manual dismiss, progress 0/1 while running and 1/1
// afterwards. run's context is cancelled by job-cancel; long jobs may call
// PausePoint.
func (m *Manager) Start(id, typ string, run func(ctx context.Context) error) error {
	drv := &Driver{Type: typ, Run: func(ctx context.Context, j *Job) error {
		err := run(ctx)
		j.ProgressUpdate(1)
		return err
	}}
	return m.StartJob(id, drv, Options{ManualDismiss: true}, func(j *Job) error {
		j.total = 1
		return nil
	})
}

// StartJob creates a job and starts it: created → running before it
// returns. setup, if not nil, runs with the lock held between the two
// (block_job_create's checks); if it fails the job goes created → null and
// its error is returned.
func (m *Manager) StartJob(id string, drv *Driver, o Options, setup func(*Job) error) error {
	if !ValidID(id) {
		return fmt.Errorf("Invalid job ID '%s'", id)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.find(id) != nil {
		return fmt.Errorf("Job ID '%s' already in use", id)
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &Job{m: m, id: id, drv: drv, status: Undefined,
		autoFinalize: !o.ManualFinalize, autoDismiss: !o.ManualDismiss,
		paused: true, pauseCount: 1, ctxCancel: cancel,
		wake: make(chan struct{}, 1), done: make(chan struct{})}
	ctx = context.WithValue(ctx, jobKey{}, j)
	m.transition(j, Created)
	m.jobs = append([]*Job{j}, m.jobs...)
	if setup != nil {
		if err := setup(j); err != nil {
			// job_early_fail
			m.transition(j, Null)
			m.remove(j)
			cancel()
			return err
		}
	}
	// job_start
	j.pauseCount--
	j.busy = true
	j.paused = false
	m.transition(j, Running)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		j.PausePoint()
		err := drv.Run(ctx, j)
		m.mu.Lock()
		defer m.mu.Unlock()
		j.deferred = true
		j.busy = false // job_exit
		m.completed(j, err)
	}()
	return nil
}

func (m *Manager) find(id string) *Job {
	for _, j := range m.jobs {
		if j.id == id {
			return j
		}
	}
	return nil
}

func (m *Manager) remove(j *Job) {
	for i, x := range m.jobs {
		if x == j {
			m.jobs = append(m.jobs[:i], m.jobs[i+1:]...)
			return
		}
	}
}

// transition changes j's status and emits the event. Called with m.mu held.
func (m *Manager) transition(j *Job, s Status) {
	if !contains(transitions[j.status], s) {
		panic(fmt.Sprintf("job %s: transition %s -> %s", j.id, j.status, s))
	}
	changed := j.status != s
	j.status = s
	if changed {
		m.emit("JOB_STATUS_CHANGE", StatusChange{ID: j.id, Status: s})
	}
}

func notify(f func(*Job), j *Job) {
	if f != nil {
		f(j)
	}
}

// updateRC is job_update_rc_locked: a forced cancel with no error of its
// own becomes "Operation canceled", and any error moves to "aborting".
func (m *Manager) updateRC(j *Job) {
	if j.err == nil && j.forceCancel {
		j.err = errors.New(canceledText)
	}
	if j.err != nil {
		m.transition(j, Aborting)
	}
}

// completed is job_completed_locked: the body has returned err.
func (m *Manager) completed(j *Job, err error) {
	if err != nil && (!j.forceCancel || !errors.Is(err, context.Canceled)) {
		j.err = err
	}
	m.updateRC(j)
	if j.err != nil {
		m.finalizeSingle(j)
		return
	}
	m.transition(j, Waiting)
	m.transition(j, Pending)
	if !j.autoFinalize {
		notify(j.drv.OnPending, j)
		return
	}
	m.doFinalize(j)
}

// doFinalize is job_do_finalize_locked for a job alone in its
// transaction: prepare, then commit or abort.
func (m *Manager) doFinalize(j *Job) {
	j.finishing = true
	if j.err == nil && j.drv.Prepare != nil {
		m.mu.Unlock()
		err := j.drv.Prepare(j)
		m.mu.Lock()
		j.err = err
		m.updateRC(j)
	}
	m.finalizeSingle(j)
}

// finalizeSingle is job_finalize_single_locked: the driver's commit or
// abort and clean, the completion event, "concluded" and, with
// auto-dismiss, "null".
func (m *Manager) finalizeSingle(j *Job) {
	j.finishing = true
	m.updateRC(j)
	failed := j.err != nil
	m.mu.Unlock()
	if !failed && j.drv.Commit != nil {
		j.drv.Commit(j)
	}
	if failed && j.drv.Abort != nil {
		j.drv.Abort(j)
	}
	if j.drv.Clean != nil {
		j.drv.Clean(j)
	}
	m.mu.Lock()
	if j.forceCancel {
		notify(j.drv.OnCancelled, j)
	} else {
		notify(j.drv.OnCompleted, j)
	}
	m.transition(j, Concluded)
	j.ctxCancel()
	close(j.done)
	if j.autoDismiss {
		m.dismiss(j)
	}
}

func (m *Manager) dismiss(j *Job) {
	j.busy = false
	j.paused = false
	m.transition(j, Null)
	m.remove(j)
}

func (m *Manager) get(id string) (*Job, error) {
	j := m.find(id)
	if j == nil {
		return nil, ErrNotFound
	}
	return j, nil
}

func checkVerb(j *Job, v Verb) error {
	if contains(verbs[v], j.status) {
		return nil
	}
	return fmt.Errorf("Job '%s' in state '%s' cannot accept command verb '%s'", j.id, j.status, v)
}

// Query returns every job, newest first (query-jobs).
func (m *Manager) Query() []Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Info, 0, len(m.jobs))
	for _, j := range m.jobs {
		in := Info{ID: j.id, Type: j.drv.Type, Status: j.status, CurrentProgress: j.current, TotalProgress: j.total}
		if j.err != nil {
			in.Error = j.err.Error()
		}
		out = append(out, in)
	}
	return out
}

// withJob runs f on the job with the given ID, under the lock.
func (m *Manager) withJob(id string, f func(*Job) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	return f(j)
}

// Dismiss removes a concluded job (job-dismiss).
func (m *Manager) Dismiss(id string) error { return m.withJob(id, m.userDismiss) }

// Finalize is job-finalize.
func (m *Manager) Finalize(id string) error { return m.withJob(id, m.userFinalize) }

// Cancel is job-cancel: always forced.
func (m *Manager) Cancel(id string) error {
	return m.withJob(id, func(j *Job) error { return m.userCancel(j, true) })
}

// Pause is job-pause. The job pauses at its next pause point.
func (m *Manager) Pause(id string) error { return m.withJob(id, m.userPause) }

// Resume is job-resume.
func (m *Manager) Resume(id string) error { return m.withJob(id, m.userResume) }

// Complete is job-complete.
func (m *Manager) Complete(id string) error { return m.withJob(id, m.userComplete) }

func (m *Manager) userDismiss(j *Job) error {
	if err := checkVerb(j, VerbDismiss); err != nil {
		return err
	}
	m.dismiss(j)
	return nil
}

func (m *Manager) userFinalize(j *Job) error {
	if err := checkVerb(j, VerbFinalize); err != nil {
		return err
	}
	if !j.finishing {
		m.doFinalize(j)
	}
	return nil
}

// userCancel is job_user_cancel_locked.
func (m *Manager) userCancel(j *Job, force bool) error {
	if err := checkVerb(j, VerbCancel); err != nil {
		return err
	}
	m.cancel(j, force)
	return nil
}

// cancel is job_cancel_locked for a started job.
func (m *Manager) cancel(j *Job, force bool) {
	if j.drv.Cancel != nil {
		m.mu.Unlock()
		force = j.drv.Cancel(j, force)
		m.mu.Lock()
	} else {
		force = true
	}
	if j.userPaused {
		notify(j.drv.UserResume, j)
		j.userPaused = false
		j.pauseCount--
	}
	if force || !j.deferred {
		j.cancelled = true
		j.forceCancel = j.forceCancel || force
	}
	if j.forceCancel {
		j.ctxCancel()
	}
	if !j.deferred {
		j.kickLocked()
	} else if j.forceCancel && !j.finishing && j.status != Concluded {
		// Waiting for job-finalize: the job aborts now.
		m.finalizeSingle(j)
	}
}

// userPause is job_user_pause_locked.
func (m *Manager) userPause(j *Job) error {
	if err := checkVerb(j, VerbPause); err != nil {
		return err
	}
	if j.userPaused {
		return errors.New("Job is already paused")
	}
	j.userPaused = true
	j.pauseLocked()
	return nil
}

// userResume is job_user_resume_locked.
func (m *Manager) userResume(j *Job) error {
	if !j.userPaused || j.pauseCount <= 0 {
		return errors.New("Can't resume a job that was not paused")
	}
	if err := checkVerb(j, VerbResume); err != nil {
		return err
	}
	notify(j.drv.UserResume, j)
	j.userPaused = false
	j.resumeLocked()
	return nil
}

// userComplete is job_complete_locked.
func (m *Manager) userComplete(j *Job) error {
	if err := checkVerb(j, VerbComplete); err != nil {
		return err
	}
	if j.cancelled || j.drv.Complete == nil {
		return fmt.Errorf("The active block job '%s' cannot be completed", j.id)
	}
	m.mu.Unlock()
	defer m.mu.Lock()
	return j.drv.Complete(j)
}

// Wait blocks until the job has concluded or ctx is done. It returns
// ErrNotFound for an unknown job.
func (m *Manager) Wait(ctx context.Context, id string) error {
	m.mu.Lock()
	j := m.find(id)
	m.mu.Unlock()
	if j == nil {
		return ErrNotFound
	}
	select {
	case <-j.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close force-cancels every job that has not concluded and waits for all
// of them to end (job_cancel_sync_all).
func (m *Manager) Close() {
	m.mu.Lock()
	for _, j := range append([]*Job(nil), m.jobs...) {
		if contains(verbs[VerbCancel], j.status) {
			m.cancel(j, true)
		}
	}
	m.mu.Unlock()
	m.wg.Wait()
}

// ID returns the job's ID.
func (j *Job) ID() string { return j.id }

// kickLocked is job_enter: wake the body if it sleeps or yields. busy is
// set here, as job_enter_cond_locked does, so that a second kick before
// the body runs again is not left over for its next sleep.
func (j *Job) kickLocked() {
	if j.busy || j.deferred {
		return
	}
	j.busy = true
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

// Enter wakes the body if it sleeps or yields (job_enter).
func (j *Job) Enter() {
	j.m.mu.Lock()
	j.kickLocked()
	j.m.mu.Unlock()
}

// pauseLocked is job_pause_locked: one more reason to pause.
func (j *Job) pauseLocked() {
	j.pauseCount++
	if !j.paused {
		j.kickLocked()
	}
}

// resumeLocked is job_resume_locked.
func (j *Job) resumeLocked() {
	j.pauseCount--
	if j.pauseCount == 0 && !j.sleeping {
		j.kickLocked()
	}
}

// Pause and Resume are job_pause and job_resume: an internal reason to
// pause (a drained section), counted with the user's.
func (j *Job) Pause() {
	j.m.mu.Lock()
	j.pauseLocked()
	j.m.mu.Unlock()
}

// Resume undoes one Pause.
func (j *Job) Resume() {
	j.m.mu.Lock()
	j.resumeLocked()
	j.m.mu.Unlock()
}

// yieldLocked is job_do_yield_locked: the body sleeps until kicked or, if
// d >= 0, until d has passed. Called with m.mu held; releases it while
// waiting.
func (j *Job) yieldLocked(d time.Duration) {
	m := j.m
	j.busy = false
	var timer <-chan time.Time
	if d >= 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timer = t.C
	}
	j.sleeping = timer != nil
	m.mu.Unlock()
	select {
	case <-j.wake:
	case <-timer:
	}
	m.mu.Lock()
	j.sleeping = false
	select { // a kick that raced with the timer
	case <-j.wake:
	default:
	}
	j.busy = true
}

// pausePointLocked is job_pause_point_locked.
func (j *Job) pausePointLocked() {
	if j.pauseCount == 0 || j.forceCancel {
		return
	}
	st := j.status
	if st == Ready {
		j.m.transition(j, Standby)
	} else {
		j.m.transition(j, Paused)
	}
	j.paused = true
	for j.pauseCount > 0 && !j.forceCancel {
		j.yieldLocked(-1)
	}
	j.paused = false
	j.m.transition(j, st)
}

// PausePoint is where the body honours a pause: while the job is paused
// it reports "paused" ("standby" when ready) and blocks until it is
// resumed or force-cancelled.
func (j *Job) PausePoint() {
	j.m.mu.Lock()
	j.pausePointLocked()
	j.m.mu.Unlock()
}

// Sleep is job_sleep_ns: sleep for d (less if the job is entered), then
// pause if asked to. It returns at once for a force-cancelled job.
func (j *Job) Sleep(d time.Duration) {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	if j.forceCancel {
		return
	}
	if j.pauseCount == 0 {
		if d < 0 {
			d = 0
		}
		j.yieldLocked(d)
	}
	j.pausePointLocked()
}

// Yield is job_yield: sleep until the job is entered (Enter, a cancel, a
// resume), then pause if asked to.
func (j *Job) Yield() {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	if j.forceCancel {
		return
	}
	if j.pauseCount == 0 {
		j.yieldLocked(-1)
	}
	j.pausePointLocked()
}

// IsCancelled reports a forced cancel (job_is_cancelled): the body should
// stop as soon as it can.
func (j *Job) IsCancelled() bool {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	return j.forceCancel
}

// CancelRequested reports any cancel (job_cancel_requested), forced or
// not.
func (j *Job) CancelRequested() bool {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	return j.cancelled
}

// ProgressUpdate records done more units of work (job_progress_update).
func (j *Job) ProgressUpdate(done int64) {
	j.m.mu.Lock()
	j.current += done
	j.m.mu.Unlock()
}

// ProgressSetRemaining sets the work left (job_progress_set_remaining).
func (j *Job) ProgressSetRemaining(remaining int64) {
	j.m.mu.Lock()
	j.total = j.current + remaining
	j.m.mu.Unlock()
}

// ProgressIncreaseRemaining adds delta to the work to do.
func (j *Job) ProgressIncreaseRemaining(delta int64) {
	j.m.mu.Lock()
	j.total += delta
	j.m.mu.Unlock()
}

// TransitionToReady is job_transition_to_ready: the job can now be
// completed.
func (j *Job) TransitionToReady() {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	j.m.transition(j, Ready)
	notify(j.drv.OnReady, j)
}

type jobKey struct{}

// PausePoint is Job.PausePoint for a body that has only its context (the
// one Start and StartJob pass). It returns ctx.Err(), so that a cancelled
// job stops; it is a no-op for contexts that do not belong to a job.
func PausePoint(ctx context.Context) error {
	if j, _ := ctx.Value(jobKey{}).(*Job); j != nil {
		j.PausePoint()
	}
	return ctx.Err()
}
