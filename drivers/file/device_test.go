package file

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"blockd/graph"
)

// loopDevice attaches a fresh file to a loop device with the given logical
// sector size, or skips the test where loop devices are not available.
func loopDevice(t *testing.T, size int64, sectorSize int) (dev, backing string, data []byte) {
	t.Helper()
	losetup, err := exec.LookPath("losetup")
	if err != nil || unix.Geteuid() != 0 {
		t.Skip("needs root and losetup")
	}
	backing, data = mkfile(t, size)
	out, err := exec.Command(losetup, "--find", "--show", "--sector-size", fmt.Sprint(sectorSize), backing).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command(losetup, "-d", dev).Run() })
	return dev, backing, data
}

func TestHostDevice(t *testing.T) {
	ctx := context.Background()
	for _, sector := range []int{512, 4096} {
		t.Run(fmt.Sprint(sector), func(t *testing.T) {
			const size = 4 << 20
			dev, backing, data := loopDevice(t, size, sector)
			g := newGraph()
			defer g.Close()
			if _, err := g.Add(ctx, tree(t, `{"driver":"file","node-name":"f","filename":%s}`, q(dev)), false); err == nil ||
				err.Error() != "'file' driver requires '"+dev+"' to be a regular file" {
				t.Fatalf("file driver on a device: %v", err)
			}
			if _, err := g.Add(ctx, tree(t, `{"driver":"host_device","node-name":"f","filename":%s}`, q(backing)), false); err == nil ||
				err.Error() != "'host_device' driver requires '"+backing+"' to be either a character or block device" {
				t.Fatalf("host_device on a file: %v", err)
			}
			b := addNode(t, g, `{"driver":"host_device","node-name":"d","filename":%s,"discard":"unmap","cache":{"direct":true}}`, q(dev))
			if l := b.Limits(); l.Align != int64(sector) {
				t.Fatalf("limits %+v, want align %d (BLKSSZGET)", l, sector)
			}
			c := attach(t, g, "d")
			if c.Size() != size {
				t.Fatalf("size %d", c.Size())
			}
			buf := make([]byte, 10000)[3:]
			if err := c.ReadAt(ctx, buf, 777); err != nil || !bytes.Equal(buf, data[777:777+len(buf)]) {
				t.Fatalf("unaligned read: %v", err)
			}
			w := bytes.Repeat([]byte{0x5a}, 6000)
			if err := c.WriteAt(ctx, w, 1001, graph.FUA); err != nil {
				t.Fatal(err)
			}
			copy(data[1001:], w)
			if err := c.WriteZeroes(ctx, 64<<10, 64<<10, 0); err != nil {
				t.Fatal(err)
			}
			clear(data[64<<10 : 128<<10])
			if err := c.WriteZeroes(ctx, 256<<10, 64<<10, graph.MayUnmap); err != nil {
				t.Fatal(err)
			}
			clear(data[256<<10 : 320<<10])
			if err := c.Discard(ctx, 512<<10, 64<<10); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if err := c.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			// Discarded data on a loop device reads as zeroes (it punches
			// the backing file).
			clear(data[512<<10 : 576<<10])
			if !bytes.Equal(got, data) {
				t.Fatal("device content mismatch")
			}
			if err := c.WriteZeroes(ctx, 0, 4096, graph.NoFallback); !errors.Is(err, graph.ErrNotSupported) {
				t.Fatalf("NoFallback zero on a device: %v", err)
			}
			ext, err := c.BlockStatus(ctx, 0, size)
			if err != nil || len(ext) != 1 || ext[0].Flags != 0 || ext[0].Length != size {
				t.Fatalf("device block status %+v %v", ext, err)
			}
			for _, tc := range []struct {
				size int64
				mode graph.Prealloc
				err  string
			}{
				{size * 2, graph.PreallocOff, "Cannot grow device files"},
				{size, graph.PreallocFalloc, "Preallocation mode 'falloc' unsupported for this non-regular file"},
				{size / 2, graph.PreallocOff, ""},
				{size, graph.PreallocOff, ""},
			} {
				err := c.Truncate(ctx, tc.size, tc.mode)
				var fe *Error
				if tc.err == "" && err != nil || tc.err != "" && (!errors.As(err, &fe) || fe.Msg != tc.err) {
					t.Fatalf("truncate %d %s: %v, want %q", tc.size, tc.mode, err, tc.err)
				}
				if c.Size() != size {
					t.Fatalf("device size changed to %d", c.Size())
				}
			}
			// Locks work on devices as well.
			g2 := newGraph()
			defer g2.Close()
			addNode(t, g2, `{"driver":"host_device","node-name":"d","filename":%s}`, q(dev))
			if _, err := g2.NewBackend("d", "export", rw, graph.PermAll); err == nil || err.Error() != `Failed to get "write" lock` {
				t.Fatalf("second writer on the device: %v", err)
			}
		})
	}
}
