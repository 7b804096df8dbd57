package graph_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"blockd/graph"
)

// reopenLog records, in order, what the reopen test nodes were asked to
// do ("prepare f rw", "commit q ro", "abort f rw", "perm f write").
type reopenLog struct {
	mu    sync.Mutex
	lines []string
	// fail makes the prepare of the named node fail.
	fail string
}

func (l *reopenLog) add(format string, a ...any) {
	l.mu.Lock()
	l.lines = append(l.lines, fmt.Sprintf(format, a...))
	l.mu.Unlock()
}

func (l *reopenLog) take() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := strings.Join(l.lines, "; ")
	l.lines = nil
	return s
}

// rnode is a fault-injecting node for reopens: a MemNode that logs its
// reopen steps and permission changes and fails its prepare on demand.
type rnode struct {
	*graph.MemNode
	name string
	log  *reopenLog
	ro   bool // what the node believes, changed on commit only
}

func dir(ro bool) string {
	if ro {
		return "ro"
	}
	return "rw"
}

func (n *rnode) PrepareReopen(_ context.Context, readOnly bool) (commit, abort func(), err error) {
	if n.log.fail == n.name {
		n.log.add("prepare %s %s failed", n.name, dir(readOnly))
		return nil, nil, errors.New("injected reopen failure")
	}
	n.log.add("prepare %s %s", n.name, dir(readOnly))
	return func() { n.log.add("commit %s", n.name); n.ro = readOnly },
		func() { n.log.add("abort %s", n.name) }, nil
}

func (n *rnode) SetPerm(perm, shared graph.Perm) error {
	n.log.add("perm %s [%s]", n.name, perm)
	return nil
}

type rmemOpts struct {
	Size int64 `json:"size"`
}

type rfmtOpts struct {
	File    graph.Ref  `json:"file"`
	Backing *graph.Ref `json:"backing,omitempty"`
}

// newReopenGraph has "rmem", a protocol driver of rnodes named by their
// size (1024: "f", 2048: "b"...), and "rfmt", a format driver over a
// file child (data and metadata, so it writes its file when writable)
// with an optional backing child; rfmt nodes are named "q".
func newReopenGraph(t *testing.T, log *reopenLog) *graph.Graph {
	names := map[int64]string{1024: "f", 2048: "bf", 4096: "g"}
	rmem := &graph.Driver{
		Name: "rmem", Protocol: true,
		Options: func() any { return new(rmemOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			sz := v.(*rmemOpts).Size
			return &rnode{MemNode: graph.NewMemNode(sz), name: names[sz], log: log, ro: o.ReadOnly()}, nil
		},
	}
	rfmt := &graph.Driver{
		Name:    "rfmt",
		Options: func() any { return new(rfmtOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			opts := v.(*rfmtOpts)
			f, err := o.Child(ctx, "file", &opts.File, graph.ChildSpec{Role: graph.RoleData | graph.RoleMetadata | graph.RolePrimary})
			if err != nil {
				return nil, err
			}
			if opts.Backing != nil {
				if _, err := o.Child(ctx, "backing", opts.Backing, graph.ChildSpec{Role: graph.RoleCOW}); err != nil {
					return nil, err
				}
			}
			return &rnode{MemNode: graph.NewMemNode(f.Size()), name: "q", log: log, ro: o.ReadOnly()}, nil
		},
	}
	return graph.New(nil, rmem, rfmt)
}

func ro(g *graph.Graph, names ...string) string {
	var s []string
	for _, n := range names {
		s = append(s, fmt.Sprintf("%s=%v", n, g.Lookup(n).ReadOnly()))
	}
	return strings.Join(s, " ")
}

// TestReopenReadWrite: a read-only node and the file it opened inline
// become writable (file first, after the permissions to write are
// granted) and read-only again (format first, while still writable);
// a writer on the node blocks the read-only direction and leaves
// everything as it was.
func TestReopenReadWrite(t *testing.T) {
	ctx := context.Background()
	log := &reopenLog{}
	g := newReopenGraph(t, log)
	q, err := g.Add(ctx, tree(t, `{"driver":"rfmt","node-name":"q","read-only":true,
		"file":{"driver":"rmem","node-name":"f","size":1024}}`), false)
	if err != nil {
		t.Fatal(err)
	}
	log.take()
	if _, err := g.NewBackend("q", "", graph.PermRead|graph.PermWrite, graph.PermAll); err == nil || err.Error() != "Block node is read-only" {
		t.Fatalf("writer on a read-only node: %v", err)
	}
	log.take()
	if err := g.Reopen(ctx, q, false); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), "perm f [consistent read, write, resize]; prepare f rw; prepare q rw; commit f; commit q"; got != want {
		t.Errorf("to read-write:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "q", "f"); got != "q=false f=false" {
		t.Errorf("after reopen: %s", got)
	}
	w, err := g.NewBackend("q", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteAt(ctx, []byte("data"), 0, 0); err != nil {
		t.Fatal(err)
	}
	log.take()
	if err := g.Reopen(ctx, q, true); err == nil || err.Error() != "Block node is read-only" {
		t.Fatalf("read-only with a writer: %v", err)
	}
	if got, want := log.take(), "prepare q ro; prepare f ro; perm f [consistent read]; perm f [consistent read, write, resize]; abort f; abort q"; got != want {
		t.Errorf("refused read-only:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "q", "f"); got != "q=false f=false" {
		t.Errorf("after the refused reopen: %s", got)
	}
	if err := w.WriteAt(ctx, []byte("more"), 0, 0); err != nil {
		t.Fatalf("write after the refused reopen: %v", err)
	}
	g.ReleaseBackend(w)
	log.take()
	if err := g.Reopen(ctx, q, true); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), "prepare q ro; prepare f ro; perm f [consistent read]; commit q; commit f"; got != want {
		t.Errorf("to read-only:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "q", "f"); got != "q=true f=true" {
		t.Errorf("after reopen: %s", got)
	}
	// Already read-only: nothing to do.
	if err := g.Reopen(ctx, q, true); err != nil || log.take() != "" {
		t.Errorf("no-op reopen: %v %q", err, log.take())
	}
}

// TestReopenRollback injects a prepare failure in each node in each
// direction: the nodes prepared before are aborted in reverse order, the
// permissions go back, and the read-only flags are as they were.
func TestReopenRollback(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		startRO  bool
		fail     string
		log      string
		flagsNow string
	}{
		{"rw fails in format", true, "q",
			"perm f [consistent read, write, resize]; prepare f rw; prepare q rw failed; abort f; perm f [consistent read]",
			"q=true f=true"},
		{"rw fails in file", true, "f",
			"perm f [consistent read, write, resize]; prepare f rw failed; perm f [consistent read]",
			"q=true f=true"},
		{"ro fails in file", false, "f",
			"prepare q ro; prepare f ro failed; abort q",
			"q=false f=false"},
		{"ro fails in format", false, "q",
			"prepare q ro failed",
			"q=false f=false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := &reopenLog{}
			g := newReopenGraph(t, log)
			q, err := g.Add(ctx, tree(t, fmt.Sprintf(`{"driver":"rfmt","node-name":"q","read-only":%v,
				"file":{"driver":"rmem","node-name":"f","size":1024}}`, tc.startRO)), false)
			if err != nil {
				t.Fatal(err)
			}
			// A reader on q so that f's permissions show.
			if _, err := g.NewBackend("q", "", graph.PermRead, graph.PermAll); err != nil {
				t.Fatal(err)
			}
			log.take()
			log.fail = tc.fail
			if err := g.Reopen(ctx, q, !tc.startRO); err == nil || err.Error() != "injected reopen failure" {
				t.Fatalf("reopen: %v", err)
			}
			if got := log.take(); got != tc.log {
				t.Errorf("steps:\n got %s\nwant %s", got, tc.log)
			}
			if got := ro(g, "q", "f"); got != tc.flagsNow {
				t.Errorf("flags after the failure: %s, want %s", got, tc.flagsNow)
			}
			// The graph still works: the reopen succeeds once the fault
			// is gone.
			log.fail = ""
			if err := g.Reopen(ctx, q, !tc.startRO); err != nil {
				t.Fatal(err)
			}
			if q.ReadOnly() == tc.startRO {
				t.Error("second reopen did not change the node")
			}
		})
	}
}

// TestReopenFollowers: a backing child and a child whose options set
// read-only do not follow their parent; a child named by reference does
// not either.
func TestReopenFollowers(t *testing.T) {
	ctx := context.Background()
	log := &reopenLog{}
	g := newReopenGraph(t, log)
	if _, err := g.Add(ctx, tree(t, `{"driver":"rmem","node-name":"g","size":4096}`), false); err != nil {
		t.Fatal(err)
	}
	q, err := g.Add(ctx, tree(t, `{"driver":"rfmt","node-name":"q","read-only":true,
		"file":{"driver":"rmem","node-name":"f","size":1024},
		"backing":{"driver":"rmem","node-name":"bf","size":2048}}`), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reopen(ctx, q, false); err != nil {
		t.Fatal(err)
	}
	if got := ro(g, "q", "f", "bf"); got != "q=false f=false bf=true" {
		t.Errorf("backing followed: %s", got)
	}
	p, err := g.Add(ctx, tree(t, `{"driver":"rfmt","node-name":"p","read-only":false,"file":"g"}`), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reopen(ctx, p, true); err != nil {
		t.Fatal(err)
	}
	if got := ro(g, "p", "g"); got != "p=true g=false" {
		t.Errorf("referenced child followed: %s", got)
	}
	// An explicitly read-only file stays read-only; the parent then
	// cannot write it.
	r, err := g.Add(ctx, tree(t, `{"driver":"rfmt","node-name":"r","read-only":true,
		"file":{"driver":"rmem","node-name":"rf","size":1024,"read-only":true}}`), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reopen(ctx, r, false); err == nil || err.Error() != "Block node is read-only" {
		t.Fatalf("explicitly read-only file: %v", err)
	}
	if got := ro(g, "r", "rf"); got != "r=true rf=true" {
		t.Errorf("after the refused reopen: %s", got)
	}
}

// TestReopenDrains: a reopen waits for the requests in flight on the
// node, and writes after a read-only reopen fail.
func TestReopenDrains(t *testing.T) {
	ctx := context.Background()
	log := &reopenLog{}
	g := newReopenGraph(t, log)
	q, err := g.Add(ctx, tree(t, `{"driver":"rfmt","node-name":"q",
		"file":{"driver":"rmem","node-name":"f","size":1024}}`), false)
	if err != nil {
		t.Fatal(err)
	}
	w, err := g.NewBackend("q", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 512)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = w.ReadAt(ctx, buf, 0)
		}
	}()
	for i := 0; i < 50; i++ {
		// The writer blocks the read-only direction every time.
		if err := g.Reopen(ctx, q, true); err == nil {
			t.Fatal("read-only reopen with a writer succeeded")
		}
	}
	close(stop)
	wg.Wait()
	g.ReleaseBackend(w)
	r, err := g.NewBackend("q", "", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Reopen(ctx, q, true); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(ctx, []byte("x"), 0, 0); !errors.Is(err, graph.ErrReadOnly) {
		t.Errorf("write after read-only reopen: %v", err)
	}
}
