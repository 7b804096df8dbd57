package qcow2_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/testutil"
)

// The crash test runs a workload in a child process (this test binary,
// TestCrashChild), kills it with SIGKILL at a random moment, and checks
// that qemu-img finds no corruption and that every write acknowledged
// before the last completed flush is in the image. It repeats on the same
// image, so later rounds start from crashed states (and lazy-refcount
// images are repaired on open).

const crashEnv = "BLOCKD_QCOW2_CRASH_CHILD"

// TestCrashChild is the child side; it does nothing in a normal run.
func TestCrashChild(t *testing.T) {
	spec := os.Getenv(crashEnv)
	if spec == "" {
		t.Skip("child process of TestCrash")
	}
	parts := strings.Split(spec, "|")
	img, extra := parts[0], parts[1]
	seed, _ := strconv.ParseUint(parts[2], 10, 64)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", img, extra)
	w := &workload{c: c, mirror: readAll(t, c), cs: 65536, r: rand.New(rand.NewPCG(seed, 1))}
	if cs := g.Lookup("img").Node().(graph.Infoer).Info().ClusterSize; cs > 0 {
		w.cs = cs
	}
	out := bufio.NewWriter(os.Stdout)
	for i := 0; ; i++ {
		fmt.Fprintf(out, "B %d\n", i)
		out.Flush()
		w.step(t, t.Context(), i)
		if i%16 == 15 {
			if err := c.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(out, "F %d\n", i)
			out.Flush()
		}
	}
}

func TestCrash(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	// The second round and later ones start from a crashed image.
	rounds := scaled(6, 2)
	for _, tc := range []struct{ name, create, extra string }{
		{"default", ``, ``},
		{"c512", `,"cluster-size":512`, ``},
		{"lazy", `,"lazy-refcounts":true,"cluster-size":4096`, ``},
		{"extl2", `,"extended-l2":true`, ``},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 6 << 20
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			blockdevCreate(t, img, fmt.Sprintf(`,"size":%d%s`, size, tc.create))
			extra := `,"discard":"unmap"` + tc.extra
			base := make([]byte, size)
			for round := 0; round < rounds; round++ {
				seed := uint64(round*7919 + len(tc.name))
				cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
				cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%d", crashEnv, img, extra, seed))
				stdout, err := cmd.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				cmd.Stderr = os.Stderr
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				lines := make(chan string, 1024)
				go func() {
					sc := bufio.NewScanner(stdout)
					for sc.Scan() {
						lines <- sc.Text()
					}
					close(lines)
				}()
				deadline := time.After(time.Duration(150+rand.IntN(600)) * time.Millisecond)
				began, flushed := -1, -1
			wait:
				for {
					select {
					case l, ok := <-lines:
						if !ok {
							break wait
						}
						var k string
						var n int
						fmt.Sscanf(l, "%s %d", &k, &n)
						switch k {
						case "B":
							began = n
						case "F":
							flushed = n
						}
					case <-deadline:
						_ = cmd.Process.Signal(syscall.SIGKILL)
						deadline = nil
					}
				}
				_ = cmd.Wait()
				// Replay: the state at the last completed flush, and what
				// later operations may have touched.
				w := &workload{mirror: append([]byte(nil), base...), cs: clusterSizeOf(t, img), r: rand.New(rand.NewPCG(seed, 1))}
				type rng struct{ s, e int64 }
				var after []rng
				for i := 0; i <= began; i++ {
					o := w.next(i)
					if i <= flushed {
						w.mirrorOp(o)
					} else if s, e := w.touched(o); e > s {
						after = append(after, rng{s, e})
					}
				}
				if tc.name == "lazy" {
					// A crashed lazy-refcount image is dirty: opening it
					// writable repairs it.
					g, _ := newGraph(t)
					openQcow2(t, g, "img", img, "")
					g.Close()
				}
				checkNoCorruption(t, img)
				got := qemuRaw(t, img)
				check := append([]byte(nil), got...)
				for _, r := range after {
					copy(check[r.s:r.e], w.mirror[r.s:r.e])
				}
				equalOrFail(t, fmt.Sprintf("round %d (flushed op %d, began op %d)", round, flushed, began), check, w.mirror)
				base = got
			}
			// Crashes may leak clusters (allocated but not yet referenced,
			// or dropped but not yet freed); qemu-img repairs leaks.
			qemuImg(t, "check", "-q", "-r", "leaks", img)
			checkClean(t, img)
		})
	}
}

// checkNoCorruption runs qemu-img check and accepts leaks (exit status 3)
// but not corruption.
func checkNoCorruption(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 3 {
			return
		}
		t.Fatalf("qemu-img check after a crash: %v\n%s", err, out)
	}
}

func clusterSizeOf(t *testing.T, img string) int64 {
	g, _ := newGraph(t)
	openQcow2(t, g, "x", img, `,"read-only":true`)
	cs := g.Lookup("x").Node().(graph.Infoer).Info().ClusterSize
	g.Close()
	return cs
}
