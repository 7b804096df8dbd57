// Package job is QEMU's job machinery (job.c) as blockdev-create and
// x-blockdev-amend use it: a job is created, runs, and then waits in
// "concluded" until the client dismisses it. Auto-finalize is on and
// auto-dismiss is off. Every status change emits JOB_STATUS_CHANGE, and
// the QMP verbs (job-dismiss, job-cancel, ...) are checked against job.c's
// verb table, with its error texts.
package job

import (
	"context"
	"errors"
	"fmt"
	"sync"
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
	VerbChange   Verb = "change"
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

// verbs is job.c's JobVerbTable: the statuses in which a verb is accepted.
var verbs = map[Verb][]Status{
	VerbCancel:   {Created, Running, Paused, Ready, Standby, Waiting, Pending},
	VerbPause:    {Created, Running, Paused, Ready, Standby},
	VerbResume:   {Created, Running, Paused, Ready, Standby},
	VerbSetSpeed: {Created, Running, Paused, Ready, Standby},
	VerbComplete: {Ready, Standby},
	VerbFinalize: {Pending},
	VerbDismiss:  {Concluded},
	VerbChange:   {Created, Running, Paused, Ready, Standby},
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

// Manager owns the jobs. It is safe for concurrent use.
type Manager struct {
	emit EmitFunc

	mu   sync.Mutex // protects jobs and every job's fields
	jobs []*job     // newest first, as QEMU lists them
	wg   sync.WaitGroup
}

type job struct {
	id, typ    string
	status     Status
	current    int64
	total      int64
	err        error
	cancelled  bool
	userPaused bool
	pauseCount int
	cancel     context.CancelFunc
	wake       chan struct{} // signalled on resume or cancel (pause points wait on it)
	done       chan struct{} // closed when the job has concluded
}

// NewManager returns a manager that reports status changes through emit
// (which may be nil). emit is called with the manager's lock held, so that
// events of one job come out in order; it must not call back into the
// manager.
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

// Start creates a job and runs it in its own goroutine. The job goes
// created → running before Start returns; when run returns it goes
// waiting → pending → concluded, or aborting → concluded if run failed or
// the job was cancelled. Its error is then reported by query-jobs only.
// Progress is 0/1 while running and 1/1 afterwards. run's context is
// cancelled by job-cancel; long jobs may call PausePoint.
func (m *Manager) Start(id, typ string, run func(ctx context.Context) error) error {
	if !ValidID(id) {
		return fmt.Errorf("Invalid job ID '%s'", id)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.find(id) != nil {
		return fmt.Errorf("Job ID '%s' already in use", id)
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &job{id: id, typ: typ, status: Undefined, cancel: cancel, wake: make(chan struct{}, 1), done: make(chan struct{})}
	ctx = context.WithValue(ctx, jobKey{}, &pauseHandle{m: m, j: j})
	m.transition(j, Created)
	m.jobs = append([]*job{j}, m.jobs...)
	m.transition(j, Running)
	j.total = 1
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		err := run(ctx)
		m.complete(j, err)
	}()
	return nil
}

func (m *Manager) find(id string) *job {
	for _, j := range m.jobs {
		if j.id == id {
			return j
		}
	}
	return nil
}

// transition changes j's status and emits the event. Called with m.mu held.
func (m *Manager) transition(j *job, s Status) {
	if !contains(transitions[j.status], s) {
		panic(fmt.Sprintf("job %s: transition %s -> %s", j.id, j.status, s))
	}
	changed := j.status != s
	j.status = s
	if changed {
		m.emit("JOB_STATUS_CHANGE", StatusChange{ID: j.id, Status: s})
	}
}

// complete is job_exit with auto-finalize: the run function has returned.
func (m *Manager) complete(j *job, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j.current = j.total
	if j.cancelled && (err == nil || errors.Is(err, context.Canceled)) {
		err = errors.New(canceledText)
	}
	if err != nil {
		j.err = err
		m.transition(j, Aborting)
	} else {
		m.transition(j, Waiting)
		m.transition(j, Pending)
	}
	m.transition(j, Concluded)
	j.cancel()
	close(j.done)
}

func (m *Manager) get(id string) (*job, error) {
	j := m.find(id)
	if j == nil {
		return nil, ErrNotFound
	}
	return j, nil
}

func checkVerb(j *job, v Verb) error {
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
		in := Info{ID: j.id, Type: j.typ, Status: j.status, CurrentProgress: j.current, TotalProgress: j.total}
		if j.err != nil {
			in.Error = j.err.Error()
		}
		out = append(out, in)
	}
	return out
}

// Dismiss removes a concluded job (job-dismiss).
func (m *Manager) Dismiss(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	if err := checkVerb(j, VerbDismiss); err != nil {
		return err
	}
	m.transition(j, Null)
	for i, x := range m.jobs {
		if x == j {
			m.jobs = append(m.jobs[:i], m.jobs[i+1:]...)
			break
		}
	}
	return nil
}

// Finalize is job-finalize. Jobs finalize themselves (auto-finalize), so
// this only ever reports the verb error for the job's current status.
func (m *Manager) Finalize(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	return checkVerb(j, VerbFinalize)
}

// Cancel is job-cancel (always forced, as QMP's job-cancel is): the run
// function's context is cancelled and the job ends in concluded with the
// error "Operation canceled" unless it failed otherwise.
func (m *Manager) Cancel(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	if err := checkVerb(j, VerbCancel); err != nil {
		return err
	}
	if j.userPaused {
		j.userPaused = false
		j.pauseCount--
	}
	j.cancelled = true
	j.cancel()
	j.kick()
	return nil
}

// Pause is job-pause. The job pauses at its next PausePoint.
func (m *Manager) Pause(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	if err := checkVerb(j, VerbPause); err != nil {
		return err
	}
	if j.userPaused {
		return errors.New("Job is already paused")
	}
	j.userPaused = true
	j.pauseCount++
	return nil
}

// Resume is job-resume.
func (m *Manager) Resume(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	if !j.userPaused || j.pauseCount <= 0 {
		return errors.New("Can't resume a job that was not paused")
	}
	if err := checkVerb(j, VerbResume); err != nil {
		return err
	}
	j.userPaused = false
	j.pauseCount--
	j.kick()
	return nil
}

// Complete is job-complete. No job here has a completion step (they never
// become ready), so it only reports the verb error.
func (m *Manager) Complete(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.get(id)
	if err != nil {
		return err
	}
	if err := checkVerb(j, VerbComplete); err != nil {
		return err
	}
	return fmt.Errorf("The active block job '%s' cannot be completed", j.id)
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

// Close cancels every running job and waits for all of them to end.
func (m *Manager) Close() {
	m.mu.Lock()
	for _, j := range m.jobs {
		if j.status == Running || j.status == Paused {
			j.cancelled = true
			j.cancel()
			j.kick()
		}
	}
	m.mu.Unlock()
	m.wg.Wait()
}

func (j *job) kick() {
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

type jobKey struct{}

type pauseHandle struct {
	m *Manager
	j *job
}

// PausePoint is where a running job honours job-pause: while the job is
// paused it reports "paused" and blocks until it is resumed or cancelled.
// It returns ctx.Err() once the job has been cancelled. It is a no-op for
// contexts that do not belong to a job.
func PausePoint(ctx context.Context) error {
	h, _ := ctx.Value(jobKey{}).(*pauseHandle)
	if h == nil {
		return ctx.Err()
	}
	m, j := h.m, h.j
	m.mu.Lock()
	if j.pauseCount > 0 && !j.cancelled {
		m.transition(j, Paused)
		for j.pauseCount > 0 && !j.cancelled {
			m.mu.Unlock()
			<-j.wake
			m.mu.Lock()
		}
		m.transition(j, Running)
	}
	m.mu.Unlock()
	return ctx.Err()
}
