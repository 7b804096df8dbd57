package graph

import (
	"strings"
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

// Role returns the edge's role.
func (c *Child) Role() Role { return c.role }
