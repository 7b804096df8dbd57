package security

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

// TestImageCannotNameOtherFiles makes qcow2 images with qemu-img whose
// backing file or external data file name is a json: description of a
// file the user never named (the CVE-2024-4467 class), and opens them every
// way a user would: blockdev-add and an NBD export in the daemon, and
// blockd-img info, check, convert and compare. None of them reads the
// file; info still shows the names, as qemu-img info does.
func TestImageCannotNameOtherFiles(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	secret := bytes.Repeat([]byte("not for the guest\n"), 4096)
	target := writeFile(t, filepath.Join(dir, "shadow"), secret)
	img := filepath.Join(dir, "blockd-img")
	if out, err := exec.Command("go", "build", "-o", img, "blockd/cmd/blockd-img").CombinedOutput(); err != nil {
		t.Fatalf("building blockd-img: %v\n%s", err, out)
	}
	jsonFile := fmt.Sprintf(`json:{"driver":"file","filename":%q}`, target)
	jsonRaw := fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"file","filename":%q}}`, target)
	images := map[string][]string{
		// The report's recipe, and the forms QEMU itself would follow.
		"backing-json-file.qcow2": {"create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", jsonFile, "", "1M"},
		"backing-json-raw.qcow2":  {"create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", jsonRaw, "", "1M"},
		"backing-nbd.qcow2":       {"create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "nbd+unix:///x?socket=" + filepath.Join(dir, "nbd.sock"), "", "1M"},
		"data-json.qcow2":         {"create", "-q", "-f", "qcow2", "-o", "data_file=" + filepath.Join(dir, "data.raw") + ",data_file_raw=on", "", "1M"},
	}
	for name, args := range images {
		p := filepath.Join(dir, name)
		args[len(args)-2] = p
		testutil.Run(t, "qemu-img", args...)
	}
	// The data file name becomes a json: one afterwards (qemu-img create
	// cannot write one), as a hostile image would carry it.
	testutil.Run(t, "qemu-img", "amend", "-q", "-o", "data_file="+strings.ReplaceAll(jsonFile, ",", ",,"), filepath.Join(dir, "data-json.qcow2"))

	d := harness.StartDaemon(t, blockdBin, "--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "nbd.sock"))
	for name := range images {
		p := filepath.Join(dir, name)
		t.Run(name, func(t *testing.T) {
			d.MustFail("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "evil", "read-only": true,
				"file": map[string]any{"driver": "file", "filename": p}}, "is not a plain file name")
			for _, verb := range [][]string{
				{"check", p},
				{"convert", "-O", "raw", p, filepath.Join(dir, "out.raw")},
				{"compare", p, target},
				{"map", p},
			} {
				out, err := exec.Command(img, verb...).CombinedOutput()
				if err == nil || !strings.Contains(string(out), "is not a plain file name") {
					t.Errorf("blockd-img %s: %v\n%s", verb[0], err, out)
				}
				if bytes.Contains(out, secret[:17]) {
					t.Errorf("blockd-img %s printed the file's contents", verb[0])
				}
			}
			if got, err := os.ReadFile(filepath.Join(dir, "out.raw")); err == nil && bytes.Contains(got, secret[:17]) {
				t.Fatal("convert copied the file the image named")
			}
			// info opens nothing the image names and shows the names.
			out, err := exec.Command(img, "info", p).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "file: ") {
				t.Errorf("blockd-img info: %v\n%s", err, out)
			}
		})
	}
	// The user may still name the file: then it is opened.
	d.Must("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "named", "read-only": true,
		"file":    map[string]any{"driver": "file", "filename": filepath.Join(dir, "backing-json-file.qcow2")},
		"backing": map[string]any{"driver": "raw", "file": map[string]any{"driver": "file", "filename": target}}})
}
