package graph

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"blockd/internal/qapi"
)

// SecretStore is how drivers read secrets (key-secret).
type SecretStore interface {
	Get(id string) ([]byte, error)
}

// TLSCredStore is how drivers find tls-creds objects (the nbd driver's
// tls-creds).
type TLSCredStore interface {
	// ClientTLS returns the configuration of a tls-creds object with
	// endpoint=client, or an error in QEMU's words.
	ClientTLS(id string) (*tls.Config, error)
}

// KDFLimits are the bounds on unlocking one keyslot of an encrypted image,
// the fields of luksfmt.KDFLimits (convertible to it).
type KDFLimits struct {
	MaxMemoryKiB uint32
	MaxTime      time.Duration
}

// Emit raises an event if anyone listens.
func (g *Graph) Emit(name string, data any) {
	if g.Events != nil {
		g.Events(name, data)
	}
}

// New returns an empty graph with the given drivers.
func New(secrets SecretStore, drivers ...*Driver) *Graph {
	g := &Graph{drivers: map[string]*Driver{}, byName: map[string]*BDS{}, Secrets: secrets}
	for _, d := range drivers {
		g.Register(d)
	}
	return g
}

// Register adds a driver.
func (g *Graph) Register(d *Driver) { g.drivers[d.Name] = d }

func (g *Graph) driver(name string) *Driver { return g.drivers[name] }

// Driver returns the registered driver with the given name, or nil.
func (g *Graph) Driver(name string) *Driver { return g.drivers[name] }

// DriverNames lists the registered drivers.
func (g *Graph) DriverNames() []string {
	var out []string
	for n := range g.drivers {
		out = append(out, n)
	}
	return out
}

// ValidNodeName reports whether s follows QEMU's node-name rules: a
// well-formed id of at most 31 characters.
func ValidNodeName(s string) bool { return len(s) <= 31 && qapi.WellFormedID(s) }

func checkNodeName(s string) error {
	if s == "" {
		return errors.New("Invalid node-name: ''")
	}
	c := s[0]
	if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') || !ValidNodeName(s[:min(len(s), 31)]) {
		return fmt.Errorf("Invalid node-name: '%s'", s)
	}
	if len(s) > 31 {
		return errors.New("Node name too long")
	}
	return nil
}

// Lookup returns the node with the given name, or nil.
func (g *Graph) Lookup(name string) *BDS {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.byName[name]
}

// Nodes returns all nodes, newest first (the order of QEMU's queries).
func (g *Graph) Nodes() []*BDS {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]*BDS, len(g.nodes))
	for i, b := range g.nodes {
		out[len(g.nodes)-1-i] = b
	}
	return out
}

// Add implements blockdev-add: v is a BlockdevOptions tree. The new node and
// its inline children are owned by the monitor until Del.
func (g *Graph) Add(ctx context.Context, v any, keyval bool) (*BDS, error) {
	o, err := g.DecodeOptions(v, keyval)
	if err != nil {
		return nil, err
	}
	if _, given := o.Tree["node-name"]; !given {
		return nil, errors.New("'node-name' must be specified for the root node")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	b, err := g.open(ctx, o, false)
	if err != nil {
		return nil, err
	}
	b.monitorOwned = true
	b.refs++
	return b, nil
}

// open opens a node from decoded options. g.mu is held.
func (g *Graph) open(ctx context.Context, o *Opts, parentRO bool) (*BDS, error) {
	name := o.NodeName
	auto := false
	if _, given := o.Tree["node-name"]; !given {
		// Named when placed (Opener.place), as QEMU names a node only
		// once its file child is open.
		name = ""
		auto = true
	} else {
		if err := checkNodeName(name); err != nil {
			return nil, err
		}
		if g.byName[name] != nil {
			return nil, fmt.Errorf("Duplicate nodes with node-name='%s'", name)
		}
	}
	ro := parentRO
	if o.ReadOnly != nil {
		ro = *o.ReadOnly
	}
	if o.ForceShare != nil && *o.ForceShare && !ro {
		return nil, errors.New("force-share=on can only be used with read-only images")
	}
	b := &BDS{g: g, name: name, auto: auto, opts: o, readOnly: ro, shared: PermAll}
	op := &Opener{g: g, b: b}
	// Register the name before opening so that children opened inline see
	// it taken; roll back on failure.
	if !auto {
		g.byName[name] = b
	}
	n, err := o.Driver.Open(ctx, op, o.Extra)
	if err != nil {
		if b.name != "" {
			delete(g.byName, b.name)
		}
		for _, c := range b.children {
			g.detach(c)
		}
		return nil, err
	}
	op.place()
	b.node = n
	if l, ok := n.(Limiter); ok {
		b.limits = l.Limits()
	}
	if b.limits.Align < 1 {
		b.limits.Align = 1
	}
	g.insertNode(b, op)
	// Apply the permissions the node's children took during Open now that
	// the node exists (they were checked when attached).
	return b, nil
}

// insertNode adds a newly opened node to the node list at the place its
// Opener fixed (the end if none).
func (g *Graph) insertNode(b *BDS, op *Opener) {
	at := len(g.nodes)
	if op.placed {
		if op.after == nil {
			at = 0
		}
		for i, x := range g.nodes {
			if op.after != nil && x == op.after {
				at = i + 1
				break
			}
		}
	}
	g.nodes = append(g.nodes, nil)
	copy(g.nodes[at+1:], g.nodes[at:])
	g.nodes[at] = b
}

// Del implements blockdev-del.
func (g *Graph) Del(name string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.byName[name]
	if b == nil {
		return fmt.Errorf("Failed to find node with node-name='%s'", name)
	}
	// The source of a mirror (it has a dirty bitmap) sits below QEMU's
	// mirror_top filter, which holds its users: bdrv_has_blk finds none
	// and the job's op blocker answers first.
	if b.users > 0 && b.dirty.Load() == nil {
		return fmt.Errorf("Node %s is in use", name)
	}
	if err := b.busyLocked(); err != nil {
		return err
	}
	if b.users > 0 {
		return fmt.Errorf("Node %s is in use", name)
	}
	for _, c := range b.parents {
		// QEMU's backing op blocker.
		if c.role&RoleCOW != 0 {
			return fmt.Errorf("Node '%s' is busy: node is used as backing hd of '%s'", name, c.parent.name)
		}
	}
	if !b.monitorOwned {
		return fmt.Errorf("Node %s is not owned by the monitor", name)
	}
	if len(b.parents) > 0 {
		return fmt.Errorf("Block device %s is in use", name)
	}
	b.monitorOwned = false
	g.unref(b)
	return nil
}

// unref drops a reference; at zero the node closes and releases its
// children. g.mu is held.
func (g *Graph) unref(b *BDS) {
	b.refs--
	if b.refs > 0 {
		return
	}
	g.closeNode(b)
}

func (g *Graph) closeNode(b *BDS) {
	if b.node != nil {
		_ = b.node.Flush(context.Background())
		_ = b.node.Close()
	}
	delete(g.byName, b.name)
	for i, x := range g.nodes {
		if x == b {
			g.nodes = append(g.nodes[:i], g.nodes[i+1:]...)
			break
		}
	}
	b.closed = true
	children := b.children
	b.children = nil
	for _, c := range children {
		g.detach(c)
	}
}

// Close closes every node (daemon shutdown).
func (g *Graph) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for len(g.nodes) > 0 {
		// Close roots first: nodes without parents.
		progressed := false
		for i := len(g.nodes) - 1; i >= 0; i-- {
			b := g.nodes[i]
			if len(b.parents) == 0 {
				b.users = 0
				for _, c := range b.backends {
					c.detached = true
				}
				b.backends = nil
				g.closeNode(b)
				progressed = true
				break
			}
		}
		if !progressed {
			g.closeNode(g.nodes[len(g.nodes)-1])
		}
	}
}

// BDS is a node in the graph: the driver's Node plus what the graph keeps
// about it (name, options, edges, permissions).
type BDS struct {
	g      *Graph
	name   string
	auto   bool
	opts   *Opts
	node   Node
	limits Limits
	// readOnly changes only under g.mu with the node's requests drained
	// (Graph.Reopen); ReadOnly reads it under g.mu.
	readOnly bool
	// inheritsFrom is the parent that opened the node inline: the node
	// follows its read-only changes unless its own options set read-only
	// (QEMU's inherits_from).
	inheritsFrom *BDS

	// The following are protected by g.mu.
	children     []*Child
	parents      []*Child // edges from parent nodes
	backends     []*Child // edges from users outside the graph (exports)
	users        int
	refs         int // parents + backends + monitor ownership
	monitorOwned bool
	perm, shared Perm // cumulative permissions applied to the node
	closed       bool

	// writeThreshold is the block-set-write-threshold offset (0: none).
	writeThreshold atomic.Uint64

	// dirty is the bitmap a mirror job keeps of the node's writes
	// (TrackDirty), nil when none.
	dirty atomic.Pointer[DirtyBitmap]

	// gate is held shared by every request through an edge to the node
	// and exclusively while the edges pointing to it are moved
	// (Graph.Snapshot), which so waits for the requests in flight.
	gate sync.RWMutex

	// rmw serialises read-modify-write cycles against aligned writes on
	// nodes with an alignment above 1: aligned writes hold it shared,
	// unaligned ones exclusively.
	rmw sync.RWMutex
}

// Name returns the node name.
func (b *BDS) Name() string { return b.name }

// AutoNamed reports whether the name was generated (#blockNNN).
func (b *BDS) AutoNamed() bool { return b.auto }

// Node returns the driver's node.
func (b *BDS) Node() Node { return b.node }

// Driver returns the node's driver.
func (b *BDS) Driver() *Driver { return b.opts.Driver }

// Options returns the decoded options the node was opened with.
func (b *BDS) Options() *Opts { return b.opts }

// ReadOnly reports whether the node is read-only.
func (b *BDS) ReadOnly() bool {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.readOnly
}

// Limits returns the node's limits.
func (b *BDS) Limits() Limits { return b.limits }

// Children returns the node's child edges.
func (b *BDS) Children() []*Child {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return append([]*Child(nil), b.children...)
}
