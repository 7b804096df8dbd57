package qcow2_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/qcow2"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/drivers/raw"
	"blockd/graph"
	"blockd/internal/testutil"
	"blockd/secrets"
)

const testPass = "qcow2 test passphrase"

// shortRun reports whether the workload, crash and fault tests run in
// their short form: under the race detector (as in CI) or with -short,
// unless BLOCKD_LONG=1 asks for the full form. The short form runs every
// test and every configuration, with fewer operations and crash rounds.
func shortRun() bool {
	return os.Getenv("BLOCKD_LONG") != "1" && (testing.Short() || raceEnabled)
}

// scaled returns full, or short in a short run.
func scaled(full, short int) int {
	if shortRun() {
		return short
	}
	return full
}

// events records the events a graph raises.
type events struct {
	mu   sync.Mutex
	list []string
	data []any
}

func (e *events) add(name string, data any) {
	e.mu.Lock()
	e.list = append(e.list, name)
	e.data = append(e.data, data)
	e.mu.Unlock()
}

func (e *events) names() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.list...)
}

func newGraph(t testing.TB) (*graph.Graph, *events) {
	t.Helper()
	st := &secrets.Store{}
	pass := testPass
	if err := st.Add(secrets.Options{ID: "sec0", Data: &pass}); err != nil {
		t.Fatal(err)
	}
	wrong := "wrong"
	if err := st.Add(secrets.Options{ID: "bad", Data: &wrong}); err != nil {
		t.Fatal(err)
	}
	g := graph.New(st, file.Driver(), raw.Driver(), luks.Driver(), qcow2.Driver())
	ev := &events{}
	g.Events = ev.add
	t.Cleanup(g.Close)
	return g, ev
}

func js(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func add(t testing.TB, g *graph.Graph, s string) *graph.BDS {
	t.Helper()
	b, err := g.Add(context.Background(), testutil.Tree(t, s), false)
	if err != nil {
		t.Fatalf("blockdev-add %s: %v", s, err)
	}
	return b
}

func addErr(t testing.TB, g *graph.Graph, s string) error {
	t.Helper()
	_, err := g.Add(context.Background(), testutil.Tree(t, s), false)
	return err
}

func backend(t testing.TB, g *graph.Graph, name string, write bool) *graph.Child {
	t.Helper()
	perm := graph.PermRead
	if write {
		perm |= graph.PermWrite | graph.PermResize
	}
	c, err := g.NewBackend(name, "test", perm, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.ReleaseBackend(c) })
	return c
}

// openQcow2 adds a qcow2 node over a file and returns a writable backend.
func openQcow2(t testing.TB, g *graph.Graph, name, path string, extra string) *graph.Child {
	t.Helper()
	ro := strings.Contains(extra, `"read-only":true`)
	add(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"file":{"driver":"file","filename":%q}%s}`, name, path, extra))
	return backend(t, g, name, !ro)
}

// blockdevCreate makes an empty file and formats it through blockdev-create.
func blockdevCreate(t testing.TB, path string, opts string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	g, _ := newGraph(t)
	add(t, g, fmt.Sprintf(`{"driver":"file","node-name":"cf","filename":%q}`, path))
	tree := testutil.Tree(t, fmt.Sprintf(`{"driver":"qcow2","file":"cf"%s}`, opts))
	if err := g.Create(context.Background(), tree); err != nil {
		t.Fatalf("blockdev-create %s: %v", opts, err)
	}
	if err := g.Del("cf"); err != nil {
		t.Fatal(err)
	}
}

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return p
}

func readAll(t testing.TB, c *graph.Child) []byte {
	t.Helper()
	buf := make([]byte, c.Size())
	if err := c.ReadAt(context.Background(), buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

// qemuImg runs qemu-img (skipping without it outside CI); testutil.Run
// retries the machine's PBKDF2 timing failures of LUKS creation.
func qemuImg(t testing.TB, args ...string) string {
	t.Helper()
	return testutil.Run(t, "qemu-img", args...)
}

func qemuIO(t testing.TB, args ...string) string {
	t.Helper()
	return testutil.Run(t, "qemu-io", args...)
}

// qemuRaw converts an image to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, args ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	a := append([]string{"convert", "-O", "raw"}, args...)
	qemuImg(t, append(a, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkClean runs qemu-img check and fails on errors or leaks; it also
// runs blockd's own checker. With extra arguments (--object ...
// --image-opts OPTS) they replace the path on qemu-img's command line.
func checkClean(t testing.TB, path string, extra ...string) {
	t.Helper()
	args := append([]string{"check"}, extra...)
	if len(extra) == 0 {
		args = append(args, path)
	}
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		testutil.NeedTool(t, "qemu-img")
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
	if !bytes.Contains(out, []byte("No errors were found")) {
		t.Fatalf("qemu-img check %s:\n%s", path, out)
	}
	selfCheck(t, path)
}

// selfCheck runs qcow2fmt.Check.
func selfCheck(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	res, err := qcow2fmt.Check(f, st.Size())
	if err != nil {
		t.Fatalf("check %s: %v", path, err)
	}
	if !res.OK() {
		t.Fatalf("check %s: %d corruptions, %d leaks: %s", path, res.Corruptions, res.Leaks, strings.Join(res.Messages, "; "))
	}
}

func equalOrFail(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s: first difference at byte %d (%#x): %#x, want %#x", what, i, i, got[i], want[i])
			}
		}
	}
}

// sharedDir holds images several tests copy (removed by TestMain).
var sharedDir string

func TestMain(m *testing.M) {
	d, err := os.MkdirTemp("", "qcow2-test-")
	if err != nil {
		panic(err)
	}
	sharedDir = d
	code := m.Run()
	os.RemoveAll(d)
	os.Exit(code)
}

var encTemplate struct {
	once sync.Once
	path string
	err  string
}

// qemuEncrypted copies a 4 MiB LUKS-encrypted qcow2 image made by qemu-img
// (with the test passphrase) to dst. qemu-img takes seconds to make one,
// so it is made once.
func qemuEncrypted(t *testing.T, dst string) {
	t.Helper()
	testutil.NeedTool(t, "qemu-img")
	encTemplate.once.Do(func() {
		pw := filepath.Join(sharedDir, "pw")
		if err := os.WriteFile(pw, []byte(testPass), 0o600); err != nil {
			encTemplate.err = err.Error()
			return
		}
		p := filepath.Join(sharedDir, "enc-template.qcow2")
		args := []string{"create", "-q", "--object", "secret,id=s0,file=" + pw, "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100", p, "4M"}
		if out, err := testutil.RunErr("qemu-img", args...); err != nil {
			encTemplate.err = out
			return
		}
		encTemplate.path = p
	})
	if encTemplate.path == "" {
		t.Fatalf("qemu-img create (encrypted): %s", encTemplate.err)
	}
	b, err := os.ReadFile(encTemplate.path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
