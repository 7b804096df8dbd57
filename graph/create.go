package graph

import (
	"blockd/internal/qapi"
	"context"
	"fmt"
)

// CreateContext is what a driver's Create gets (blockdev-create): access to
// existing nodes and secrets.
type CreateContext struct {
	g        *Graph
	backends []*Child
}

// NewCreateContext returns a context for one blockdev-create job.
func (g *Graph) NewCreateContext() *CreateContext { return &CreateContext{g: g} }

// Graph returns the graph.
func (c *CreateContext) Graph() *Graph { return c.g }

// Secret returns a copy of a secret's bytes; the caller wipes it.
func (c *CreateContext) Secret(id string) ([]byte, error) {
	if c.g.Secrets == nil {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return c.g.Secrets.Get(id)
}

// Open attaches to the existing node named by ref with write and resize
// permissions for the duration of the job. Inline definitions are not
// accepted for create (QEMU only takes references there).
func (c *CreateContext) Open(ref *Ref, role string) (*Child, error) {
	if ref == nil || (ref.Name == "" && ref.Inline == nil) {
		return nil, nil
	}
	if ref.Inline != nil {
		return nil, fmt.Errorf("an inline definition of '%s' is not supported here; add the node first and name it", role)
	}
	ch, err := c.g.NewBackend(ref.Name, "job", PermRead|PermWrite|PermResize, PermAll)
	if err != nil {
		return nil, err
	}
	c.backends = append(c.backends, ch)
	return ch, nil
}

// Release drops everything Open attached.
func (c *CreateContext) Release() {
	for _, ch := range c.backends {
		c.g.ReleaseBackend(ch)
	}
	c.backends = nil
}

// Create runs a driver's Create for a decoded BlockdevCreateOptions tree.
func (g *Graph) Create(ctx context.Context, v any) error {
	obj, ok := v.(map[string]any)
	if !ok {
		return fmt.Errorf("Invalid parameter type for 'options', expected: object")
	}
	drv, opts, err := g.DecodeCreateOptions(obj)
	if err != nil {
		return err
	}
	cc := g.NewCreateContext()
	defer cc.Release()
	return drv.Create(ctx, cc, opts)
}

// DecodeCreateOptions decodes BlockdevCreateOptions (the "options" member of
// blockdev-create): the driver and its CreateOptions.
func (g *Graph) DecodeCreateOptions(v any) (*Driver, any, error) {
	drv, opts, err := g.decodeDriverUnion(v, func(d *Driver) func() any { return d.CreateOptions })
	if err != nil {
		return nil, nil, err
	}
	if drv.Create == nil {
		return nil, nil, fmt.Errorf("Driver does not support blockdev-create")
	}
	return drv, opts, nil
}

// DecodeAmendOptions decodes BlockdevAmendOptions (the "options" member of
// x-blockdev-amend): the driver and its AmendOptions (nil when the driver
// has none).
func (g *Graph) DecodeAmendOptions(v any) (*Driver, any, error) {
	return g.decodeDriverUnion(v, func(d *Driver) func() any { return d.AmendOptions })
}

// decodeDriverUnion decodes a QAPI union keyed by "driver" at "options":
// the driver's branch is the struct its options function makes (only the
// driver member when that is nil).
func (g *Graph) decodeDriverUnion(v any, options func(*Driver) func() any) (*Driver, any, error) {
	const path = "options"
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, nil, fmt.Errorf("Invalid parameter type for '%s', expected: object", path)
	}
	dv, ok := obj["driver"]
	if !ok {
		return nil, nil, fmt.Errorf("Parameter '%s.driver' is missing", path)
	}
	ds, ok := dv.(string)
	if !ok {
		return nil, nil, fmt.Errorf("Invalid parameter type for '%s.driver', expected: string", path)
	}
	drv := g.driver(ds)
	if drv == nil {
		return nil, nil, fmt.Errorf("Parameter 'driver' does not accept value '%s'", ds)
	}
	var base struct {
		Driver string `json:"driver"`
	}
	targets := []any{&base}
	var opts any
	if mk := options(drv); mk != nil {
		opts = mk()
		targets = append(targets, opts)
	}
	d := &qapi.Decoder{Ctx: graphCtx{g}}
	if err := d.Decode(obj, path, targets...); err != nil {
		return nil, nil, err
	}
	return drv, opts, nil
}
