package job

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"
)

type recorder struct {
	mu  sync.Mutex
	evs []StatusChange
}

func (r *recorder) emit(name string, data any) {
	if name != "JOB_STATUS_CHANGE" {
		panic(name)
	}
	r.mu.Lock()
	r.evs = append(r.evs, data.(StatusChange))
	r.mu.Unlock()
}

func (r *recorder) statuses(id string) []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Status
	for _, e := range r.evs {
		if e.ID == id {
			out = append(out, e.Status)
		}
	}
	return out
}

func wait(t *testing.T, m *Manager, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.Wait(ctx, id); err != nil {
		t.Fatal(err)
	}
}

func TestLifecycle(t *testing.T) {
	var r recorder
	m := NewManager(r.emit)
	release := make(chan struct{})
	if err := m.Start("c1", "create", func(context.Context) error { <-release; return nil }); err != nil {
		t.Fatal(err)
	}
	if got := m.Query(); !reflect.DeepEqual(got, []Info{{ID: "c1", Type: "create", Status: Running, TotalProgress: 1}}) {
		t.Fatalf("running: %+v", got)
	}
	if err := m.Dismiss("c1"); err == nil || err.Error() != "Job 'c1' in state 'running' cannot accept command verb 'dismiss'" {
		t.Fatalf("dismiss running: %v", err)
	}
	if err := m.Start("c1", "create", nil); err == nil || err.Error() != "Job ID 'c1' already in use" {
		t.Fatalf("duplicate: %v", err)
	}
	close(release)
	wait(t, m, "c1")
	if got := m.Query(); !reflect.DeepEqual(got, []Info{{ID: "c1", Type: "create", Status: Concluded, CurrentProgress: 1, TotalProgress: 1}}) {
		t.Fatalf("concluded: %+v", got)
	}
	if err := m.Dismiss("c1"); err != nil {
		t.Fatal(err)
	}
	want := []Status{Created, Running, Waiting, Pending, Concluded, Null}
	if got := r.statuses("c1"); !reflect.DeepEqual(got, want) {
		t.Fatalf("events %v want %v", got, want)
	}
	if len(m.Query()) != 0 {
		t.Fatal("job not removed")
	}
	if err := m.Dismiss("c1"); err != ErrNotFound {
		t.Fatalf("dismiss twice: %v", err)
	}
}

func TestFailure(t *testing.T) {
	var r recorder
	m := NewManager(r.emit)
	m.Start("c2", "amend", func(context.Context) error { return errors.New("No secret with id 'nosuch'") })
	wait(t, m, "c2")
	got := m.Query()
	if len(got) != 1 || got[0].Error != "No secret with id 'nosuch'" || got[0].Status != Concluded || got[0].Type != "amend" {
		t.Fatalf("%+v", got)
	}
	if want := []Status{Created, Running, Aborting, Concluded}; !reflect.DeepEqual(r.statuses("c2"), want) {
		t.Fatalf("events %v", r.statuses("c2"))
	}
}

func TestCancel(t *testing.T) {
	var r recorder
	m := NewManager(r.emit)
	m.Start("c3", "create", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
	if err := m.Cancel("c3"); err != nil {
		t.Fatal(err)
	}
	wait(t, m, "c3")
	if got := m.Query(); got[0].Error != "Operation canceled" {
		t.Fatalf("%+v", got)
	}
	if err := m.Cancel("c3"); err == nil || err.Error() != "Job 'c3' in state 'concluded' cannot accept command verb 'cancel'" {
		t.Fatalf("cancel concluded: %v", err)
	}
	// A job that fails on its own after a cancel keeps its error.
	m.Start("c4", "create", func(ctx context.Context) error { <-ctx.Done(); return errors.New("disk on fire") })
	m.Cancel("c4")
	wait(t, m, "c4")
	if got := m.Query(); got[0].Error != "disk on fire" {
		t.Fatalf("%+v", got)
	}
}

func TestVerbs(t *testing.T) {
	m := NewManager(nil)
	m.Start("c1", "create", func(context.Context) error { return nil })
	wait(t, m, "c1")
	for _, tc := range []struct {
		fn   func(string) error
		want string
	}{
		{m.Cancel, "Job 'c1' in state 'concluded' cannot accept command verb 'cancel'"},
		{m.Pause, "Job 'c1' in state 'concluded' cannot accept command verb 'pause'"},
		{m.Resume, "Can't resume a job that was not paused"},
		{m.Complete, "Job 'c1' in state 'concluded' cannot accept command verb 'complete'"},
		{m.Finalize, "Job 'c1' in state 'concluded' cannot accept command verb 'finalize'"},
	} {
		if err := tc.fn("c1"); err == nil || err.Error() != tc.want {
			t.Errorf("got %v want %s", err, tc.want)
		}
		if err := tc.fn("nosuch"); err != ErrNotFound || err.Error() != "Job not found" {
			t.Errorf("unknown job: %v", err)
		}
	}
	for _, id := range []string{"", "1a", "a b", "#block1", "é"} {
		if err := m.Start(id, "create", nil); err == nil || err.Error() != "Invalid job ID '"+id+"'" {
			t.Errorf("%q: %v", id, err)
		}
	}
	if !ValidID("a-B.c_9") {
		t.Error("valid ID rejected")
	}
}

func TestPause(t *testing.T) {
	var r recorder
	m := NewManager(r.emit)
	step := make(chan struct{})
	m.Start("p", "create", func(ctx context.Context) error {
		step <- struct{}{} // started: past the entry pause point
		<-step
		if err := PausePoint(ctx); err != nil {
			return err
		}
		<-step
		return nil
	})
	<-step
	if err := m.Pause("p"); err != nil {
		t.Fatal(err)
	}
	if err := m.Pause("p"); err == nil || err.Error() != "Job is already paused" {
		t.Fatalf("pause twice: %v", err)
	}
	step <- struct{}{}
	for m.Query()[0].Status != Paused {
		time.Sleep(time.Millisecond)
	}
	if err := m.Resume("p"); err != nil {
		t.Fatal(err)
	}
	step <- struct{}{}
	wait(t, m, "p")
	want := []Status{Created, Running, Paused, Running, Waiting, Pending, Concluded}
	if got := r.statuses("p"); !reflect.DeepEqual(got, want) {
		t.Fatalf("events %v want %v", got, want)
	}
	// Cancelling a paused job wakes it up.
	m.Start("q", "create", func(ctx context.Context) error { return PausePoint(ctx) })
	m.Close() // cancels and waits; q may or may not have paused
	if got := m.Query()[0]; got.ID != "q" || got.Status != Concluded {
		t.Fatalf("%+v", got)
	}
}

func TestPauseThenCancel(t *testing.T) {
	m := NewManager(nil)
	step := make(chan struct{})
	m.Start("p", "create", func(ctx context.Context) error {
		step <- struct{}{}
		<-step
		return PausePoint(ctx)
	})
	<-step
	m.Pause("p")
	step <- struct{}{}
	for m.Query()[0].Status != Paused {
		time.Sleep(time.Millisecond)
	}
	if err := m.Cancel("p"); err != nil {
		t.Fatal(err)
	}
	wait(t, m, "p")
	if got := m.Query()[0]; got.Error != "Operation canceled" {
		t.Fatalf("%+v", got)
	}
}

func TestConcurrent(t *testing.T) {
	m := NewManager(func(string, any) {})
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			id := "j" + string(rune('a'+i%26)) + string(rune('a'+i/26))
			if err := m.Start(id, "create", func(context.Context) error { return nil }); err != nil {
				t.Error(err)
				return
			}
			m.Query()
			wait(t, m, id)
			if err := m.Dismiss(id); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if n := len(m.Query()); n != 0 {
		t.Fatalf("%d jobs left", n)
	}
}
