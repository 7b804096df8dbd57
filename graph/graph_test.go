package graph_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"blockd/drivers/raw"
	"blockd/graph"
)

// memOpts and memDriver give tests an in-memory protocol driver with a
// configurable alignment.
type memOpts struct {
	Size  int64 `json:"size"`
	Align int64 `json:"align,omitempty"`
}

type alignedMem struct {
	*graph.MemNode
	align int64
	t     *testing.T
}

func (m *alignedMem) Limits() graph.Limits { return graph.Limits{Align: m.align} }

func (m *alignedMem) ReadAt(ctx context.Context, p []byte, off int64) error {
	if m.align > 1 && (off%m.align != 0 || int64(len(p))%m.align != 0) {
		m.t.Errorf("unaligned read reached the driver: %d+%d", off, len(p))
	}
	return m.MemNode.ReadAt(ctx, p, off)
}

func (m *alignedMem) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	if m.align > 1 && (off%m.align != 0 || int64(len(p))%m.align != 0) {
		m.t.Errorf("unaligned write reached the driver: %d+%d", off, len(p))
	}
	return m.MemNode.WriteAt(ctx, p, off, f)
}

func newGraph(t *testing.T) *graph.Graph {
	mem := &graph.Driver{
		Name:     "mem",
		Protocol: true,
		Options:  func() any { return new(memOpts) },
		Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
			opts := v.(*memOpts)
			return &alignedMem{MemNode: graph.NewMemNode(opts.Size), align: opts.Align, t: t}, nil
		},
	}
	return graph.New(nil, mem, raw.Driver())
}

func tree(t *testing.T, s string) any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestAddErrors(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	if _, err := g.Add(ctx, tree(t, `{"driver":"mem","node-name":"m","size":4096}`), false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ in, err string }{
		{`{"driver":"mem","size":1}`, "'node-name' must be specified for the root node"},
		{`{"driver":"mem","node-name":"m","size":1}`, "Duplicate nodes with node-name='m'"},
		{`{"driver":"mem","node-name":"1m","size":1}`, "Invalid node-name: '1m'"},
		{`{"driver":"mem","node-name":"a234567890123456789012345678901234","size":1}`, "Node name too long"},
		{`{"driver":"nope","node-name":"x"}`, "Parameter 'driver' does not accept value 'nope'"},
		{`{"driver":"raw","node-name":"x"}`, "Parameter 'file' is missing"},
		{`{"driver":"raw","node-name":"x","file":"nosuch"}`, "Cannot find device='nosuch' nor node-name='nosuch'"},
		{`{"driver":"raw","node-name":"x","file":{"driver":"mem"}}`, "Parameter 'file.size' is missing"},
		{`{"driver":"raw","node-name":"x","file":{"driver":"mem","size":1,"bogus":1}}`, "Parameter 'file.bogus' is unexpected"},
		{`{"driver":"raw","node-name":"x","file":5}`, "Invalid parameter type for 'file', expected: BlockdevRef"},
		{`{"driver":"raw","node-name":"x","file":"m","size":1000}`, "Specified size is not multiple of 512"},
		{`{"driver":"raw","node-name":"x","file":"m","offset":8192}`, "Offset (8192) cannot be greater than size of the containing file (4096)"},
		{`{"driver":"raw","node-name":"x","file":{"driver":"mem","node-name":"m","size":1}}`, "Duplicate nodes with node-name='m'"},
	} {
		_, err := g.Add(ctx, tree(t, tc.in), false)
		if err == nil || err.Error() != tc.err {
			t.Errorf("%s: got %v, want %q", tc.in, err, tc.err)
		}
	}
	if n := len(g.Nodes()); n != 1 {
		t.Fatalf("failed adds left %d nodes", n)
	}
}

func TestOwnershipAndDel(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	must := func(s string) {
		t.Helper()
		if _, err := g.Add(ctx, tree(t, s), false); err != nil {
			t.Fatal(err)
		}
	}
	must(`{"driver":"mem","node-name":"m","size":4096}`)
	must(`{"driver":"raw","node-name":"r","file":"m"}`)
	must(`{"driver":"raw","node-name":"r2","file":{"driver":"mem","size":512}}`)
	must(`{"driver":"raw","node-name":"r3","file":{"driver":"mem","node-name":"inl","size":512}}`)
	nodes := g.Nodes()
	if nodes[0].Name() != "r3" || nodes[len(nodes)-1].Name() != "m" {
		t.Fatalf("not newest first: %v", names(nodes))
	}
	var auto string
	for _, b := range nodes {
		if b.AutoNamed() {
			auto = b.Name()
		}
	}
	if !strings.HasPrefix(auto, "#block0") || len(auto) != len("#block0")+2 {
		t.Fatalf("auto name %q", auto)
	}
	for _, tc := range []struct{ name, err string }{
		{"nosuch", "Failed to find node with node-name='nosuch'"},
		{"m", "Block device m is in use"},
		{auto, "Node " + auto + " is not owned by the monitor"},
		{"inl", "Node inl is not owned by the monitor"},
	} {
		if err := g.Del(tc.name); err == nil || err.Error() != tc.err {
			t.Errorf("del %s: %v, want %q", tc.name, err, tc.err)
		}
	}
	be, err := g.NewBackend("r2", "export 'e'", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Del("r2"); err == nil || err.Error() != "Node r2 is in use" {
		t.Fatalf("del with user: %v", err)
	}
	g.ReleaseBackend(be)
	for _, n := range []string{"r2", "r3", "r", "m"} {
		if err := g.Del(n); err != nil {
			t.Fatalf("del %s: %v", n, err)
		}
	}
	if n := len(g.Nodes()); n != 0 {
		t.Fatalf("%d nodes left: %v", n, names(g.Nodes()))
	}
}

func names(bs []*graph.BDS) []string {
	var out []string
	for _, b := range bs {
		out = append(out, b.Name())
	}
	return out
}

func TestPermissions(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	if _, err := g.Add(ctx, tree(t, `{"driver":"mem","node-name":"m","size":4096}`), false); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"ro","read-only":true,"file":{"driver":"mem","size":4096}}`), false); err != nil {
		t.Fatal(err)
	}
	if _, err := g.NewBackend("ro", "export 'w'", graph.PermRead|graph.PermWrite, graph.PermAll); err == nil || err.Error() != "Block node is read-only" {
		t.Fatalf("writer on read-only node: %v", err)
	}
	r, err := g.NewBackend("ro", "export 'r'", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(ctx, make([]byte, 512), 0, 0); !errors.Is(err, graph.ErrReadOnly) {
		t.Fatalf("write through reader: %v", err)
	}
	w1, err := g.NewBackend("m", "export 'a'", graph.PermRead|graph.PermWrite, graph.PermRead)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.NewBackend("m", "export 'b'", graph.PermRead|graph.PermWrite, graph.PermAll); err == nil || !strings.Contains(err.Error(), "Permission conflict on node 'm'") {
		t.Fatalf("second writer: %v", err)
	}
	g.ReleaseBackend(w1)
	w2, err := g.NewBackend("m", "export 'b'", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatalf("writer after release: %v", err)
	}
	g.ReleaseBackend(w2)
}

func TestValidationAndRMW(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	if _, err := g.Add(ctx, tree(t, `{"driver":"mem","node-name":"m","size":65536,"align":4096}`), false); err != nil {
		t.Fatal(err)
	}
	c, err := g.NewBackend("m", "test", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, make([]byte, 10), 65530); !errors.Is(err, graph.ErrRange) {
		t.Fatalf("read past end: %v", err)
	}
	if err := c.WriteAt(ctx, make([]byte, 1), -1, 0); !errors.Is(err, graph.ErrRange) {
		t.Fatalf("negative offset: %v", err)
	}
	ref := make([]byte, 65536)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			// Each writer owns a disjoint 8 KiB slice, so the result is
			// deterministic while RMW cycles on shared blocks race.
			base := int64(seed) * 8192
			for i := 0; i < 200; i++ {
				off := base + rng.Int64N(8000)
				n := 1 + rng.Int64N(base+8192-off)
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if rng.IntN(4) == 0 {
					clear(p)
					if err := c.WriteZeroes(ctx, off, n, 0); err != nil {
						t.Error(err)
						return
					}
				} else if err := c.WriteAt(ctx, p, off, 0); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				copy(ref[off:], p)
				mu.Unlock()
			}
		}(uint64(w))
	}
	wg.Wait()
	got := make([]byte, 65536)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		t.Fatal("content differs after concurrent unaligned writes")
	}
	small := make([]byte, 3)
	if err := c.ReadAt(ctx, small, 4095); err != nil || !bytes.Equal(small, ref[4095:4098]) {
		t.Fatalf("unaligned read: %v", err)
	}
}

func TestJSONFilename(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"r","offset":512,"size":1024,"file":{"driver":"mem","size":4096}}`), false); err != nil {
		t.Fatal(err)
	}
	got := g.Lookup("r").Filename()
	want := `json:{"offset": 512, "driver": "raw", "size": 1024, "file": {"driver": "mem"}}`
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

// TestInlineChildInherits checks QEMU's bdrv_inherited_options for a child
// defined inline: discard=unmap by default, cache and force-share from the
// parent, and the child's own settings kept.
func TestInlineChildInherits(t *testing.T) {
	g := newGraph(t)
	defer g.Close()
	ctx := context.Background()
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"top","read-only":true,"force-share":true,
		"cache":{"no-flush":true},"file":{"driver":"mem","node-name":"f","size":4096}}`), false); err != nil {
		t.Fatal(err)
	}
	f := g.Lookup("f").Options()
	if f.Discard != "unmap" || !f.NoFlush() || f.ForceShare == nil || !*f.ForceShare {
		t.Fatalf("inline child options: discard %q, no-flush %v, force-share %v", f.Discard, f.NoFlush(), f.ForceShare)
	}
	if top := g.Lookup("top").Options(); top.Discard != "" {
		t.Fatalf("the parent's discard changed to %q", top.Discard)
	}
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"top2","discard":"unmap",
		"file":{"driver":"mem","node-name":"f2","size":4096,"discard":"ignore","cache":{"no-flush":false}}}`), false); err != nil {
		t.Fatal(err)
	}
	if f2 := g.Lookup("f2").Options(); f2.Discard != "ignore" || f2.NoFlush() {
		t.Fatalf("the child's own options were overridden: discard %q, no-flush %v", f2.Discard, f2.NoFlush())
	}
}
