// Package blkdebug is a fault-injection filter: a node that passes every
// request to its "image" child unless one of its rules says to fail it with
// a chosen errno, to delay it, or both. It takes QEMU's blkdebug option
// names (image, align, max-transfer, inject-error, set-state) so that test
// configurations read the same in both; docs/testing.md lists blockd's
// extensions (after, delay-ns, an optional event, iotype lists) and the
// differences in when rules are armed.
//
// Rules. An inject-error rule is armed when its event is raised while the
// node is in the rule's state (state 0 matches any state). QEMU's format
// drivers raise debug events on their file child; blockd's drivers raise
// none, so the filter raises them itself as requests reach it: "none" once
// at open, "read_aio" for reads, "write_aio" and "pwritev" before writes
// and "pwritev_done" after them, "pwritev_zero" before write-zeroes and
// "flush_to_os" and "flush_to_disk" before flushes. A rule without an event
// is armed from the start (event "none"). An armed rule matches a request
// whose type is in its iotype set and which overlaps its 512-byte sector,
// if it has one (QEMU checks only the sector's first byte, which is the
// same for requests aligned to 512 bytes). It fires on every matching
// request after the first "after" ones: it sleeps delay-ns, then fails the
// request with errno unless errno is 0. A "once" rule is removed after it
// fires. set-state rules change the node's state (initially 1) when their
// event is raised.
package blkdebug

import (
	"context"
	"fmt"
	"sync"
	"syscall"
	"time"

	"blockd/graph"
	"blockd/internal/qapi"
)

// Event is BlkdebugEvent (QEMU 7.2's list).
type Event string

// EnumValues implements qapi.Enum.
func (Event) EnumValues() []string { return events }

var events = []string{
	"l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
	"l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
	"read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
	"vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
	"reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
	"refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
	"refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
	"cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
	"pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
	"pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
	"l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
}

// IOType is BlkdebugIOType.
type IOType string

// EnumValues implements qapi.Enum.
func (IOType) EnumValues() []string {
	return []string{"read", "write", "write-zeroes", "discard", "flush", "block-status"}
}

type ioType uint8

const (
	ioRead ioType = iota
	ioWrite
	ioWriteZeroes
	ioDiscard
	ioFlush
	ioBlockStatus
)

var ioTypeNames = map[IOType]ioType{
	"read": ioRead, "write": ioWrite, "write-zeroes": ioWriteZeroes,
	"discard": ioDiscard, "flush": ioFlush, "block-status": ioBlockStatus,
}

// defaultIOTypes is QEMU's default: everything but block-status.
const defaultIOTypes = 1<<ioRead | 1<<ioWrite | 1<<ioWriteZeroes | 1<<ioDiscard | 1<<ioFlush

// IOTypes is QEMU's single BlkdebugIOType or, as a blockd extension, a
// list of them.
type IOTypes []IOType

// UnmarshalQAPI implements qapi.Unmarshaler.
func (t *IOTypes) UnmarshalQAPI(d *qapi.Decoder, v any, path string) error {
	if _, ok := v.([]any); ok {
		var list []IOType
		if err := d.DecodeValue(v, path, &list); err != nil {
			return err
		}
		*t = list
		return nil
	}
	var one IOType
	if err := d.DecodeValue(v, path, &one); err != nil {
		return err
	}
	*t = IOTypes{one}
	return nil
}

// InjectError is BlkdebugInjectErrorOptions plus blockd's after and
// delay-ns; event is optional in blockd (default "none").
type InjectError struct {
	Event       *Event  `json:"event,omitempty"`
	State       *int64  `json:"state,omitempty"`
	IOType      IOTypes `json:"iotype,omitempty"`
	Errno       *int64  `json:"errno,omitempty"`
	Sector      *int64  `json:"sector,omitempty"`
	Once        *bool   `json:"once,omitempty"`
	Immediately *bool   `json:"immediately,omitempty"`
	After       *int64  `json:"after,omitempty"`
	DelayNs     *int64  `json:"delay-ns,omitempty"`
}

// SetState is BlkdebugSetStateOptions.
type SetState struct {
	Event    Event  `json:"event"`
	State    *int64 `json:"state,omitempty"`
	NewState int64  `json:"new_state"`
}

// Options is BlockdevOptionsBlkdebug.
type Options struct {
	Image             graph.Ref     `json:"image"`
	Config            *string       `json:"config,omitempty"`
	Align             *int64        `json:"align,omitempty"`
	MaxTransfer       *int32        `json:"max-transfer,omitempty"`
	OptWriteZero      *int32        `json:"opt-write-zero,omitempty"`
	MaxWriteZero      *int32        `json:"max-write-zero,omitempty"`
	OptDiscard        *int32        `json:"opt-discard,omitempty"`
	MaxDiscard        *int32        `json:"max-discard,omitempty"`
	InjectError       []InjectError `json:"inject-error,omitempty"`
	SetState          []SetState    `json:"set-state,omitempty"`
	TakeChildPerms    []string      `json:"take-child-perms,omitempty"`
	UnshareChildPerms []string      `json:"unshare-child-perms,omitempty"`
}

// Driver returns the blkdebug driver.
func Driver() *graph.Driver {
	return &graph.Driver{
		Name:    "blkdebug",
		Options: func() any { return new(Options) },
		Open:    open,
	}
}

// rule is one inject-error rule.
type rule struct {
	event   Event
	state   int64
	iotypes uint8 // bit per ioType
	errno   syscall.Errno
	offset  int64 // byte offset of the sector, -1 for any
	once    bool
	after   int64
	delay   time.Duration
	armed   bool
	removed bool
	matched int64 // matching requests seen while armed
}

type stateRule struct {
	event    Event
	state    int64
	newState int64
}

type node struct {
	image       *graph.Child
	align       int64
	maxTransfer int64
	opts        *Options

	mu         sync.Mutex // protects state and the rules' flags and counters
	state      int64
	rules      []*rule
	stateRules []stateRule
}

// The optional capabilities of graph/node.go, each passed down to image. Left out on purpose: Infoer (a filter has no image of its own to describe), PermSetter (the file node takes the locks), Resizer (PreallocResizer covers it), Amender and ExplicitBackinger (no metadata, no backing file).
var (
	_ graph.Zeroer          = (*node)(nil)
	_ graph.Discarder       = (*node)(nil)
	_ graph.BlockStatuser   = (*node)(nil)
	_ graph.Limiter         = (*node)(nil)
	_ graph.PreallocResizer = (*node)(nil)
	_ graph.Cacher          = (*node)(nil)
	_ graph.StrongOptioner  = (*node)(nil)
)

func open(ctx context.Context, o *graph.Opener, v any) (graph.Node, error) {
	opts := v.(*Options)
	if opts.Config != nil {
		return nil, fmt.Errorf("blkdebug config files are not supported by blockd; use inject-error and set-state")
	}
	for _, o := range []struct {
		name string
		set  bool
	}{
		{"opt-write-zero", opts.OptWriteZero != nil}, {"max-write-zero", opts.MaxWriteZero != nil},
		{"opt-discard", opts.OptDiscard != nil}, {"max-discard", opts.MaxDiscard != nil},
		{"take-child-perms", opts.TakeChildPerms != nil}, {"unshare-child-perms", opts.UnshareChildPerms != nil},
	} {
		if o.set {
			return nil, fmt.Errorf("blkdebug option '%s' is not supported by blockd", o.name)
		}
	}
	n := &node{opts: opts, state: 1}
	for i, ie := range opts.InjectError {
		r, err := newRule(ie)
		if err != nil {
			return nil, fmt.Errorf("inject-error[%d]: %w", i, err)
		}
		n.rules = append(n.rules, r)
	}
	for _, ss := range opts.SetState {
		sr := stateRule{event: ss.Event, newState: ss.NewState}
		if ss.State != nil {
			sr.state = *ss.State
		}
		n.stateRules = append(n.stateRules, sr)
	}
	img, err := o.Child(ctx, "image", &opts.Image, graph.ChildSpec{Role: graph.RoleFiltered | graph.RolePrimary})
	if err != nil {
		return nil, err
	}
	if img == nil {
		return nil, fmt.Errorf("Parameter 'image' is missing")
	}
	n.image = img
	childAlign := max(img.Limits().Align, 1)
	if opts.Align != nil && *opts.Align != 0 {
		a := *opts.Align
		if a < 0 || a >= 1<<31-1 || a&(a-1) != 0 {
			return nil, fmt.Errorf("Cannot meet constraints with align %d", uint64(a))
		}
		n.align = a
	}
	align := max(n.align, childAlign)
	if opts.MaxTransfer != nil && *opts.MaxTransfer != 0 {
		mt := int64(*opts.MaxTransfer)
		if mt < 0 || mt%align != 0 {
			return nil, fmt.Errorf("Cannot meet constraints with max-transfer %d", uint64(mt))
		}
		n.maxTransfer = mt
	}
	n.raise("none")
	return n, nil
}

func newRule(ie InjectError) (*rule, error) {
	r := &rule{event: "none", errno: syscall.EIO, offset: -1}
	if ie.Event != nil {
		r.event = *ie.Event
	}
	if ie.State != nil {
		r.state = *ie.State
	}
	if ie.DelayNs != nil {
		if *ie.DelayNs < 0 {
			return nil, fmt.Errorf("delay-ns must not be negative")
		}
		r.delay = time.Duration(*ie.DelayNs)
		// A delay rule only delays unless an errno is given too.
		r.errno = 0
	}
	if ie.Errno != nil {
		if *ie.Errno < 0 || *ie.Errno > 4095 {
			return nil, fmt.Errorf("errno %d is out of range", *ie.Errno)
		}
		r.errno = syscall.Errno(*ie.Errno)
	}
	if ie.Sector != nil && *ie.Sector != -1 {
		if *ie.Sector < 0 || *ie.Sector >= (1<<63-1)/512 {
			return nil, fmt.Errorf("sector %d is out of range", *ie.Sector)
		}
		r.offset = *ie.Sector * 512
	}
	r.once = ie.Once != nil && *ie.Once
	if ie.After != nil {
		if *ie.After < 0 {
			return nil, fmt.Errorf("after must not be negative")
		}
		r.after = *ie.After
	}
	if len(ie.IOType) == 0 {
		r.iotypes = defaultIOTypes
	}
	for _, t := range ie.IOType {
		r.iotypes |= 1 << ioTypeNames[t]
	}
	return r, nil
}

// raise processes event ev: arms its inject-error rules and applies its
// set-state rules, all against the state before the event.
func (n *node) raise(ev Event) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.raiseLocked(ev)
}

func (n *node) raiseLocked(ev Event) {
	newState := n.state
	for _, r := range n.rules {
		if r.event == ev && !r.removed && (r.state == 0 || r.state == n.state) {
			r.armed = true
		}
	}
	for _, sr := range n.stateRules {
		if sr.event == ev && (sr.state == 0 || sr.state == n.state) {
			newState = sr.newState
		}
	}
	n.state = newState
}

// check raises evs, then finds the rules that fire for a request and
// applies them: it sleeps their delays and returns the errno to fail with
// (nil when the request should go ahead).
func (n *node) check(ctx context.Context, t ioType, off, l int64, evs ...Event) error {
	var delay time.Duration
	var errno syscall.Errno
	n.mu.Lock()
	for _, ev := range evs {
		n.raiseLocked(ev)
	}
	for _, r := range n.rules {
		if !r.armed || r.removed || r.iotypes&(1<<t) == 0 {
			continue
		}
		if r.offset >= 0 && (l == 0 || off >= r.offset+512 || off+l <= r.offset) {
			continue
		}
		r.matched++
		if r.matched <= r.after {
			continue
		}
		delay += r.delay
		if r.once {
			r.removed = true
		}
		if r.errno != 0 {
			errno = r.errno
			break
		}
	}
	n.mu.Unlock()
	if delay > 0 {
		tm := time.NewTimer(delay)
		select {
		case <-tm.C:
		case <-ctx.Done():
			tm.Stop()
			return ctx.Err()
		}
	}
	if errno != 0 {
		return errno
	}
	return nil
}

func (n *node) Size() int64 { return n.image.Size() }

func (n *node) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := n.check(ctx, ioRead, off, int64(len(p)), "read_aio"); err != nil {
		return err
	}
	return n.image.ReadAt(ctx, p, off)
}

func (n *node) WriteAt(ctx context.Context, p []byte, off int64, f graph.ReqFlags) error {
	if err := n.check(ctx, ioWrite, off, int64(len(p)), "write_aio", "pwritev"); err != nil {
		return err
	}
	if err := n.image.WriteAt(ctx, p, off, f); err != nil {
		return err
	}
	n.raise("pwritev_done")
	return nil
}

func (n *node) WriteZeroes(ctx context.Context, off, l int64, f graph.ReqFlags) error {
	if err := n.check(ctx, ioWriteZeroes, off, l, "pwritev_zero"); err != nil {
		return err
	}
	if err := n.image.WriteZeroes(ctx, off, l, f); err != nil {
		return err
	}
	n.raise("pwritev_done")
	return nil
}

func (n *node) Discard(ctx context.Context, off, l int64) error {
	if err := n.check(ctx, ioDiscard, off, l); err != nil {
		return err
	}
	return n.image.Discard(ctx, off, l)
}

func (n *node) Flush(ctx context.Context) error {
	if err := n.check(ctx, ioFlush, 0, 0, "flush_to_os", "flush_to_disk"); err != nil {
		return err
	}
	return n.image.Flush(ctx)
}

func (n *node) BlockStatus(ctx context.Context, off, l int64) ([]graph.Extent, error) {
	if err := n.check(ctx, ioBlockStatus, off, l); err != nil {
		return nil, err
	}
	return n.image.BlockStatus(ctx, off, l)
}

func (n *node) Cache(ctx context.Context, off, l int64) error {
	return n.image.Cache(ctx, off, l)
}

// TruncatePrealloc passes block_resize to the image.
func (n *node) TruncatePrealloc(ctx context.Context, size int64, mode graph.Prealloc) error {
	return n.image.Truncate(ctx, size, mode)
}

func (n *node) Limits() graph.Limits {
	l := n.image.Limits()
	l.Align = max(l.Align, n.align, 1)
	if n.maxTransfer > 0 {
		l.MaxTransfer = n.maxTransfer
	}
	return l
}

// StrongOptions reports the options that change what the node does, as
// QEMU's blkdebug_strong_runtime_opts do.
func (n *node) StrongOptions() qapi.Object {
	var o qapi.Object
	if n.opts.Align != nil {
		o = append(o, qapi.Member{Name: "align", Value: *n.opts.Align})
	}
	if n.opts.MaxTransfer != nil {
		o = append(o, qapi.Member{Name: "max-transfer", Value: int64(*n.opts.MaxTransfer)})
	}
	if len(n.opts.InjectError) > 0 {
		o = append(o, qapi.Member{Name: "inject-error", Value: n.opts.InjectError})
	}
	if len(n.opts.SetState) > 0 {
		o = append(o, qapi.Member{Name: "set-state", Value: n.opts.SetState})
	}
	return o
}

func (n *node) Close() error { return nil }
