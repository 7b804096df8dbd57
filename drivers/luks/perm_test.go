package luks_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"blockd/drivers/luks"
	"blockd/graph"
	"blockd/internal/testutil"
)

// A luks node takes on its file what QEMU's crypto driver takes: consistent
// read, and write or resize only when its own users do, sharing what they
// share. A keyslot update needs write on the file with no writer attached,
// and, like QEMU's updating_keys, unshares consistent read and write for
// its duration: another reader of the file makes it fail with QEMU's
// permission conflict.
func TestAmendPermissions(t *testing.T) {
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	g := newGraph(t, "pw")
	defer g.Close()
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"f","filename":%q}`, img))
	drv, o, err := g.DecodeCreateOptions(testutil.Tree(t, `{"driver":"luks","file":"f","size":1048576,"key-secret":"sec0","iter-time":10,"luks-version":1}`))
	if err != nil {
		t.Fatal(err)
	}
	cc := g.NewCreateContext()
	if err := drv.Create(ctx, cc, o); err != nil {
		t.Fatal(err)
	}
	cc.Release()
	add(t, g, `{"driver":"luks","node-name":"l","file":"f","key-secret":"sec0"}`)
	am := g.Lookup("l").Node().(graph.Amender)
	iter := int64(10)
	newSecret := "bad"
	addSlot := &luks.AmendOptions{State: "active", NewSecret: &newSecret, IterTime: &iter}

	// Without users the luks node neither writes nor unshares anything on
	// its file: a user there may write, and may even resize.
	w, err := g.NewBackend("f", "", graph.PermRead|graph.PermWrite|graph.PermResize, graph.PermAll)
	if err != nil {
		t.Fatalf("writer on the file of an unused luks node: %v", err)
	}
	g.ReleaseBackend(w)

	r, err := g.NewBackend("f", "", graph.PermRead, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	want := "Permission conflict on node 'f': permissions 'consistent read' are both required by an unnamed block device (uses node 'f' as 'root' child) and unshared by node 'l' (uses node 'f' as 'file' child)."
	if err := am.Amend(ctx, addSlot, false); err == nil || err.Error() != want {
		t.Fatalf("amend with another reader of the file: %v\nwant %s", err, want)
	}
	g.ReleaseBackend(r)

	if err := am.Amend(ctx, addSlot, false); err != nil {
		t.Fatalf("amend without writers: %v", err)
	}
	// The update is over: the file is shared again.
	r, err = g.NewBackend("f", "", graph.PermRead, graph.PermAll&^graph.PermWrite)
	if err != nil {
		t.Fatalf("reader that does not share write, after the update: %v", err)
	}
	g.ReleaseBackend(r)
	// The new keyslot opens the image.
	add(t, g, `{"driver":"luks","node-name":"l2","file":"f","key-secret":"bad"}`)
}
