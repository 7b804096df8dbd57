package graph

import "testing"

// TestChildPermLikeQEMU checks the permissions an edge takes and shares
// against QEMU 7.2's bdrv_default_perms (with raw_child_perm for
// OnlyWhenNeeded and block_crypto_child_perms for ShareAsParent), worked
// out by hand from QEMU's block.c, block/raw-format.c and block/crypto.c.
// tests/e2e's TestImageLocksMatchQSD checks the same through the lock
// bytes of real graphs.
func TestChildPermLikeQEMU(t *testing.T) {
	const (
		R  = PermRead
		W  = PermWrite
		WU = PermWriteUnchanged
		RS = PermResize
		A  = PermAll
	)
	image := RoleData | RoleMetadata | RolePrimary
	export := [2]Perm{R | W, A &^ RS} // a writable NBD export
	none := [2]Perm{0, A}             // no users
	rawData := ChildSpec{Role: RoleData | RolePrimary, OnlyWhenNeeded: true}
	crypto := ChildSpec{Role: image, OnlyWhenNeeded: true, ShareAsParent: true}
	updatingKeys := crypto
	updatingKeys.ExtraPerm, updatingKeys.Unshare = W, R|W
	for _, tc := range []struct {
		name             string
		spec             ChildSpec
		writable         bool
		parent           [2]Perm
		wantPerm, wantSh Perm
	}{
		{"qcow2 file, no users", ChildSpec{Role: image}, true, none, R | W | RS, A &^ (W | RS)},
		{"qcow2 file, read-only", ChildSpec{Role: image}, false, none, R, A &^ (W | RS)},
		{"qcow2 file, exported", ChildSpec{Role: image}, true, export, R | W | RS, R | WU},
		{"qcow2 file, exclusive user", ChildSpec{Role: image}, true, [2]Perm{R | W, 0}, R | W | RS, 0},
		{"qcow2 data-file", ChildSpec{Role: RoleData}, true, export, R | W | RS, A &^ RS},
		{"backing, parent shares write", ChildSpec{Role: RoleCOW}, true, export, R, A},
		{"backing, parent unshares write", ChildSpec{Role: RoleCOW}, true, [2]Perm{R | W, R | WU}, R, R | WU},
		{"raw filter", ChildSpec{Role: RoleFiltered | RolePrimary, OnlyWhenNeeded: true}, true, export, R | W, A &^ RS},
		{"raw with offset, exported", rawData, true, export, R | W, A &^ RS},
		{"raw with offset, no users", rawData, true, none, 0, A &^ RS},
		{"raw with offset, write unchanged", rawData, true, [2]Perm{WU, A}, WU, A &^ RS},
		{"luks file, no users", crypto, true, none, R, A},
		{"luks file, exported", crypto, true, export, R | W, A &^ RS},
		{"luks file, read-only export", crypto, false, [2]Perm{R, A &^ RS}, R, A &^ RS},
		{"luks file, resize user", crypto, true, [2]Perm{RS, A}, R | RS, A},
		{"luks file, updating keys", updatingKeys, true, none, R | W, WU | RS},
		{"luks data file with a header", ChildSpec{Role: RoleData | RolePrimary, OnlyWhenNeeded: true, ShareAsParent: true}, true, none, 0, A},
		{"detached luks header", ChildSpec{Role: RoleMetadata, ReadOnly: true}, true, export, R, A},
	} {
		perm, shared := childPerm(tc.spec, tc.writable, tc.parent[0], tc.parent[1])
		if perm != tc.wantPerm || shared != tc.wantSh {
			t.Errorf("%s: perm %q shared %q, want %q shared %q", tc.name, perm, shared, tc.wantPerm, tc.wantSh)
		}
	}
}
