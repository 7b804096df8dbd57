package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
)

// bimg is the blockd-img binary the tests run, built once in TestMain.
var bimg string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockd-img-test")
	if err != nil {
		panic(err)
	}
	bimg = filepath.Join(dir, "blockd-img")
	build := []string{"build", "-o", bimg}
	if raceBuild {
		build = append(build, "-race")
	}
	out, err := exec.Command("go", append(build, "blockd/cmd/blockd-img")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building blockd-img: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is what one run of a tool produced.
type result struct {
	stdout, stderr string
	code           int
}

// runIn runs a program in dir and returns its output and exit status.
func runIn(t *testing.T, dir, prog string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Dir = dir
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s %s: %v", prog, strings.Join(args, " "), err)
		}
		code = ee.ExitCode()
	}
	return result{so.String(), se.String(), code}
}

// qemuImg runs qemu-img, retrying the LUKS key derivation benchmark
// failure these machines sometimes give ("Unable to get accurate CPU
// usage").
func qemuImg(t *testing.T, dir string, args ...string) result {
	t.Helper()
	testutil.NeedTool(t, "qemu-img")
	var r result
	for i := 0; i <= testutil.PeerRetries; i++ {
		r = runIn(t, dir, "qemu-img", args...)
		if !testutil.PeerFlake(r.stderr) {
			break
		}
	}
	return r
}

// blockdImg runs blockd-img.
func blockdImg(t *testing.T, dir string, args ...string) result {
	t.Helper()
	return runIn(t, dir, bimg, args...)
}

// mustRun runs a tool that must succeed.
func mustRun(t *testing.T, dir, prog string, args ...string) string {
	t.Helper()
	var r result
	if prog == "qemu-img" {
		r = qemuImg(t, dir, args...)
	} else {
		testutil.NeedTool(t, prog)
		r = runIn(t, dir, prog, args...)
	}
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\n%s%s", prog, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// writeAt writes data into a file at off.
func writeAt(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}

// copyDir copies the regular files of src into a new temporary directory,
// keeping holes.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() && !e.IsDir() {
			continue
		}
		mustRun(t, src, "cp", "-r", "--sparse=always", e.Name(), filepath.Join(dst, e.Name()))
	}
	return dst
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed) + 1
	for i := range b {
		x = x*1103515245 + 12345
		b[i] = byte(x >> 16)
	}
	return b
}

var _ = io.Discard
