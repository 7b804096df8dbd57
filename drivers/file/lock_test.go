package file

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

// heldBytes lists the lock bytes (100-103, 200-203) that some open file
// description other than a fresh one holds on p.
func heldBytes(t testing.TB, p string) []int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var out []int
	for _, base := range []int{lockPermBase, lockSharedBase} {
		for i := 0; i < numPerms; i++ {
			busy, err := lockTest(fd, int64(base+i))
			if err != nil {
				t.Fatal(err)
			}
			if busy {
				out = append(out, base+i)
			}
		}
	}
	return out
}

func TestLockBytes(t *testing.T) {
	if !HasOFDLocks() {
		t.Skip("no OFD locks")
	}
	const (
		R  = graph.PermRead
		W  = graph.PermWrite
		WU = graph.PermWriteUnchanged
		RS = graph.PermResize
		A  = graph.PermAll
	)
	for _, tc := range []struct {
		perm, shared graph.Perm
		want         string
	}{
		{R, A, "[100]"},
		{R | W, A &^ W, "[100 101 201]"},
		{R | W | RS, A &^ (W | RS), "[100 101 103 201 203]"},
		{R | W | WU | RS, 0, "[100 101 102 103 200 201 202 203]"},
		{0, A, "[]"},
		{0, R | WU, "[201 203]"},
	} {
		p, _ := mkfile(t, 4096)
		g := newGraph()
		addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
		if got := fmt.Sprint(heldBytes(t, p)); got != "[]" {
			t.Fatalf("an open node without users holds %s", got)
		}
		c, err := g.NewBackend("n", "user", tc.perm, tc.shared)
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(heldBytes(t, p)); got != tc.want {
			t.Errorf("perm %v shared %v: bytes %s, want %s", tc.perm, tc.shared, got, tc.want)
		}
		g.ReleaseBackend(c)
		if got := fmt.Sprint(heldBytes(t, p)); got != "[]" {
			t.Errorf("after release: %s", got)
		}
		g.Close()
	}
}

// Two graphs in one process conflict like two processes: OFD locks belong
// to the open file description.
func TestLockConflicts(t *testing.T) {
	if !HasOFDLocks() {
		t.Skip("no OFD locks")
	}
	p, _ := mkfile(t, 1<<16)
	type user struct {
		perm, shared graph.Perm
	}
	writer := user{rw, graph.PermAll &^ graph.PermWrite}
	sharingWriter := user{rw, graph.PermAll}
	reader := user{graph.PermRead, graph.PermAll}
	strictReader := user{graph.PermRead, graph.PermAll &^ graph.PermWrite}
	exclusive := user{graph.PermAll, 0}
	for _, tc := range []struct {
		name        string
		a, b        user
		aOpt, bOpt  string
		err         string
		releaseFrom bool
	}{
		{"writer vs writer", writer, writer, "", "", `Failed to get "write" lock`, false},
		{"writer vs reader", writer, reader, "", "", "", false},
		{"writer vs strict reader", writer, strictReader, "", "", `Failed to get shared "write" lock`, false},
		{"sharing writer vs writer", sharingWriter, writer, "", "", `Failed to get shared "write" lock`, false},
		{"sharing writers", sharingWriter, sharingWriter, "", "", "", false},
		{"reader vs exclusive", reader, exclusive, "", "", `Failed to get shared "consistent read" lock`, false},
		{"exclusive vs reader", exclusive, reader, "", "", `Failed to get "consistent read" lock`, false},
		{"locking off b", writer, writer, "", `,"locking":"off"`, "", false},
		{"locking off a", writer, writer, `,"locking":"off"`, "", "", false},
		{"locking on", writer, writer, `,"locking":"on"`, `,"locking":"on"`, `Failed to get "write" lock`, false},
		{"force-share", writer, strictReader, "", `,"read-only":true,"force-share":true`, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ga, gb := newGraph(), newGraph()
			defer ga.Close()
			defer gb.Close()
			addNode(t, ga, `{"driver":"file","node-name":"a","filename":%s%s}`, q(p), tc.aOpt)
			addNode(t, gb, `{"driver":"file","node-name":"b","filename":%s%s}`, q(p), tc.bOpt)
			ca, err := ga.NewBackend("a", "export", tc.a.perm, tc.a.shared)
			if err != nil {
				t.Fatal(err)
			}
			cb, err := gb.NewBackend("b", "export", tc.b.perm, tc.b.shared)
			if tc.err == "" {
				if err != nil {
					t.Fatalf("got %v", err)
				}
				gb.ReleaseBackend(cb)
				return
			}
			if err == nil || err.Error() != tc.err {
				t.Fatalf("got %v, want %q", err, tc.err)
			}
			var le *LockError
			if !errors.As(err, &le) || le.Hint() != "Is another process using the image ["+p+"]?" || !errors.Is(err, graph.ErrPermission) {
				t.Fatalf("error %#v", err)
			}
			// The failed attach left b's locks as they were (none); once a
			// lets go, b gets what it asked for.
			ga.ReleaseBackend(ca)
			if got := fmt.Sprint(heldBytes(t, p)); got != "[]" {
				t.Fatalf("locks left behind: %s", got)
			}
			cb, err = gb.NewBackend("b", "export", tc.b.perm, tc.b.shared)
			if err != nil {
				t.Fatalf("after release: %v", err)
			}
			gb.ReleaseBackend(cb)
		})
	}
}

// Closing a node (graph shutdown or blockdev-del) releases its locks.
func TestLockReleasedOnClose(t *testing.T) {
	p, _ := mkfile(t, 4096)
	ga, gb := newGraph(), newGraph()
	defer gb.Close()
	addNode(t, ga, `{"driver":"file","node-name":"a","filename":%s}`, q(p))
	attach(t, ga, "a")
	addNode(t, gb, `{"driver":"file","node-name":"b","filename":%s}`, q(p))
	if _, err := gb.NewBackend("b", "export", rw, graph.PermAll); err == nil {
		t.Fatal("conflict not detected")
	}
	ga.Close()
	if _, err := gb.NewBackend("b", "export", rw, graph.PermAll); err != nil {
		t.Fatal(err)
	}
}

// A byte someone holds with a write lock cannot be read-locked: QEMU's
// "Failed to lock byte" error.
func TestLockByteFailure(t *testing.T) {
	if !HasOFDLocks() {
		t.Skip("no OFD locks")
	}
	p, _ := mkfile(t, 4096)
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := lockFcntl(fd, 101, unix.F_WRLCK); err != nil {
		t.Fatal(err)
	}
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	_, err = g.NewBackend("n", "export", rw, graph.PermAll)
	if err == nil || err.Error() != "Failed to lock byte 101" {
		t.Fatalf("got %v", err)
	}
	if got := fmt.Sprint(heldBytes(t, p)); got != "[101]" {
		t.Fatalf("rollback left %s", got)
	}
}

func TestCreateLocks(t *testing.T) {
	p, data := mkfile(t, 1<<16)
	g := newGraph()
	defer g.Close()
	addNode(t, g, `{"driver":"file","node-name":"n","filename":%s}`, q(p))
	c := attach(t, g, "n") // write and resize, write not shared
	err := Create(context.Background(), &CreateOptions{Filename: p, Size: 4096})
	if err == nil || err.Error() != `Failed to get "write" lock` {
		t.Fatalf("create on a locked image: %v", err)
	}
	if got, _ := os.ReadFile(p); string(got) != string(data) {
		t.Fatal("failed create changed the image")
	}
	g.ReleaseBackend(c)
	// A user that only unshares resize is enough to stop create.
	c2, err := g.NewBackend("n", "user", graph.PermRead, graph.PermAll&^graph.PermResize)
	if err != nil {
		t.Fatal(err)
	}
	err = Create(context.Background(), &CreateOptions{Filename: p, Size: 4096})
	if err == nil || err.Error() != `Failed to get "resize" lock` {
		t.Fatalf("create vs resize-unsharing user: %v", err)
	}
	g.ReleaseBackend(c2)
	if err := Create(context.Background(), &CreateOptions{Filename: p, Size: 4096}); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(heldBytes(t, p)); got != "[]" {
		t.Fatalf("create left locks %s", got)
	}
	if got, _ := os.ReadFile(p); len(got) != 4096 || strings.Trim(string(got), "\x00") != "" {
		t.Fatal("create did not empty the image")
	}
}
