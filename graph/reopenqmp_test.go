package graph_test

import (
	"context"
	"testing"

	"blockd/graph"
)

// zlog is an rnode that also logs how writes reach it.
type zlog struct {
	*rnode
}

func (z *zlog) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	z.log.add("write %s", z.name)
	return z.rnode.WriteAt(ctx, p, off, f)
}

func (z *zlog) WriteZeroes(ctx context.Context, off, n int64, f graph.ReqFlags) error {
	z.log.add("zeroes %s unmap=%v", z.name, f&graph.MayUnmap != 0)
	return z.rnode.WriteZeroes(ctx, off, n, f)
}

// newReopenOptsGraph is newReopenGraph with "f" (rmem 1024) and "g"
// (rmem 4096) added by name, f's writes logged.
func newReopenOptsGraph(t *testing.T, log *reopenLog) *graph.Graph {
	g := newReopenGraph(t, log)
	zmem := &graph.Driver{
		Name: "zmem", Protocol: true,
		Options: func() any { return new(rmemOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			sz := v.(*rmemOpts).Size
			return &zlog{&rnode{MemNode: graph.NewMemNode(sz), name: "f", log: log, ro: o.ReadOnly()}}, nil
		},
	}
	g.Register(zmem)
	ctx := context.Background()
	for _, s := range []string{
		`{"driver":"zmem","node-name":"f","size":1024}`,
		`{"driver":"rmem","node-name":"g","size":4096}`,
	} {
		if _, err := g.Add(ctx, tree(t, s), false); err != nil {
			t.Fatal(err)
		}
	}
	log.take()
	return g
}

func reopenOpts(t *testing.T, g *graph.Graph, s string) error {
	t.Helper()
	return g.ReopenOptions(context.Background(), tree(t, s).([]any))
}

// TestReopenOptionsErrors: the checks of blockdev-reopen in QEMU's
// words, and that a refused reopen changes nothing and prepares nothing.
func TestReopenOptionsErrors(t *testing.T) {
	log := &reopenLog{}
	g := newReopenOptsGraph(t, log)
	for _, tc := range []struct{ opts, err string }{
		{`[{"driver":"zmem","size":1024}]`, "node-name not specified"},
		{`[{"driver":"zmem","node-name":"x","size":1024}]`, "Failed to find node with node-name='x'"},
		{`[{"driver":"zmem","node-name":"f","size":1024,"bogus":1}]`, "Parameter 'options[0].bogus' is unexpected"},
		{`[{"driver":"zmem","node-name":"f","size":2048}]`, "Cannot change the option 'size'"},
		{`[{"driver":"rmem","node-name":"f","size":1024}]`, "Cannot change the option 'driver'"},
		{`[{"driver":"rfmt","node-name":"f","file":"g"}]`, "Option 'size' cannot be reset to its default value"},
		{`[{"driver":"zmem","node-name":"f","size":1024,"cache":{"direct":true}}]`, "Cannot change the option 'cache.direct'"},
		{`[{"driver":"zmem","node-name":"f","size":1024,"force-share":true,"read-only":true}]`, "Cannot change the option 'force-share'"},
		{`[{"driver":"zmem","node-name":"f","size":1024,"detect-zeroes":"unmap"}]`, "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"},
		// The second element fails: the first is not even prepared.
		{`[{"driver":"zmem","node-name":"f","size":1024,"read-only":true},{"driver":"rmem","node-name":"g","size":1}]`, "Cannot change the option 'size'"},
	} {
		if err := reopenOpts(t, g, tc.opts); err == nil || err.Error() != tc.err {
			t.Errorf("%s: got %v, want %s", tc.opts, err, tc.err)
		}
		if got := log.take(); got != "" {
			t.Errorf("%s: steps %s", tc.opts, got)
		}
		if got := ro(g, "f", "g"); got != "f=false g=false" {
			t.Errorf("%s: flags %s", tc.opts, got)
		}
	}
}

// TestReopenOptionsAllOrNothing: when the second node of a reopen cannot
// change (a writer still uses it, or its driver fails), the first, already
// prepared, is aborted and stays writable; without the failure both
// change together.
func TestReopenOptionsAllOrNothing(t *testing.T) {
	log := &reopenLog{}
	g := newReopenOptsGraph(t, log)
	w, err := g.NewBackend("g", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	log.take()
	both := `[{"driver":"zmem","node-name":"f","size":1024,"read-only":true},{"driver":"rmem","node-name":"g","size":4096,"read-only":true}]`
	if err := reopenOpts(t, g, both); err == nil || err.Error() != "Read-only block node 'g' cannot support read-write users" {
		t.Fatalf("with a writer on g: %v", err)
	}
	if got, want := log.take(), "prepare f ro; prepare g ro; abort g; abort f"; got != want {
		t.Errorf("steps:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "f", "g"); got != "f=false g=false" {
		t.Errorf("flags after the failure: %s", got)
	}
	g.ReleaseBackend(w)
	log.take()
	log.fail = "g"
	if err := reopenOpts(t, g, both); err == nil || err.Error() != "injected reopen failure" {
		t.Fatalf("failing g: %v", err)
	}
	if got, want := log.take(), "prepare f ro; prepare g ro failed; abort f"; got != want {
		t.Errorf("steps:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "f", "g"); got != "f=false g=false" {
		t.Errorf("flags after the failure: %s", got)
	}
	log.fail = ""
	if err := reopenOpts(t, g, both); err != nil {
		t.Fatal(err)
	}
	if got, want := log.take(), "prepare f ro; prepare g ro; commit f; commit g"; got != want {
		t.Errorf("steps:\n got %s\nwant %s", got, want)
	}
	if got := ro(g, "f", "g"); got != "f=true g=true" {
		t.Errorf("flags: %s", got)
	}
	// Left out, read-only goes back to its default: writable.
	if err := reopenOpts(t, g, `[{"driver":"rmem","node-name":"g","size":4096}]`); err != nil {
		t.Fatal(err)
	}
	if got := ro(g, "f", "g"); got != "f=true g=false" {
		t.Errorf("flags: %s", got)
	}
}

// TestReopenOptionsDetectZeroes: detect-zeroes and discard given to a
// reopen are what the write path uses next, and leaving them out turns
// them off again.
func TestReopenOptionsDetectZeroes(t *testing.T) {
	ctx := context.Background()
	log := &reopenLog{}
	g := newReopenOptsGraph(t, log)
	w, err := g.NewBackend("f", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(w)
	zero := make([]byte, 512)
	for _, tc := range []struct{ opts, want string }{
		{`{"driver":"zmem","node-name":"f","size":1024}`, "write f"},
		{`{"driver":"zmem","node-name":"f","size":1024,"detect-zeroes":"on"}`, "zeroes f unmap=false"},
		{`{"driver":"zmem","node-name":"f","size":1024,"detect-zeroes":"unmap","discard":"unmap"}`, "zeroes f unmap=true"},
		{`{"driver":"zmem","node-name":"f","size":1024}`, "write f"},
	} {
		if err := reopenOpts(t, g, "["+tc.opts+"]"); err != nil {
			t.Fatal(err)
		}
		log.take()
		if err := w.WriteAt(ctx, zero, 0, graph.MayUnmap); err != nil {
			t.Fatal(err)
		}
		if got := log.take(); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.opts, got, tc.want)
		}
	}
}
