package graph

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"sync"
)

// Graph owns the nodes, their names and edges.
type Graph struct {
	// mu protects the node table, the edges and the permission state of
	// every node. It is held while opening and closing nodes (graph
	// changes are serialised), never on the I/O path.
	mu      sync.Mutex
	drivers map[string]*Driver
	nodes   []*BDS // in creation order
	byName  map[string]*BDS
	autoID  uint64
	Secrets SecretStore
	// TLSCreds gives drivers the tls-creds objects (nil: none exist).
	TLSCreds TLSCredStore
	// MetadataOnly lets read-only opens skip unlocking encryption when no
	// key is given (QEMU's BDRV_O_NO_IO, for tools that show metadata):
	// such nodes refuse I/O.
	MetadataOnly bool
	// KDFLimits bound the key derivation of encrypted images opened in
	// this graph (drivers/luks/luksfmt.KDFLimits: argon2 memory in KiB and
	// the estimated time of one keyslot); zero fields mean the defaults.
	KDFLimits KDFLimits
	// CheckOpen: images open for a consistency check, so formats leave
	// repairs to it instead of repairing on open (QEMU's BDRV_O_CHECK).
	CheckOpen bool
	// Events receives events drivers raise (BLOCK_IMAGE_CORRUPTED...);
	// the daemon forwards them to the QMP monitors. May be nil.
	Events func(name string, data any)
}

// Opener is what a driver's Open gets to open its children and read
// secrets.
type Opener struct {
	g *Graph
	b *BDS
	// placed: the node's place in the graph's node list is fixed, right
	// after after (nil: at the start). QEMU names a node once its "file"
	// child is open and before the driver opens any other child, and its
	// queries list nodes by naming order; blockd follows that order.
	placed bool
	after  *BDS
}

// place fixes the node's place in the node list at the current end.
func (o *Opener) place() {
	if o.placed {
		return
	}
	o.placed = true
	if n := len(o.g.nodes); n > 0 {
		o.after = o.g.nodes[n-1]
	}
	if o.b.auto {
		o.b.name = o.g.autoName()
		o.g.byName[o.b.name] = o.b
	}
}

// autoName returns the next automatic node name, "#block" with QEMU's
// counter and two random digits.
func (g *Graph) autoName() string {
	name := fmt.Sprintf("#block%d%02d", g.autoID, rand.IntN(100))
	g.autoID++
	return name
}

// SkipAutoNames consumes n automatic node names: QEMU names the temporary
// nodes some operations open (qcow2's blockdev-create opens the new image
// twice), and later automatic names count on from there.
func (g *Graph) SkipAutoNames(n int) {
	g.mu.Lock()
	g.autoID += uint64(n)
	g.mu.Unlock()
}

// NodeName returns the name of the node being opened (an automatic name
// is given now if the node has none yet).
func (o *Opener) NodeName() string {
	o.place()
	return o.b.name
}

// Common returns the node's common options.
func (o *Opener) Common() *Common { return &o.b.opts.Common }

// ReadOnly reports whether the node is being opened read-only.
func (o *Opener) ReadOnly() bool { return o.b.readOnly }

// Graph returns the graph the node is opened in (for Emit).
func (o *Opener) Graph() *Graph { return o.g }

// Secret returns a copy of a secret's bytes; the caller wipes it.
func (o *Opener) Secret(id string) ([]byte, error) {
	if o.g.Secrets == nil {
		return nil, fmt.Errorf("No secret with id '%s'", id)
	}
	return o.g.Secrets.Get(id)
}

// SetReadOnly makes the node being opened read-only: a driver whose
// backend turned out read-only under auto-read-only=on calls it (QEMU's
// bdrv_apply_auto_read_only).
func (o *Opener) SetReadOnly() { o.b.readOnly = true }

// ClientTLS returns the TLS configuration of the tls-creds object id,
// which must have endpoint=client.
func (o *Opener) ClientTLS(id string) (*tls.Config, error) {
	if o.g.TLSCreds == nil {
		return nil, fmt.Errorf("No TLS credentials with id '%s'", id)
	}
	return o.g.TLSCreds.ClientTLS(id)
}

// Child opens or references the child named name ("file", "header",
// "backing"...) described by ref. A nil ref (or one with neither name nor
// inline options) returns nil, nil: the caller decides whether that is an
// error.
func (o *Opener) Child(ctx context.Context, name string, ref *Ref, spec ChildSpec) (*Child, error) {
	if ref == nil || (ref.Name == "" && ref.Inline == nil) {
		return nil, nil
	}
	g := o.g
	if name != "file" {
		o.place()
	}
	var cb *BDS
	if ref.Inline != nil {
		inheritOptions(ref.Inline, o.b.opts)
		nb, err := g.open(ctx, ref.Inline, o.b.readOnly)
		if err != nil {
			return nil, err
		}
		nb.inheritsFrom = o.b
		cb = nb
	} else {
		cb = g.byName[ref.Name]
		if cb == nil || cb == o.b {
			return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", ref.Name, ref.Name)
		}
	}
	c := &Child{name: name, role: spec.Role, parent: o.b, spec: spec}
	c.target.Store(cb)
	if err := g.attach(c); err != nil {
		if cb.refs == 0 {
			g.closeNode(cb)
		}
		return nil, err
	}
	o.b.children = append(o.b.children, c)
	if name == "file" {
		o.place()
	}
	return c, nil
}

// inheritOptions gives a child defined inline in its parent's options
// the defaults QEMU's bdrv_inherited_options gives it: the parent's
// cache.direct, cache.no-flush and force-share, and discard=unmap (the
// parent's own discard policy already filters what reaches the child).
// Options the child sets itself stay.
func inheritOptions(child, parent *Opts) {
	if parent == nil {
		return
	}
	if child.Discard == "" {
		child.Discard = "unmap"
	}
	if pc := parent.Cache; pc != nil {
		if child.Cache == nil {
			child.Cache = &CacheOptions{}
		}
		if child.Cache.Direct == nil && pc.Direct != nil {
			v := *pc.Direct
			child.Cache.Direct = &v
		}
		if child.Cache.NoFlush == nil && pc.NoFlush != nil {
			v := *pc.NoFlush
			child.Cache.NoFlush = &v
		}
	}
	if child.ForceShare == nil && parent.ForceShare != nil {
		v := *parent.ForceShare
		child.ForceShare = &v
	}
}
