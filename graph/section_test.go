package graph_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"syscall"
	"testing"

	"blockd/graph"
)

// sectionChild returns a writable, resizable edge to a 100-byte in-memory
// node holding the bytes 0, 1, ..., 99.
func sectionChild(t *testing.T) *graph.Child {
	t.Helper()
	g := newGraph(t)
	if _, err := g.Add(context.Background(), tree(t, `{"driver":"mem","node-name":"m","size":100}`), false); err != nil {
		t.Fatal(err)
	}
	c, err := g.NewBackend("m", "test", graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.ReleaseBackend(c); g.Close() })
	p := make([]byte, 100)
	for i := range p {
		p[i] = byte(i)
	}
	if err := c.WriteAt(context.Background(), p, 0, 0); err != nil {
		t.Fatal(err)
	}
	return c
}

// seq is want's bytes: from, from+1, ..., from+n-1.
func seq(from, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(from + i)
	}
	return b
}

func TestSectionIORead(t *testing.T) {
	c := sectionChild(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		off, n   int64 // the section
		at, len  int64 // the request
		want     []byte
		wantErr  error
		wantSize int64
	}{
		{"inside", 10, 20, 5, 10, seq(15, 10), nil, 20},
		{"up to the end", 10, 20, 10, 10, seq(20, 10), nil, 20},
		{"short at the section end", 10, 20, 15, 10, seq(25, 5), io.EOF, 20},
		{"at the section end", 10, 20, 20, 1, nil, io.EOF, 20},
		{"past the section end", 10, 20, 25, 1, nil, io.EOF, 20},
		{"empty at the end", 10, 20, 20, 0, nil, io.EOF, 20},
		{"empty inside", 10, 20, 3, 0, []byte{}, nil, 20},
		{"negative offset", 10, 20, -1, 4, nil, io.EOF, 20},
		{"section past the child end", 90, 20, 5, 10, seq(95, 5), io.EOF, 20},
		{"section wholly past the child", 120, 20, 0, 1, nil, io.EOF, 20},
		{"open section", 40, -1, 50, 20, seq(90, 10), io.EOF, 60},
		{"open section inside", 40, -1, 0, 60, seq(40, 60), nil, 60},
		{"open section at the end", 40, -1, 60, 1, nil, io.EOF, 60},
		{"open section past the child", 200, -1, 0, 1, nil, io.EOF, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := graph.NewSectionIO(ctx, c, tc.off, tc.n)
			if s.Size() != tc.wantSize {
				t.Errorf("Size = %d, want %d", s.Size(), tc.wantSize)
			}
			p := bytes.Repeat([]byte{0xff}, int(tc.len))
			n, err := s.ReadAt(p, tc.at)
			if err != tc.wantErr {
				t.Fatalf("ReadAt(%d, %d) error = %v, want %v", tc.len, tc.at, err, tc.wantErr)
			}
			if n != len(tc.want) || !bytes.Equal(p[:n], tc.want) {
				t.Fatalf("ReadAt(%d, %d) = %d bytes %v, want %v", tc.len, tc.at, n, p[:n], tc.want)
			}
		})
	}
}

func TestSectionIOWrite(t *testing.T) {
	ctx := context.Background()
	t.Run("inside", func(t *testing.T) {
		c := sectionChild(t)
		s := graph.NewSectionIO(ctx, c, 10, 20)
		if n, err := s.WriteAt([]byte{0xaa, 0xbb}, 18); n != 2 || err != nil {
			t.Fatalf("WriteAt = %d, %v", n, err)
		}
		got := make([]byte, 4)
		if err := c.ReadAt(ctx, got, 27); err != nil || !bytes.Equal(got, []byte{27, 0xaa, 0xbb, 30}) {
			t.Fatalf("child bytes 27..30 = %v, %v", got, err)
		}
	})
	for _, tc := range []struct {
		name    string
		off, n  int64
		at, len int64
	}{
		{"past the section end", 10, 20, 15, 10},
		{"at the section end", 10, 20, 20, 1},
		{"offset overflows", 10, 20, 1<<63 - 1, 2},
		{"negative offset", 10, 20, -1, 2},
		{"open section, negative offset", 10, -1, -1, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := sectionChild(t)
			s := graph.NewSectionIO(ctx, c, tc.off, tc.n)
			n, err := s.WriteAt(make([]byte, tc.len), tc.at)
			if n != 0 || !errors.Is(err, graph.ErrRange) {
				t.Fatalf("WriteAt = %d, %v, want 0 and ErrRange", n, err)
			}
			if c.Size() != 100 {
				t.Fatalf("child size %d after a refused write", c.Size())
			}
			got := make([]byte, 100)
			if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, seq(0, 100)) {
				t.Fatalf("a refused write changed the child: %v", err)
			}
		})
	}
	t.Run("grows the child", func(t *testing.T) {
		for _, n := range []int64{-1, 40} {
			c := sectionChild(t)
			s := graph.NewSectionIO(ctx, c, 90, n)
			if k, err := s.WriteAt([]byte{1, 2, 3}, 20); k != 3 || err != nil {
				t.Fatalf("n=%d: WriteAt = %d, %v", n, k, err)
			}
			if c.Size() != 113 {
				t.Fatalf("n=%d: child size %d, want 113", n, c.Size())
			}
			got := make([]byte, 14)
			if err := c.ReadAt(ctx, got, 99); err != nil || !bytes.Equal(got, []byte{99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3}) {
				t.Fatalf("n=%d: child bytes 99..112 = %v, %v", n, got, err)
			}
		}
	})
}

// faultyNode fails every request with EIO.
type faultyNode struct{ *graph.MemNode }

func (faultyNode) ReadAt(context.Context, []byte, int64) error { return syscall.EIO }

func (faultyNode) WriteAt(context.Context, []byte, int64, graph.ReqFlags) error {
	return syscall.EIO
}

func (faultyNode) Truncate(context.Context, int64) error { return syscall.ENOSPC }

// flagNode records the flags of its writes.
type flagNode struct {
	*graph.MemNode
	flags *graph.ReqFlags
}

func (m flagNode) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	*m.flags = f
	return m.MemNode.WriteAt(ctx, p, off, f)
}

func TestSectionIOErrorsAndFlags(t *testing.T) {
	ctx := context.Background()
	var flags graph.ReqFlags
	open := func(name string, wrap func(*graph.MemNode) graph.Node) *graph.Driver {
		return &graph.Driver{
			Name:     name,
			Protocol: true,
			Options:  func() any { return new(memOpts) },
			Open: func(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
				return wrap(graph.NewMemNode(v.(*memOpts).Size)), nil
			},
		}
	}
	g := graph.New(nil,
		open("faulty", func(m *graph.MemNode) graph.Node { return faultyNode{m} }),
		open("flags", func(m *graph.MemNode) graph.Node { return flagNode{m, &flags} }))
	t.Cleanup(g.Close)
	child := func(drv string) *graph.Child {
		if _, err := g.Add(ctx, map[string]any{"driver": drv, "node-name": drv, "size": json.Number("100")}, false); err != nil {
			t.Fatal(err)
		}
		c, err := g.NewBackend(drv, "test", graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermAll)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.ReleaseBackend(c) })
		return c
	}

	fc := child("faulty")
	s := graph.NewSectionIO(ctx, fc, 10, 20)
	for _, tc := range []struct {
		name string
		op   func() (int, error)
		want error
	}{
		{"read", func() (int, error) { return s.ReadAt(make([]byte, 4), 0) }, syscall.EIO},
		{"short read", func() (int, error) { return s.ReadAt(make([]byte, 40), 0) }, syscall.EIO},
		{"write", func() (int, error) { return s.WriteAt(make([]byte, 4), 0) }, syscall.EIO},
		{"growing write", func() (int, error) {
			return graph.NewSectionIO(ctx, fc, 90, -1).WriteAt(make([]byte, 20), 0)
		}, syscall.ENOSPC},
	} {
		n, err := tc.op()
		if n != 0 || !errors.Is(err, tc.want) {
			t.Errorf("%s: %d, %v, want 0 and %v", tc.name, n, err, tc.want)
		}
	}

	f := graph.NewSectionIO(ctx, child("flags"), 0, -1)
	if _, err := f.WriteAt([]byte{1}, 0); err != nil || flags != 0 {
		t.Fatalf("plain write: flags %v, %v", flags, err)
	}
	if _, err := f.WithFlags(graph.FUA).WriteAt([]byte{1}, 0); err != nil || flags != graph.FUA {
		t.Fatalf("WithFlags(FUA) write: flags %v, %v", flags, err)
	}
	if _, err := f.WriteAt([]byte{1}, 0); err != nil || flags != 0 {
		t.Fatalf("WithFlags changed its receiver: flags %v, %v", flags, err)
	}
}
