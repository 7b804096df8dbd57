package graph

import (
	"context"
	"fmt"

	"blockd/internal/qapi"
)

// DiscardMode is BlockdevOptions' discard member.
type DiscardMode string

func (DiscardMode) EnumValues() []string { return []string{"ignore", "unmap"} }

// DetectZeroes is BlockdevOptions' detect-zeroes member.
type DetectZeroes string

func (DetectZeroes) EnumValues() []string { return []string{"off", "on", "unmap"} }

// CacheOptions is BlockdevCacheOptions.
type CacheOptions struct {
	Direct  *bool `json:"direct,omitempty"`
	NoFlush *bool `json:"no-flush,omitempty"`
}

// Common holds the base members of BlockdevOptions, shared by every driver.
type Common struct {
	Driver       string        `json:"driver"`
	NodeName     string        `json:"node-name,omitempty"`
	Discard      DiscardMode   `json:"discard,omitempty"`
	Cache        *CacheOptions `json:"cache,omitempty"`
	ReadOnly     *bool         `json:"read-only,omitempty"`
	AutoReadOnly *bool         `json:"auto-read-only,omitempty"`
	ForceShare   *bool         `json:"force-share,omitempty"`
	DetectZeroes DetectZeroes  `json:"detect-zeroes,omitempty"`
}

// Direct reports cache.direct.
func (c *Common) Direct() bool { return c.Cache != nil && c.Cache.Direct != nil && *c.Cache.Direct }

// NoFlush reports cache.no-flush.
func (c *Common) NoFlush() bool { return c.Cache != nil && c.Cache.NoFlush != nil && *c.Cache.NoFlush }

// Driver describes a block driver. Drivers are registered explicitly with a
// Graph (see Register), so tests can build small registries.
type Driver struct {
	Name string
	// Options returns a pointer to a fresh driver options struct: the
	// members of BlockdevOptions' variant for this driver.
	Options func() any
	// Open opens a node. opts is the value Options returned, decoded.
	Open func(ctx context.Context, o *Opener, opts any) (Node, error)
	// Protocol drivers (file, null-co) report format "file"-like info and
	// name their node after their filename.
	Protocol bool
	// CreateOptions and Create implement blockdev-create for this driver
	// (both nil when it cannot create images).
	CreateOptions func() any
	Create        func(ctx context.Context, c *CreateContext, opts any) error
	// AmendOptions returns a fresh options struct for x-blockdev-amend;
	// nodes of drivers that set it implement Amender.
	AmendOptions func() any
}

// Amender is implemented by nodes whose metadata x-blockdev-amend can
// change (luks keyslots).
type Amender interface {
	Amend(ctx context.Context, opts any, force bool) error
}

// Opts is a decoded BlockdevOptions: the common members and the driver's.
type Opts struct {
	Common
	Driver *Driver
	Extra  any
	// Tree is the input the options were decoded from (for json: names).
	Tree map[string]any
}

// graphCtx is what Ref's Unmarshaler needs while decoding.
type graphCtx struct{ g *Graph }

// DecodeOptions decodes a BlockdevOptions tree (JSON or keyval) strictly,
// including inline children, with QEMU's error texts.
func (g *Graph) DecodeOptions(v any, keyval bool) (*Opts, error) {
	d := &qapi.Decoder{Keyval: keyval, Ctx: graphCtx{g}}
	return g.decodeOptions(d, v, "")
}

func (g *Graph) decodeOptions(d *qapi.Decoder, v any, path string) (*Opts, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: object", path)}
	}
	name := "driver"
	if path != "" {
		name = path + ".driver"
	}
	dv, ok := obj["driver"]
	if !ok {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Parameter '%s' is missing", name)}
	}
	ds, ok := dv.(string)
	if !ok {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: string", name)}
	}
	drv := g.driver(ds)
	if drv == nil {
		return nil, &qapi.Error{Msg: fmt.Sprintf("Parameter 'driver' does not accept value '%s'", ds)}
	}
	o := &Opts{Driver: drv, Tree: obj}
	targets := []any{&o.Common}
	if drv.Options != nil {
		o.Extra = drv.Options()
		targets = append(targets, o.Extra)
	}
	if err := d.Decode(obj, path, targets...); err != nil {
		return nil, err
	}
	if o.DetectZeroes == "unmap" && o.Discard != "unmap" {
		return nil, fmt.Errorf("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
	}
	return o, nil
}

// Ref is a BlockdevRef: a node name or an inline BlockdevOptions.
type Ref struct {
	Name   string
	Inline *Opts
}

// UnmarshalQAPI implements qapi.Unmarshaler.
func (r *Ref) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	return r.decode(d, v, path, false)
}

func (r *Ref) decode(d *qapi.Decoder, v any, path string, null bool) error {
	switch x := v.(type) {
	case string:
		r.Name = x
		return nil
	case map[string]any:
		gc, ok := d.Ctx.(graphCtx)
		if !ok {
			return fmt.Errorf("blockdev reference outside a graph")
		}
		o, err := gc.g.decodeOptions(d, x, path)
		if err != nil {
			return err
		}
		r.Inline = o
		return nil
	case nil:
		if null {
			return nil
		}
	}
	if null {
		return &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: BlockdevRefOrNull", path)}
	}
	return &qapi.Error{Msg: fmt.Sprintf("Invalid parameter type for '%s', expected: BlockdevRef", path)}
}

// RefOrNull is a BlockdevRefOrNull: like Ref, or JSON null (Null set).
type RefOrNull struct {
	Ref
	Null bool
}

// UnmarshalQAPI implements qapi.Unmarshaler.
func (r *RefOrNull) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	if v == nil || v == "" {
		r.Null = true
		return nil
	}
	return r.decode(d, v, path, true)
}
