package graph

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"blockd/internal/qapi"
)

// commonReopenOptions are the options of every driver that a reopen may
// leave out (QEMU's bdrv_reset_options_allowed): they go back to their
// defaults.
var commonReopenOptions = map[string]bool{
	"node-name": true, "discard": true, "cache.direct": true, "cache.no-flush": true,
	"read-only": true, "auto-read-only": true, "detect-zeroes": true,
}

// mutableReopenOptions are the driver options QEMU 7.2 lets a reopen
// change or reset (the drivers' mutable_opts). blockd cannot change them
// on a live node yet: a reopen that changes one is refused with "Cannot
// change the option".
var mutableReopenOptions = map[string]map[string]bool{
	"file": {"x-check-cache-dropped": true},
	"raw":  {"offset": true, "size": true},
	"qcow2": {
		"lazy-refcounts": true, "pass-discard-request": true, "pass-discard-snapshot": true,
		"pass-discard-other": true, "overlap-check": true, "overlap-check.template": true,
		"overlap-check.main-header": true, "overlap-check.active-l1": true,
		"overlap-check.active-l2": true, "overlap-check.refcount-table": true,
		"overlap-check.refcount-block": true, "overlap-check.snapshot-table": true,
		"overlap-check.inactive-l1": true, "overlap-check.inactive-l2": true,
		"overlap-check.bitmap-directory": true, "cache-size": true, "l2-cache-size": true,
		"l2-cache-entry-size": true, "refcount-cache-size": true, "cache-clean-interval": true,
	},
}

// reopenItem is one node of a blockdev-reopen with what changes.
type reopenItem struct {
	b          *BDS
	o          *Opts
	readOnly   bool
	setBacking bool
	backing    *BDS // the new backing node (nil: none) when setBacking
}

// ReopenOptions implements blockdev-reopen, as QEMU's qmp_blockdev_reopen
// and bdrv_reopen_multiple: each element of list is the complete
// BlockdevOptions of an existing node, decoded as blockdev-add decodes
// them. What may change: read-only (Reopen's work, children that inherit
// it follow), detect-zeroes and discard, the backing child of a node that
// has one (a node name, or null to detach it), and an inline child given
// again inline. Any other option must be as it was ("Cannot change the
// option 'x'"), and a driver option the node was opened with may not be
// left out ("Option 'x' cannot be reset to its default value"). The
// nodes' requests are drained; either every node changes or none does.
func (g *Graph) ReopenOptions(ctx context.Context, list []any) error {
	d := &qapi.Decoder{Ctx: graphCtx{g}}
	opts := make([]*Opts, len(list))
	for i, v := range list {
		o, err := g.decodeOptions(d, v, fmt.Sprintf("options[%d]", i))
		if err != nil {
			return err
		}
		opts[i] = o
	}
	// The nodes in the order of the list (a node named twice takes its
	// last options), and the requests of the topmost ones drained.
	var nodes []*BDS
	byNode := map[*BDS]*Opts{}
	g.mu.Lock()
	for _, o := range opts {
		if _, ok := o.Tree["node-name"]; !ok {
			g.mu.Unlock()
			return errors.New("node-name not specified")
		}
		b := g.byName[o.NodeName]
		if b == nil {
			g.mu.Unlock()
			return fmt.Errorf("Failed to find node with node-name='%s'", o.NodeName)
		}
		if byNode[b] == nil {
			nodes = append(nodes, b)
		}
		byNode[b] = o
	}
	order := parentsFirst(nodes)
	g.mu.Unlock()
	for _, b := range order {
		b.gate.Lock()
		defer b.gate.Unlock()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	var items []*reopenItem
	for _, b := range nodes {
		if b.closed || g.byName[b.name] != b {
			return fmt.Errorf("Failed to find node with node-name='%s'", b.name)
		}
		var err error
		if items, err = g.reopenCheck(b, byNode[b], nil, items); err != nil {
			return err
		}
	}
	return g.reopenApply(ctx, items)
}

// parentsFirst returns the nodes of nodes that are not below another of
// them, parents before the nodes below them: the nodes whose gates a
// reopen takes. The nodes below them are drained with them (as Reopen
// drains only the node it reopens: a driver preparing writes back through
// its children). g.mu is held.
func parentsFirst(nodes []*BDS) []*BDS {
	var out []*BDS
	for _, b := range nodes {
		top := true
		for _, x := range nodes {
			if x != b && b.below(x) {
				top = false
				break
			}
		}
		if top {
			out = append(out, b)
		}
	}
	return out
}

// reopenCheck checks o, the new options of b, in the order of QEMU's
// bdrv_reopen_prepare, and adds b (and the inline children o gives again)
// to items. parent is the new options of the node that opened b inline,
// or nil. g.mu is held; nothing changes.
func (g *Graph) reopenCheck(b *BDS, o *Opts, parent *Opts, items []*reopenItem) ([]*reopenItem, error) {
	if b.opts == nil {
		return nil, fmt.Errorf("Node '%s' cannot be reopened", b.name)
	}
	if parent != nil {
		inheritOptions(o, parent)
	}
	oldFlat := flattenOptions(b.opts.Tree)
	newFlat := flattenOptions(o.Tree)
	childNames := map[string]*Child{}
	for _, c := range b.children {
		childNames[c.name] = c
	}
	isChildKey := func(k string) bool {
		_, ok := childNames[strings.SplitN(k, ".", 2)[0]]
		return ok
	}
	mutable := mutableReopenOptions[b.opts.Driver.Name]
	// bdrv_reset_options_allowed: driver options left out.
	for _, k := range sortedKeys(oldFlat) {
		if _, ok := newFlat[k]; ok || commonReopenOptions[k] || mutable[k] || isChildKey(k) || k == "backing" {
			continue
		}
		return nil, fmt.Errorf("Option '%s' cannot be reset to its default value", k)
	}
	it := &reopenItem{b: b, o: o, readOnly: o.ReadOnly != nil && *o.ReadOnly}
	if parent != nil && o.ReadOnly == nil {
		it.readOnly = parent.ReadOnly != nil && *parent.ReadOnly
	}
	handled := map[string]bool{}
	// The backing child.
	if _, ok := b.node.(BackingReplacer); ok && b.opts.Driver == o.Driver {
		var cur *Child
		for _, c := range b.children {
			if c.role&RoleCOW != 0 {
				cur = c
			}
		}
		handled["backing"] = true
		v, given := o.Tree["backing"]
		switch {
		case !given:
			if cur != nil || headerBacking(b) != "" {
				return nil, fmt.Errorf("backing is missing for '%s'", b.name)
			}
		case v == nil || v == "":
			it.setBacking = cur != nil
		default:
			name, ok := v.(string)
			if !ok {
				return nil, errors.New("Cannot change the option 'backing'")
			}
			nb := g.byName[name]
			if nb == nil {
				return nil, fmt.Errorf("Cannot find device='' nor node-name='%s'", name)
			}
			if nb == b || b.below(nb) {
				return nil, fmt.Errorf("Making '%s' a backing child of '%s' would create a cycle", name, b.name)
			}
			it.setBacking = cur == nil || cur.n() != nb
			it.backing = nb
		}
	}
	items = append(items, it)
	// Children given again: by the same name, or inline for a child the
	// node opened inline (reopened with those options).
	for _, name := range sortedKeys(o.Tree) {
		c := childNames[name]
		if c == nil || handled[name] {
			continue
		}
		switch v := o.Tree[name].(type) {
		case string:
			if v == c.n().name {
				handled[name] = true
			}
		case map[string]any:
			cb := c.n()
			if cb.inheritsFrom != b {
				continue
			}
			co, err := g.decodeOptions(&qapi.Decoder{Ctx: graphCtx{g}}, v, name)
			if err != nil {
				return nil, err
			}
			if items, err = g.reopenCheck(cb, co, o, items); err != nil {
				return nil, err
			}
			handled[name] = true
		}
	}
	// Every other option as it was: first those no driver changes, then
	// those QEMU changes and blockd does not yet.
	var later []string
	for _, k := range sortedKeys(newFlat) {
		top := strings.SplitN(k, ".", 2)[0]
		if handled[top] {
			continue
		}
		switch k {
		case "read-only", "detect-zeroes", "discard":
			continue
		case "auto-read-only", "cache.direct", "cache.no-flush":
			later = append(later, k)
			continue
		}
		if mutable[k] {
			later = append(later, k)
			continue
		}
		if ov, ok := oldFlat[k]; !ok || !sameOption(ov, newFlat[k]) {
			return nil, fmt.Errorf("Cannot change the option '%s'", k)
		}
	}
	for k := range mutable {
		if _, ok := newFlat[k]; !ok {
			if _, was := oldFlat[k]; was {
				later = append(later, k)
			}
		}
	}
	sort.Strings(later)
	for _, k := range later {
		var same bool
		switch k {
		case "auto-read-only":
			same = boolOpt(o.AutoReadOnly) == boolOpt(b.opts.AutoReadOnly)
		case "cache.direct":
			same = o.Direct() == b.opts.Direct()
		case "cache.no-flush":
			same = o.NoFlush() == b.opts.NoFlush()
		default:
			ov, ok1 := oldFlat[k]
			nv, ok2 := newFlat[k]
			same = ok1 == ok2 && sameOption(ov, nv)
		}
		if !same {
			return nil, fmt.Errorf("Cannot change the option '%s'", k)
		}
	}
	for _, k := range []string{"auto-read-only", "cache.direct", "cache.no-flush"} {
		if _, given := newFlat[k]; given {
			continue
		}
		if k == "auto-read-only" && boolOpt(b.opts.AutoReadOnly) ||
			k == "cache.direct" && b.opts.Direct() || k == "cache.no-flush" && b.opts.NoFlush() {
			return nil, fmt.Errorf("Cannot change the option '%s'", k)
		}
	}
	return items, nil
}

// reopenApply makes the checked changes: read-only first (every node
// prepared, then committed; a failure aborts what was prepared), then the
// backing edges, then the options the I/O path reads (detect-zeroes,
// discard) with the requests still drained. g.mu is held.
func (g *Graph) reopenApply(ctx context.Context, items []*reopenItem) error {
	type prepared struct{ commit, abort func() }
	var done []prepared
	undo := func() {
		for i := len(done) - 1; i >= 0; i-- {
			done[i].abort()
		}
	}
	for _, it := range items {
		commit, abort, err := g.reopenPrepare(ctx, it.b, it.readOnly)
		if err != nil {
			undo()
			if err.Error() == "Block node is read-only" {
				err = fmt.Errorf("Read-only block node '%s' cannot support read-write users", it.b.name)
			}
			return err
		}
		done = append(done, prepared{commit, abort})
	}
	type swapped struct {
		it  *reopenItem
		old *Child // the backing edge before (nil: none)
		new *Child // the backing edge after (nil: none)
	}
	var swaps []swapped
	unswap := func() {
		for i := len(swaps) - 1; i >= 0; i-- {
			s := swaps[i]
			g.setBackingEdge(s.it.b, s.new, s.old)
			if s.new != nil {
				g.detach(s.new)
			}
		}
	}
	for _, it := range items {
		if !it.setBacking {
			continue
		}
		var old *Child
		for _, c := range it.b.children {
			if c.role&RoleCOW != 0 {
				old = c
			}
		}
		var nc *Child
		if it.backing != nil {
			nc = &Child{name: "backing", role: RoleCOW, parent: it.b, spec: ChildSpec{Role: RoleCOW}}
			nc.target.Store(it.backing)
			if err := g.attach(nc); err != nil {
				unswap()
				undo()
				return err
			}
		}
		g.setBackingEdge(it.b, old, nc)
		swaps = append(swaps, swapped{it, old, nc})
	}
	for _, p := range done {
		p.commit()
	}
	for _, s := range swaps {
		if s.old != nil {
			g.detach(s.old)
		}
	}
	for _, it := range items {
		it.b.opts = it.o
	}
	return nil
}

// setBackingEdge replaces b's backing edge from with to (either may be
// nil) in b's children and in its driver; to is attached, from stays
// attached (the caller detaches it, or swaps back). g.mu is held and b's
// requests are drained.
func (g *Graph) setBackingEdge(b *BDS, from, to *Child) {
	kids := b.children[:0:0]
	for _, c := range b.children {
		if c != from {
			kids = append(kids, c)
		}
	}
	if to != nil {
		kids = append(kids, to)
	}
	b.children = kids
	b.node.(BackingReplacer).ReplaceBacking(to)
}

// headerBacking is the backing file name b's image header holds, if any.
func headerBacking(b *BDS) string {
	if in, ok := b.node.(Infoer); ok {
		return in.Info().BackingFilename
	}
	return ""
}

// flattenOptions flattens an options tree as QEMU's qdict_flatten:
// nested members become dotted keys.
func flattenOptions(tree map[string]any) map[string]any {
	out := map[string]any{}
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			if sub, ok := v.(map[string]any); ok {
				walk(prefix+k+".", sub)
				continue
			}
			out[prefix+k] = v
		}
	}
	walk("", tree)
	return out
}

// sameOption compares two option values, a keyval string and a typed
// JSON value alike.
func sameOption(a, b any) bool {
	norm := func(v any) string {
		switch x := v.(type) {
		case bool:
			if x {
				return "on"
			}
			return "off"
		case string:
			switch x {
			case "true":
				return "on"
			case "false":
				return "off"
			}
			return x
		}
		return fmt.Sprint(v)
	}
	return norm(a) == norm(b)
}

func boolOpt(p *bool) bool { return p != nil && *p }

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
