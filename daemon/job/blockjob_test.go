package job

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"blockd/internal/qapi"
	"blockd/qmp"
)

// The event sequences pinned here were recorded from qemu-storage-daemon
// 7.2 running blockdev-mirror and blockdev-backup jobs on null-co and
// blkdebug nodes (a backup's drained start, "paused" then "running" right
// after "running", is the backup job's own and not the machinery's).

// events records every event as "NAME {data}" in QEMU's encoding.
type events struct {
	mu  sync.Mutex
	evs []string
	ch  chan struct{}
}

func newEvents() *events { return &events{ch: make(chan struct{}, 1)} }

func (e *events) emit(name string, data any) {
	e.mu.Lock()
	e.evs = append(e.evs, name+" "+string(qapi.Marshal(data)))
	e.mu.Unlock()
	select {
	case e.ch <- struct{}{}:
	default:
	}
}

// of returns the events of job id, JOB_STATUS_CHANGE shortened to its
// status.
func (e *events) of(id string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, s := range e.evs {
		if st, ok := strings.CutPrefix(s, `JOB_STATUS_CHANGE {"status": "`); ok {
			if strings.HasSuffix(st, `", "id": "`+id+`"}`) {
				out = append(out, st[:strings.IndexByte(st, '"')])
			}
		} else if strings.Contains(s, `"`+id+`"`) {
			out = append(out, s)
		}
	}
	return out
}

// waitFor waits until job id has emitted an event containing s.
func (e *events) waitFor(t *testing.T, id, s string) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		for _, x := range e.of(id) {
			if strings.Contains(x, s) {
				return
			}
		}
		select {
		case <-e.ch:
		case <-time.After(5 * time.Millisecond):
		case <-deadline:
			t.Fatalf("%s: no %q in %q", id, s, e.of(id))
		}
	}
}

func (e *events) check(t *testing.T, id string, want ...string) {
	t.Helper()
	if got := e.of(id); !reflect.DeepEqual(got, want) {
		t.Fatalf("%s events:\n got %q\nwant %q", id, got, want)
	}
}

func wantErr(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil || err.Error() != want {
		t.Fatalf("got error %v, want %q", err, want)
	}
}

func queryOne(t *testing.T, m *Manager, id string) BlockJobInfo {
	t.Helper()
	for _, in := range m.QueryBlock() {
		if in.Device == id {
			return in
		}
	}
	t.Fatalf("block job %s not listed", id)
	return BlockJobInfo{}
}

// copyBody is a stream-like body: n chunks of size bytes, rate-limited,
// with the error policy applied to errors that fail(chunk) returns.
type copyBody struct {
	chunks, size int64
	policy       OnError
	fail         func(chunk int64) error
}

func (c *copyBody) run(ctx context.Context, b *BlockJob) error {
	b.ProgressSetRemaining(c.chunks * c.size)
	var first error
	for i := int64(0); i < c.chunks; {
		if err := b.RateLimit(0); err != nil {
			return err
		}
		if c.fail != nil {
			if err := c.fail(i); err != nil {
				switch b.ErrorAction(c.policy, true, err) {
				case ActionStop:
					continue // retried after block-job-resume
				case ActionReport:
					return err
				}
				if first == nil {
					first = err
				}
			}
		}
		b.ProgressUpdate(c.size)
		if err := b.RateLimit(c.size); err != nil {
			return err
		}
		i++
	}
	return nil
}

// mirrorBody copies, becomes ready and waits for block-job-complete or a
// cancel, which it honours softly while ready, as QEMU's mirror does.
type mirrorBody struct {
	mu       sync.Mutex
	complete bool
	pivoted  bool
}

func (mb *mirrorBody) driver() *BlockDriver {
	return &BlockDriver{
		Type: "mirror",
		Run: func(ctx context.Context, b *BlockJob) error {
			b.ProgressSetRemaining(1 << 20)
			b.ProgressUpdate(1 << 20)
			b.TransitionToReady()
			for {
				mb.mu.Lock()
				done := mb.complete
				mb.mu.Unlock()
				if done || b.CancelRequested() {
					break
				}
				b.Yield()
				if b.IsCancelled() {
					return ctx.Err()
				}
			}
			return nil
		},
		Complete: func(b *BlockJob) error {
			mb.mu.Lock()
			mb.complete = true
			mb.mu.Unlock()
			b.Enter()
			return nil
		},
		Cancel: func(b *BlockJob, force bool) bool {
			b.m.mu.Lock()
			ready := b.status == Ready || b.status == Standby
			b.m.mu.Unlock()
			return force || !ready
		},
		Prepare: func(b *BlockJob) error {
			mb.mu.Lock()
			mb.pivoted = mb.complete
			mb.mu.Unlock()
			return nil
		},
	}
}

func startCopy(t *testing.T, m *Manager, id string, c *copyBody, o BlockOptions) *BlockJob {
	t.Helper()
	o.ID = id
	b, err := m.StartBlock(&BlockDriver{Type: "backup", Run: c.run}, o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The QMP shapes, byte for byte as qemu-storage-daemon 7.2 prints them.
func TestBlockJobShapes(t *testing.T) {
	for _, tc := range []struct {
		v    any
		want string
	}{
		{BlockJobInfo{Type: "mirror", Device: "m1", Len: 1048576, Offset: 1048576, IOStatus: IOStatusOK, Ready: true, Status: Ready, AutoFinalize: true, AutoDismiss: true},
			`{"auto-finalize": true, "io-status": "ok", "device": "m1", "auto-dismiss": true, "busy": false, "len": 1048576, "offset": 1048576, "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror"}`},
		{BlockJobInfo{Type: "backup", Device: "jsreport5", Len: 4194304, Offset: 3145728, IOStatus: IOStatusOK, Status: Concluded, AutoFinalize: true, Error: "Input/output error"},
			`{"auto-finalize": true, "io-status": "ok", "device": "jsreport5", "auto-dismiss": false, "busy": false, "len": 4194304, "offset": 3145728, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "backup", "error": "Input/output error"}`},
		{BlockJobProgress{Type: "mirror", Device: "m1", Len: 1048576, Offset: 1048576},
			`{"device": "m1", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`},
		{BlockJobCompleted{Type: "backup", Device: "jsreport5", Len: 4194304, Offset: 3145728, Error: "Input/output error"},
			`{"device": "jsreport5", "len": 4194304, "offset": 3145728, "speed": 0, "type": "backup", "error": "Input/output error"}`},
		{BlockJobPending{Type: "backup", ID: "b3"}, `{"type": "backup", "id": "b3"}`},
		{BlockJobError{Device: "jsstop5", Operation: "read", Action: ActionStop}, `{"device": "jsstop5", "operation": "read", "action": "stop"}`},
	} {
		if got := string(qapi.Marshal(tc.v)); got != tc.want {
			t.Errorf("got  %s\nwant %s", got, tc.want)
		}
	}
}

func TestBlockJobAutoFinalizeDismiss(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	startCopy(t, m, "b1", &copyBody{chunks: 4, size: 1 << 20}, BlockOptions{})
	e.waitFor(t, "b1", "null")
	e.check(t, "b1", "created", "running", "waiting", "pending",
		`BLOCK_JOB_COMPLETED {"device": "b1", "len": 4194304, "offset": 4194304, "speed": 0, "type": "backup"}`,
		"concluded", "null")
	if n := len(m.QueryBlock()); n != 0 {
		t.Fatalf("%d jobs left", n)
	}
	wantErr(t, m.BlockDismiss("b1"), "Block job 'b1' not found")
}

func TestBlockJobManualFinalize(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	startCopy(t, m, "b4", &copyBody{chunks: 2, size: 1 << 20}, BlockOptions{Options: Options{ManualFinalize: true}})
	e.waitFor(t, "b4", "BLOCK_JOB_PENDING")
	in := queryOne(t, m, "b4")
	if in.Status != Pending || in.Busy || in.Paused || in.Ready || in.AutoFinalize || !in.AutoDismiss || in.Offset != 2<<20 {
		t.Fatalf("%+v", in)
	}
	wantErr(t, m.BlockComplete("b4"), "Job 'b4' in state 'pending' cannot accept command verb 'complete'")
	wantErr(t, m.BlockSetSpeed("b4", 10), "Job 'b4' in state 'pending' cannot accept command verb 'set-speed'")
	wantErr(t, m.BlockDismiss("b4"), "Job 'b4' in state 'pending' cannot accept command verb 'dismiss'")
	if err := m.BlockFinalize("b4"); err != nil {
		t.Fatal(err)
	}
	e.check(t, "b4", "created", "running", "waiting", "pending",
		`BLOCK_JOB_PENDING {"type": "backup", "id": "b4"}`,
		`BLOCK_JOB_COMPLETED {"device": "b4", "len": 2097152, "offset": 2097152, "speed": 0, "type": "backup"}`,
		"concluded", "null")
}

func TestBlockJobManualDismiss(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	startCopy(t, m, "c", &copyBody{chunks: 1, size: 512}, BlockOptions{Options: Options{ManualDismiss: true}})
	e.waitFor(t, "c", "concluded")
	in := queryOne(t, m, "c")
	if in.Status != Concluded || !in.AutoFinalize || in.AutoDismiss || in.Error != "" {
		t.Fatalf("%+v", in)
	}
	wantErr(t, m.BlockFinalize("c"), "Job 'c' in state 'concluded' cannot accept command verb 'finalize'")
	wantErr(t, m.BlockCancel("c", false), "Job 'c' in state 'concluded' cannot accept command verb 'cancel'")
	if err := m.BlockDismiss("c"); err != nil {
		t.Fatal(err)
	}
	e.check(t, "c", "created", "running", "waiting", "pending",
		`BLOCK_JOB_COMPLETED {"device": "c", "len": 512, "offset": 512, "speed": 0, "type": "backup"}`,
		"concluded", "null")
}

func TestBlockJobReadyComplete(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	mb := &mirrorBody{}
	if _, err := m.StartBlock(mb.driver(), BlockOptions{ID: "m1"}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m1", "BLOCK_JOB_READY")
	in := queryOne(t, m, "m1")
	if in.Status != Ready || !in.Ready || in.Paused {
		t.Fatalf("%+v", in)
	}
	wantErr(t, m.BlockFinalize("m1"), "Job 'm1' in state 'ready' cannot accept command verb 'finalize'")
	if err := m.BlockComplete("m1"); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m1", "null")
	e.check(t, "m1", "created", "running", "ready",
		`BLOCK_JOB_READY {"device": "m1", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"waiting", "pending",
		`BLOCK_JOB_COMPLETED {"device": "m1", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"concluded", "null")
	if !mb.pivoted {
		t.Fatal("prepare did not see the completion")
	}
}

// block-job-cancel on a ready mirror completes it without pivoting; with
// force it is cancelled.
func TestBlockJobCancelReady(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	soft := &mirrorBody{}
	m.StartBlock(soft.driver(), BlockOptions{ID: "m2"})
	e.waitFor(t, "m2", "BLOCK_JOB_READY")
	if err := m.BlockCancel("m2", false); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m2", "null")
	e.check(t, "m2", "created", "running", "ready",
		`BLOCK_JOB_READY {"device": "m2", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"waiting", "pending",
		`BLOCK_JOB_COMPLETED {"device": "m2", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"concluded", "null")
	if soft.pivoted {
		t.Fatal("a soft cancel pivoted")
	}

	hard := &mirrorBody{}
	m.StartBlock(hard.driver(), BlockOptions{ID: "m3", Options: Options{ManualDismiss: true}})
	e.waitFor(t, "m3", "BLOCK_JOB_READY")
	if err := m.BlockCancel("m3", true); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m3", "concluded")
	e.check(t, "m3", "created", "running", "ready",
		`BLOCK_JOB_READY {"device": "m3", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"aborting",
		`BLOCK_JOB_CANCELLED {"device": "m3", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"concluded")
	if in := queryOne(t, m, "m3"); in.Error != "Operation canceled" || in.Ready || in.Status != Concluded {
		t.Fatalf("%+v", in)
	}
	if got := m.Query(); len(got) != 1 || got[0].Error != "Operation canceled" || got[0].Type != "mirror" {
		t.Fatalf("query-jobs: %+v", got)
	}
	if err := m.BlockDismiss("m3"); err != nil {
		t.Fatal(err)
	}
}

// A user pause of a ready job is "standby"; a paused job refuses a soft
// cancel; the pause count is one for the user and one per internal pause.
func TestBlockJobPauseStandby(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	mb := &mirrorBody{}
	b, _ := m.StartBlock(mb.driver(), BlockOptions{ID: "m4", Options: Options{ManualFinalize: true, ManualDismiss: true}})
	e.waitFor(t, "m4", "BLOCK_JOB_READY")
	if err := m.BlockPause("m4"); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m4", "standby")
	if in := queryOne(t, m, "m4"); !in.Paused || !in.Ready || in.Busy || in.Status != Standby {
		t.Fatalf("%+v", in)
	}
	wantErr(t, m.BlockPause("m4"), "Job is already paused")
	wantErr(t, m.BlockCancel("m4", false), "The block job for device 'm4' is currently paused")
	b.Pause() // an internal pause (a drained section) on top of the user's
	if err := m.BlockResume("m4"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, m.BlockResume("m4"), "Can't resume a job that was not paused")
	time.Sleep(20 * time.Millisecond)
	if in := queryOne(t, m, "m4"); !in.Paused || in.Status != Standby {
		t.Fatalf("resumed with an internal pause left: %+v", in)
	}
	b.Resume()
	waitStatus(t, m, "m4", Ready)
	if err := m.BlockComplete("m4"); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "m4", "BLOCK_JOB_PENDING")
	if err := m.BlockFinalize("m4"); err != nil {
		t.Fatal(err)
	}
	if err := m.BlockDismiss("m4"); err != nil {
		t.Fatal(err)
	}
	e.check(t, "m4", "created", "running", "ready",
		`BLOCK_JOB_READY {"device": "m4", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"standby", "ready", "waiting", "pending",
		`BLOCK_JOB_PENDING {"type": "mirror", "id": "m4"}`,
		`BLOCK_JOB_COMPLETED {"device": "m4", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}`,
		"concluded", "null")
}

func waitStatus(t *testing.T, m *Manager, id string, st Status) BlockJobInfo {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		in := queryOne(t, m, id)
		if in.Status == st {
			return in
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: status %s, want %s", id, in.Status, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// slow returns a copy job that runs until cancelled: 64 KiB chunks at
// 1 MiB/s.
func slow() *copyBody { return &copyBody{chunks: 1 << 20, size: 64 << 10} }

func TestBlockJobCancel(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)

	// Running.
	startCopy(t, m, "r", slow(), BlockOptions{Speed: 1 << 20})
	if err := m.BlockCancel("r", false); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "r", "null")
	ev := e.of("r")
	e.check(t, "r", "created", "running", "aborting", ev[3], "concluded", "null")
	if !strings.HasPrefix(ev[3], `BLOCK_JOB_CANCELLED {"device": "r", "len": 68719476736, "offset": `) ||
		!strings.HasSuffix(ev[3], `, "speed": 1048576, "type": "backup"}`) {
		t.Fatalf("cancelled event: %s", ev[3])
	}

	// Paused by the user: only a forced cancel, which resumes it first.
	startCopy(t, m, "p", slow(), BlockOptions{Speed: 1 << 20, Options: Options{ManualDismiss: true}})
	if err := m.BlockPause("p"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, m, "p", Paused)
	wantErr(t, m.BlockCancel("p", false), "The block job for device 'p' is currently paused")
	if err := m.BlockCancel("p", true); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "p", "concluded")
	ev = e.of("p")
	e.check(t, "p", "created", "running", "paused", "running", "aborting", ev[5], "concluded")
	if in := queryOne(t, m, "p"); in.Paused || in.Error != "Operation canceled" {
		t.Fatalf("%+v", in)
	}

	// Pending (auto-finalize off): aborts at once.
	startCopy(t, m, "d", &copyBody{chunks: 1, size: 4096}, BlockOptions{Options: Options{ManualFinalize: true}})
	e.waitFor(t, "d", "BLOCK_JOB_PENDING")
	if err := m.BlockCancel("d", false); err != nil {
		t.Fatal(err)
	}
	e.check(t, "d", "created", "running", "waiting", "pending",
		`BLOCK_JOB_PENDING {"type": "backup", "id": "d"}`, "aborting",
		`BLOCK_JOB_CANCELLED {"device": "d", "len": 4096, "offset": 4096, "speed": 0, "type": "backup"}`,
		"concluded", "null")

	// job-cancel works on block jobs, and always forces.
	mb := &mirrorBody{}
	m.StartBlock(mb.driver(), BlockOptions{ID: "j"})
	e.waitFor(t, "j", "BLOCK_JOB_READY")
	if err := m.Cancel("j"); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "j", "null")
	if ev := e.of("j"); !strings.HasPrefix(ev[len(ev)-3], "BLOCK_JOB_CANCELLED") {
		t.Fatalf("%q", ev)
	}
}

// Errors: block-job-* find only block jobs, with QEMU's class and text.
func TestBlockJobErrors(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	m.Start("c1", "create", func(context.Context) error { return nil })
	for name, err := range map[string]error{
		"set-speed": m.BlockSetSpeed("c1", 1),
		"cancel":    m.BlockCancel("nosuch", true),
		"pause":     m.BlockPause("nosuch"),
		"resume":    m.BlockResume("c1"),
		"complete":  m.BlockComplete("nosuch"),
		"finalize":  m.BlockFinalize("c1"),
		"dismiss":   m.BlockDismiss("nosuch"),
	} {
		var qe *qmp.Error
		if !errors.As(err, &qe) || qe.Class != qmp.DeviceNotActive || !strings.HasPrefix(qe.Desc, "Block job '") || !strings.HasSuffix(qe.Desc, "' not found") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if got := m.QueryBlock(); got == nil || len(got) != 0 {
		t.Fatalf("query-block-jobs lists a create job: %#v", got)
	}

	// A negative speed fails after creation: created, then null.
	if _, err := m.StartBlock(&BlockDriver{Type: "stream", Run: slow().run}, BlockOptions{ID: "s", Speed: -1}); err == nil || err.Error() != "Parameter 'speed' expects a non-negative value" {
		t.Fatalf("speed -1: %v", err)
	}
	e.check(t, "s", "created", "null")
	startCopy(t, m, "s", slow(), BlockOptions{Options: Options{ManualDismiss: true}})
	wantErr(t, m.BlockSetSpeed("s", -1), "Parameter 'speed' expects a non-negative value")
	wantErr(t, m.BlockComplete("s"), "Job 's' in state 'running' cannot accept command verb 'complete'")
	if _, err := m.StartBlock(&BlockDriver{Type: "stream", Run: slow().run}, BlockOptions{ID: "s"}); err == nil || err.Error() != "Job ID 's' already in use" {
		t.Fatalf("duplicate: %v", err)
	}
	m.Close()
	if in := queryOne(t, m, "s"); in.Status != Concluded || in.Error != "Operation canceled" {
		t.Fatalf("after Close: %+v", in)
	}
}

// A ready job without a completion step cannot be completed.
func TestBlockJobNoComplete(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	m.StartBlock(&BlockDriver{Type: "commit", Run: func(ctx context.Context, b *BlockJob) error {
		b.TransitionToReady()
		for !b.IsCancelled() {
			b.Yield()
		}
		return nil
	}}, BlockOptions{ID: "k"})
	e.waitFor(t, "k", "BLOCK_JOB_READY")
	wantErr(t, m.BlockComplete("k"), "The active block job 'k' cannot be completed")
	wantErr(t, m.Complete("k"), "The active block job 'k' cannot be completed")
	m.Close()
}

func TestBlockJobErrorPolicies(t *testing.T) {
	eio := errors.New("Input/output error")
	enospc := fmt.Errorf("write: %w", syscall.ENOSPC)
	for _, tc := range []struct {
		policy OnError
		err    error
		action ErrorAction
		io     IOStatus
	}{
		{OnErrorStop, eio, ActionStop, IOStatusFailed},
		{OnErrorEnospc, enospc, ActionStop, IOStatusNoSpace},
		{OnErrorAuto, enospc, ActionStop, IOStatusNoSpace},
		{OnErrorEnospc, eio, ActionReport, ""},
		{OnErrorReport, enospc, ActionReport, ""},
		{OnErrorIgnore, eio, ActionIgnore, ""},
	} {
		t.Run(string(tc.policy)+"-"+string(tc.action), func(t *testing.T) {
			e := newEvents()
			m := NewManager(e.emit)
			var once sync.Once
			c := &copyBody{chunks: 4, size: 1 << 20, policy: tc.policy, fail: func(i int64) (err error) {
				if i == 3 {
					once.Do(func() { err = tc.err })
				}
				return err
			}}
			startCopy(t, m, "j", c, BlockOptions{Options: Options{ManualDismiss: true}})
			errEv := `BLOCK_JOB_ERROR {"device": "j", "operation": "read", "action": "` + string(tc.action) + `"}`
			done := `BLOCK_JOB_COMPLETED {"device": "j", "len": 4194304, "offset": 4194304, "speed": 0, "type": "backup"}`
			switch tc.action {
			case ActionStop:
				e.waitFor(t, "j", "paused")
				in := queryOne(t, m, "j")
				if in.IOStatus != tc.io || !in.Paused || in.Status != Paused || in.Offset != 3<<20 {
					t.Fatalf("%+v", in)
				}
				wantErr(t, m.BlockCancel("j", false), "The block job for device 'j' is currently paused")
				if err := m.Resume("j"); err != nil { // job-resume retries too
					t.Fatal(err)
				}
				e.waitFor(t, "j", "concluded")
				e.check(t, "j", "created", "running", errEv, "paused", "running", "waiting", "pending", done, "concluded")
				if in := queryOne(t, m, "j"); in.IOStatus != IOStatusOK || in.Error != "" {
					t.Fatalf("%+v", in)
				}
			case ActionReport:
				e.waitFor(t, "j", "concluded")
				e.check(t, "j", "created", "running", errEv, "aborting",
					`BLOCK_JOB_COMPLETED {"device": "j", "len": 4194304, "offset": 3145728, "speed": 0, "type": "backup", "error": "`+tc.err.Error()+`"}`,
					"concluded")
				if in := queryOne(t, m, "j"); in.IOStatus != IOStatusOK || in.Error != tc.err.Error() {
					t.Fatalf("%+v", in)
				}
			case ActionIgnore:
				e.waitFor(t, "j", "concluded")
				e.check(t, "j", "created", "running", errEv, "waiting", "pending", done, "concluded")
			}
		})
	}
}

// set-speed on a running job changes the limit; a job limited to 4 MiB/s
// copies about that much per second. The bounds are loose: only a limiter
// that does not limit, or stalls, fails them.
func TestBlockJobRateLimit(t *testing.T) {
	e := newEvents()
	m := NewManager(e.emit)
	const speed = 4 << 20
	startCopy(t, m, "r", slow(), BlockOptions{Speed: 1})
	time.Sleep(50 * time.Millisecond)
	if in := queryOne(t, m, "r"); in.Offset > 64<<10 || in.Speed != 1 {
		t.Fatalf("1 B/s copied %d bytes: %+v", in.Offset, in)
	}
	if err := m.BlockSetSpeed("r", speed); err != nil { // wakes the sleeping job
		t.Fatal(err)
	}
	start := time.Now()
	off0 := queryOne(t, m, "r").Offset
	time.Sleep(500 * time.Millisecond)
	in := queryOne(t, m, "r")
	elapsed := time.Since(start).Seconds()
	rate := float64(in.Offset-off0) / elapsed
	if rate > 1.5*speed || rate < 0.25*speed {
		t.Fatalf("%.0f bytes/s at speed %d", rate, speed)
	}
	if in.Speed != speed {
		t.Fatalf("%+v", in)
	}
	// Unlimited: far faster than the limit.
	if err := m.BlockSetSpeed("r", 0); err != nil {
		t.Fatal(err)
	}
	off0 = queryOne(t, m, "r").Offset
	time.Sleep(100 * time.Millisecond)
	if n := queryOne(t, m, "r").Offset - off0; n < speed {
		t.Fatalf("unlimited: %d bytes in 100 ms", n)
	}
	m.Close()
}

// QEMU's ratelimit_calculate_delay, on a fake clock.
func TestRateLimitSlices(t *testing.T) {
	now := time.Unix(1000, 0)
	r := newRateLimit()
	r.now = func() time.Time { return now }
	if d := r.delay(1 << 30); d != 0 {
		t.Fatalf("no limit: %v", d)
	}
	r.setSpeed(10<<20, SliceTime) // 1 MiB per 100 ms slice
	if r.quota != 1<<20 {
		t.Fatalf("quota %d", r.quota)
	}
	if d := r.delay(512 << 10); d != 0 {
		t.Fatalf("half the quota: %v", d)
	}
	if d := r.delay(512 << 10); d != 100*time.Millisecond {
		t.Fatalf("quota reached: %v", d)
	}
	now = now.Add(30 * time.Millisecond)
	if d := r.delay(1 << 20); d != 170*time.Millisecond { // two slices' worth: the slice is extended
		t.Fatalf("over quota: %v", d)
	}
	now = now.Add(171 * time.Millisecond)
	if d := r.delay(4096); d != 0 {
		t.Fatalf("new slice: %v", d)
	}
	r.setSpeed(1, SliceTime) // below one unit per slice: quota 1
	if r.quota != 1 {
		t.Fatalf("quota %d", r.quota)
	}
}
