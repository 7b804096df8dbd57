package graph_test

import (
	"context"
	"sync"
	"testing"

	"blockd/graph"
)

// TestWriteThreshold: a write ending past the threshold raises
// BLOCK_WRITE_THRESHOLD once, with the amount past it, through a parent
// too, and the threshold goes back to 0; reads and writes below it raise
// nothing.
func TestWriteThreshold(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	var mu sync.Mutex
	var events []graph.WriteThresholdEvent
	g.Events = func(name string, data any) {
		if name == "BLOCK_WRITE_THRESHOLD" {
			mu.Lock()
			events = append(events, data.(graph.WriteThresholdEvent))
			mu.Unlock()
		}
	}
	if _, err := g.Add(ctx, tree(t, `{"driver":"raw","node-name":"r","file":{"driver":"mem","node-name":"m","size":65536}}`), false); err != nil {
		t.Fatal(err)
	}
	if err := g.SetWriteThreshold("nosuch", 1); err == nil || err.Error() != "Device 'nosuch' not found" {
		t.Fatalf("unknown node: %v", err)
	}
	if err := g.SetWriteThreshold("m", 8192); err != nil {
		t.Fatal(err)
	}
	c, err := g.NewBackend("r", "", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	defer g.ReleaseBackend(c)
	buf := make([]byte, 4096)
	if err := c.WriteAt(ctx, buf, 4096, 0); err != nil { // ends at 8192: not past
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, buf, 16384); err != nil {
		t.Fatal(err)
	}
	if len(events) != 0 {
		t.Fatalf("events below the threshold: %v", events)
	}
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.WriteAt(ctx, buf, 12288, 0); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := c.Discard(ctx, 32768, 4096); err != nil {
		t.Fatal(err)
	}
	want := graph.WriteThresholdEvent{NodeName: "m", AmountExceeded: 8192, WriteThreshold: 8192}
	if len(events) != 1 || events[0] != want {
		t.Fatalf("events %v, want one %v", events, want)
	}
	for _, n := range g.QueryNamedBlockNodes(true) {
		if n.WriteThreshold != 0 {
			t.Fatalf("%s: write_threshold %d after the event", n.NodeName, n.WriteThreshold)
		}
	}
}
