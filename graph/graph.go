package graph

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Role describes what a child edge carries (QEMU's BdrvChildRole).
type Role uint32

const (
	RoleData Role = 1 << iota
	RoleMetadata
	RoleFiltered
	RoleCOW
	RolePrimary
)

// Perm is a set of permissions a user holds on a node (QEMU's BLK_PERM_*).
// The bit numbers are those QEMU uses for its image lock bytes.
type Perm uint32

const (
	PermRead Perm = 1 << iota // consistent read
	PermWrite
	PermWriteUnchanged
	PermResize
	PermAll = PermRead | PermWrite | PermWriteUnchanged | PermResize
)

var permNames = []string{"consistent read", "write", "write unchanged", "resize"}

func (p Perm) String() string {
	var s []string
	for i, n := range permNames {
		if p&(1<<i) != 0 {
			s = append(s, n)
		}
	}
	return strings.Join(s, ", ")
}

// PermSetter is implemented by nodes that act on the permissions their users
// hold, e.g. the file driver's image locks. SetPerm is called with the union
// of the permissions held and the intersection of those shared whenever they
// change; an error vetoes the change.
type PermSetter interface {
	SetPerm(perm, shared Perm) error
}

// SecretStore is how drivers read secrets (key-secret).
type SecretStore interface {
	Get(id string) ([]byte, error)
}

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

// ValidNodeName reports whether s follows QEMU's node-name rules.
func ValidNodeName(s string) bool {
	if s == "" || len(s) > 31 {
		return false
	}
	c := s[0]
	if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

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
	g        *Graph
	name     string
	auto     bool
	opts     *Opts
	node     Node
	limits   Limits
	readOnly bool

	// The following are protected by g.mu.
	children     []*Child
	parents      []*Child // edges from parent nodes
	backends     []*Child // edges from users outside the graph (exports)
	users        int
	refs         int // parents + backends + monitor ownership
	monitorOwned bool
	perm, shared Perm // cumulative permissions applied to the node
	closed       bool

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

// ReadOnly reports whether the node was opened read-only.
func (b *BDS) ReadOnly() bool { return b.readOnly }

// Limits returns the node's limits.
func (b *BDS) Limits() Limits { return b.limits }

// Children returns the node's child edges.
func (b *BDS) Children() []*Child {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return append([]*Child(nil), b.children...)
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

// ChildSpec says how a parent uses a child edge. The permissions the parent
// takes are derived from the role and from what the parent's own users hold,
// the way QEMU's bdrv_default_perms does.
type ChildSpec struct {
	Role Role
	// OnlyWhenNeeded drops write and resize from the edge unless the
	// parent's users need them (QEMU's raw and crypto drivers do this).
	OnlyWhenNeeded bool
	// ShareAsParent shares write and resize whenever the parent's users
	// share them, whatever the role says (QEMU's crypto driver, which is
	// "not fully a format driver": a luks node's file is as shareable as
	// the luks node).
	ShareAsParent bool
	// ExtraPerm is taken on top of the derived permissions, and Unshare
	// taken out of the shared ones (a luks node updating its keyslots
	// takes write and unshares consistent read and write, as QEMU's
	// crypto driver does while updating_keys is set).
	ExtraPerm Perm
	Unshare   Perm
	// ReadOnly edges only read and share everything: a detached LUKS
	// header shared by several luks nodes. Writers attach separately for
	// the duration of a metadata update.
	ReadOnly bool
}

// childPerm computes an edge's permissions from the parent's cumulative
// permissions, following QEMU's bdrv_default_perms (and, with the spec's
// flags, raw_child_perm and block_crypto_child_perms).
func childPerm(spec ChildSpec, writable bool, parentPerm, parentShared Perm) (Perm, Perm) {
	if spec.ReadOnly {
		return PermRead, PermAll
	}
	perm, shared := parentPerm, parentShared
	role := spec.Role
	switch {
	case role&RoleCOW != 0:
		perm &= PermRead
		if shared&PermWrite != 0 {
			shared = PermWrite | PermResize
		} else {
			shared = 0
		}
		shared |= PermRead | PermWriteUnchanged
	case role&(RoleMetadata|RoleData) != 0:
		if role&RoleMetadata != 0 {
			if writable {
				perm |= PermWrite | PermResize
			}
			perm |= PermRead
			shared &^= PermWrite | PermResize
		}
		if role&RoleData != 0 {
			shared &^= PermResize
			if perm&PermWriteUnchanged != 0 {
				perm |= PermWrite
			}
			if perm&PermWrite != 0 {
				perm |= PermResize
			}
		}
	}
	if spec.OnlyWhenNeeded {
		perm &^= PermWrite | PermResize
		perm |= parentPerm & (PermWrite | PermResize)
	}
	if spec.ShareAsParent {
		shared |= parentShared & (PermWrite | PermResize)
	}
	perm |= spec.ExtraPerm
	shared &^= spec.Unshare
	if !writable {
		perm &^= PermWrite | PermResize
	}
	return perm, shared
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
		cb = nb
	} else {
		cb = g.byName[ref.Name]
		if cb == nil || cb == o.b {
			return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", ref.Name, ref.Name)
		}
	}
	c := &Child{name: name, role: spec.Role, parent: o.b, node: cb, spec: spec}
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

// NewBackend attaches a user from outside the graph (an export, a job, a
// tool) to the named node with the given permissions. user names it in
// permission conflicts; "" is QEMU's "an unnamed block device", which is
// what exports and QMP commands are there. Release it with ReleaseBackend.
func (g *Graph) NewBackend(nodeName, user string, perm, shared Perm) (*Child, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.byName[nodeName]
	if b == nil {
		return nil, fmt.Errorf("Cannot find device='%s' nor node-name='%s'", nodeName, nodeName)
	}
	c := &Child{name: "root", user: user, node: b, fixedPerm: perm, fixedShared: shared}
	if err := g.attach(c); err != nil {
		return nil, err
	}
	b.users++
	return c, nil
}

// ReleaseBackend detaches a backend from its node.
func (g *Graph) ReleaseBackend(c *Child) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c.detached {
		return
	}
	c.node.users--
	g.detach(c)
}

// SetChildSpec changes how c's parent uses the edge (a luks node updating
// its keyslots takes write on its file for the duration) and applies the
// permissions that follow. On error nothing changes.
func (g *Graph) SetChildSpec(c *Child, spec ChildSpec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c.detached || c.parent == nil {
		return ErrClosed
	}
	oldSpec, oldPerm, oldShared := c.spec, c.perm, c.shared
	c.spec = spec
	c.setPerm(c.effective())
	err := error(nil)
	if c.perm&(PermWrite|PermResize) != 0 && c.node.readOnly {
		err = errors.New("Block node is read-only")
	} else {
		err = g.refresh(c.node)
	}
	if err != nil {
		c.spec = oldSpec
		c.setPerm(oldPerm, oldShared)
		return err
	}
	return nil
}

// attach adds edge c to c.node's users, checking and applying permissions.
// g.mu is held.
func (g *Graph) attach(c *Child) error {
	b := c.node
	c.setPerm(c.effective())
	if c.perm&(PermWrite|PermResize) != 0 && b.readOnly {
		return fmt.Errorf("Block node is read-only")
	}
	if c.parent != nil {
		b.parents = append(b.parents, c)
	} else {
		b.backends = append(b.backends, c)
	}
	if err := g.refresh(b); err != nil {
		g.removeEdge(c)
		_ = g.refresh(b)
		return err
	}
	b.refs++
	return nil
}

// detach removes edge c and drops the reference it held. g.mu is held.
func (g *Graph) detach(c *Child) {
	if c.detached {
		return
	}
	c.detached = true
	g.removeEdge(c)
	_ = g.refresh(c.node)
	g.unref(c.node)
}

func (g *Graph) removeEdge(c *Child) {
	b := c.node
	list := &b.parents
	if c.parent == nil {
		list = &b.backends
	}
	for i, x := range *list {
		if x == c {
			*list = append((*list)[:i], (*list)[i+1:]...)
			break
		}
	}
}

func (b *BDS) edges() []*Child {
	return append(append([]*Child(nil), b.parents...), b.backends...)
}

// refresh recomputes the cumulative permissions of b from its edges, checks
// them for conflicts, applies them (image locks) and propagates them through
// passthrough children. On error nothing is changed. g.mu is held.
func (g *Graph) refresh(b *BDS) error {
	edges := b.edges()
	for _, a := range edges {
		for _, x := range edges {
			if a == x {
				continue
			}
			if bad := a.perm &^ x.shared; bad != 0 {
				return fmt.Errorf("Permission conflict on node '%s': permissions '%s' are both required by %s and unshared by %s.", b.name, bad, a.desc(), x.desc())
			}
		}
	}
	perm, shared := Perm(0), PermAll
	for _, e := range edges {
		perm |= e.perm
		shared &= e.shared
	}
	if b.opts != nil && b.opts.ForceShare != nil && *b.opts.ForceShare {
		shared = PermAll
	}
	if perm == b.perm && shared == b.shared {
		return nil
	}
	if ps, ok := b.node.(PermSetter); ok && b.node != nil {
		if err := ps.SetPerm(perm, shared); err != nil {
			return err
		}
	}
	oldPerm, oldShared := b.perm, b.shared
	b.perm, b.shared = perm, shared
	for _, c := range b.children {
		op, os := c.perm, c.shared
		c.setPerm(c.effective())
		if c.perm&(PermWrite|PermResize) != 0 && c.node.readOnly {
			c.setPerm(op, os)
			b.perm, b.shared = oldPerm, oldShared
			if ps, ok := b.node.(PermSetter); ok {
				_ = ps.SetPerm(oldPerm, oldShared)
			}
			return fmt.Errorf("Block node is read-only")
		}
		if err := g.refresh(c.node); err != nil {
			c.setPerm(op, os)
			b.perm, b.shared = oldPerm, oldShared
			if ps, ok := b.node.(PermSetter); ok {
				_ = ps.SetPerm(oldPerm, oldShared)
			}
			return err
		}
	}
	return nil
}

// Child is an edge from a parent node (or an outside user) to a node. All
// I/O through a Child passes the graph's validation layer: range checks,
// permission checks and alignment.
type Child struct {
	name   string
	user   string // backend user description
	role   Role
	parent *BDS
	node   *BDS

	spec ChildSpec

	// protected by g.mu
	fixedPerm, fixedShared Perm // backends only
	perm, shared           Perm // set with setPerm
	detached               bool

	// ioPerm is perm for the I/O path, which checks it without g.mu
	// while permissions may change (a luks node taking write on its file
	// for a keyslot update while its users write).
	ioPerm atomic.Uint32
}

// setPerm sets the edge's permissions. g.mu is held.
func (c *Child) setPerm(perm, shared Perm) {
	c.perm, c.shared = perm, shared
	c.ioPerm.Store(uint32(perm))
}

func (c *Child) effective() (Perm, Perm) {
	if c.parent != nil {
		return childPerm(c.spec, !c.parent.readOnly, c.parent.perm, c.parent.shared)
	}
	return c.fixedPerm, c.fixedShared
}

// desc names the edge's user in QEMU's words (bdrv_child_user_desc plus
// the edge): "node 'q' (uses node 'f' as 'file' child)", "an unnamed block
// device (uses node 'f' as 'root' child)".
func (c *Child) desc() string {
	who := "an unnamed block device"
	if c.parent != nil {
		who = fmt.Sprintf("node '%s'", c.parent.name)
	} else if c.user != "" {
		who = c.user
	}
	return fmt.Sprintf("%s (uses node '%s' as '%s' child)", who, c.node.name, c.name)
}

// Name returns the child's role name ("file", "header"...).
func (c *Child) Name() string { return c.name }

// BDS returns the node the edge points to.
func (c *Child) BDS() *BDS { return c.node }

// Role returns the edge's role.
func (c *Child) Role() Role { return c.role }

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
