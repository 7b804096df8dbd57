// Package null is the null-co driver: a device that reads zeroes (or
// leaves buffers untouched) and discards writes, for benchmarks.
package null

import (
	"context"
	"errors"
	"time"

	"blockd/graph"
	"blockd/internal/qapi"
)

// Options is BlockdevOptionsNull.
type Options struct {
	Size       *int64 `json:"size,omitempty"`
	LatencyNS  *int64 `json:"latency-ns,omitempty"`
	ReadZeroes *bool  `json:"read-zeroes,omitempty"`
}

// Driver returns the null-co driver.
func Driver() *graph.Driver {
	return &graph.Driver{Name: "null-co", Options: func() any { return new(Options) }, Open: open, Protocol: true}
}

type node struct {
	strong     qapi.Object // size and read-zeroes, when given
	size       int64
	latency    time.Duration
	readZeroes bool
}

// The optional capabilities of graph/node.go. Left out on purpose: Discarder and Cacher (there is nothing to free or prefetch), Limiter (byte-granular), Resizer and PreallocResizer (the size is fixed by the options, as in QEMU), PermSetter, Amender and ExplicitBackinger (no file, metadata or backing).
var (
	_ graph.Zeroer         = (*node)(nil)
	_ graph.BlockStatuser  = (*node)(nil)
	_ graph.Infoer         = (*node)(nil)
	_ graph.StrongOptioner = (*node)(nil)
)

func open(_ context.Context, _ *graph.Opener, v any) (graph.Node, error) {
	o := v.(*Options)
	n := &node{size: 1 << 30}
	if o.Size != nil {
		n.size = *o.Size
		n.strong = append(n.strong, qapi.Member{Name: "size", Value: n.size})
	}
	if o.LatencyNS != nil {
		if *o.LatencyNS < 0 {
			return nil, errors.New("latency-ns is invalid")
		}
		n.latency = time.Duration(*o.LatencyNS)
	}
	if o.ReadZeroes != nil {
		n.readZeroes = *o.ReadZeroes
		n.strong = append(n.strong, qapi.Member{Name: "read-zeroes", Value: n.readZeroes})
	}
	return n, nil
}

func (n *node) wait(ctx context.Context) error {
	if n.latency == 0 {
		return nil
	}
	t := time.NewTimer(n.latency)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *node) ReadAt(ctx context.Context, p []byte, _ int64) error {
	if n.readZeroes {
		clear(p)
	}
	return n.wait(ctx)
}

func (n *node) WriteAt(ctx context.Context, _ []byte, _ int64, _ graph.ReqFlags) error {
	return n.wait(ctx)
}

func (n *node) WriteZeroes(ctx context.Context, _, _ int64, _ graph.ReqFlags) error {
	return n.wait(ctx)
}

func (n *node) BlockStatus(_ context.Context, _, l int64) ([]graph.Extent, error) {
	if n.readZeroes {
		return []graph.Extent{{Length: l, Flags: graph.ExtentZero}}, nil
	}
	return []graph.Extent{{Length: l}}, nil
}

func (n *node) Size() int64                 { return n.size }
func (n *node) Flush(context.Context) error { return nil }
func (n *node) Close() error                { return nil }

// Info names the node null-co:// unless options that change its contents
// were given, as QEMU's null_refresh_filename does.
func (n *node) Info() graph.ImageInfo {
	if len(n.strong) > 0 {
		return graph.ImageInfo{ActualSize: 0}
	}
	return graph.ImageInfo{Filename: "null-co://", ActualSize: 0}
}

// StrongOptions reports size and read-zeroes when they were given.
func (n *node) StrongOptions() qapi.Object { return n.strong }
