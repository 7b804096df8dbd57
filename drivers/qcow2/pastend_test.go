package qcow2_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockd/drivers/qcow2"
	"blockd/internal/testutil"
)

// qemuCheck runs qemu-img check (with args) on path and returns its
// JSON report.
func qemuCheck(t *testing.T, path string, args ...string) map[string]int64 {
	t.Helper()
	out, err := exec.Command("qemu-img", append(append([]string{"check", "--output=json"}, args...), path)...).Output()
	if err != nil && len(out) == 0 {
		t.Fatalf("qemu-img check %v %s: %v", args, path, err)
	}
	var v map[string]any
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	r := map[string]int64{}
	for k, x := range v {
		if f, ok := x.(float64); ok {
			r[k] = int64(f)
		}
	}
	return r
}

// nodeCheck opens path for a check, as blockd-img check does, and checks
// it with fix.
func nodeCheck(t *testing.T, path string, fix int) *qcow2.CheckReport {
	t.Helper()
	g, _ := newGraph(t)
	defer g.Close()
	g.CheckOpen = true
	ro := ""
	if fix == 0 {
		ro = `,"read-only":true`
	}
	openQcow2(t, g, "img", path, ro)
	r, err := g.Lookup("img").Node().(interface {
		Check(context.Context, int) (*qcow2.CheckReport, error)
	}).Check(t.Context(), fix)
	if err != nil {
		t.Fatalf("check (fix %d): %v", fix, err)
	}
	return r
}

// TestTablesPastEnd opens images whose L1 or refcount table lies past the
// end of the file, as QEMU does: a check reports and repairs what
// qemu-img check does, without writing through the tables; read-only
// opens read the missing L1 table as zeroes; writable opens other than a
// repair are refused (QEMU's would write the tables where they point,
// growing the file to it).
func TestTablesPastEnd(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	orig := filepath.Join(dir, "orig.qcow2")
	blockdevCreate(t, orig, `,"size":4194304`)
	g, _ := newGraph(t)
	c := openQcow2(t, g, "img", orig, "")
	if err := c.WriteAt(t.Context(), pattern(200000, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	b, _ := os.ReadFile(orig)
	for _, tc := range []struct {
		name  string
		field int64
		// zeroes: the image reads as zeroes (its L1 table is gone).
		zeroes bool
	}{
		{"L1", 40, true},
		{"refcount table", 48, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "img.qcow2")
			if err := os.WriteFile(img, b, 0o644); err != nil {
				t.Fatal(err)
			}
			poke64(t, img, tc.field, 1<<40)
			if err := openErr(t, img, ""); err == nil || !strings.Contains(err.Error(), "extends beyond the end of the file") {
				t.Fatalf("writable open: %v", err)
			}
			g, _ := newGraph(t)
			got := readAll(t, openQcow2(t, g, "img", img, `,"read-only":true`))
			if want := qemuRaw(t, img); string(got) != string(want) {
				t.Fatal("read-only open reads other data than qemu-img")
			}
			if tc.zeroes && strings.Trim(string(got), "\x00") != "" {
				t.Fatal("the missing L1 table does not read as zeroes")
			}
			g.Close()

			// Check, then repair: the same counts as qemu-img on a copy.
			cmp := func(what string, r *qcow2.CheckReport, q map[string]int64) {
				t.Helper()
				if r.Corruptions != q["corruptions"] || r.Leaks != q["leaks"] || r.ImageEndOffset != q["image-end-offset"] ||
					r.AllocatedClusters != q["allocated-clusters"] {
					t.Fatalf("%s: blockd %+v, qemu-img %v", what, r, q)
				}
			}
			cmp("check", nodeCheck(t, img, 0), qemuCheck(t, img))
			qcopy := filepath.Join(t.TempDir(), "q.qcow2")
			raw, _ := os.ReadFile(img)
			if err := os.WriteFile(qcopy, raw, 0o644); err != nil {
				t.Fatal(err)
			}
			qfix := qemuCheck(t, qcopy, "-r", "all")
			fix := nodeCheck(t, img, qcow2.FixLeaks|qcow2.FixErrors)
			if fix.LeaksFixed != qfix["leaks-fixed"] || fix.CorruptionsFixed != qfix["corruptions-fixed"] {
				t.Fatalf("repair: blockd %+v, qemu-img %v", fix, qfix)
			}
			cmp("check after the repair", nodeCheck(t, img, 0), qemuCheck(t, qcopy))
			cmp("qemu-img check of blockd's repair", nodeCheck(t, img, 0), qemuCheck(t, img))
			if sizeOf(t, img) != int64(len(raw)) {
				t.Fatalf("the repair grew the file from %d to %d bytes", len(raw), sizeOf(t, img))
			}
			if q, r := qemuRaw(t, qcopy), qemuRaw(t, img); string(q) != string(r) {
				t.Fatal("the repaired images differ")
			}
		})
	}
}

func sizeOf(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
