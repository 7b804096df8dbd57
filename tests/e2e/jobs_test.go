package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"blockd/internal/testutil"
)

type jobInfo struct {
	ID     string `json:"id"`
	Type   string `json:"type"`
	Status string `json:"status"`
	Error  string `json:"error"`
}

// runJob starts a job command, waits for it to conclude, dismisses it and
// returns its error text ("" on success).
func (d *daemon) runJob(cmd string, args map[string]any) string {
	d.t.Helper()
	d.must(cmd, args)
	id := args["job-id"].(string)
	deadline := time.Now().Add(60 * time.Second)
	for {
		var jobs []jobInfo
		json.Unmarshal(d.must("query-jobs", nil), &jobs)
		for _, j := range jobs {
			if j.ID == id && j.Status == "concluded" {
				d.must("job-dismiss", map[string]any{"id": id})
				return j.Error
			}
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("job %s did not conclude: %+v", id, jobs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCreateAndAmend formats a detached-header LUKS2 volume with
// blockdev-create, manages its keyslots online with x-blockdev-amend and
// checks each step with cryptsetup.
func TestCreateAndAmend(t *testing.T) {
	d := start(t)
	hdr, data := filepath.Join(d.dir, "hdr.img"), filepath.Join(d.dir, "data.img")
	pw1, pw2 := filepath.Join(d.dir, "pw1"), filepath.Join(d.dir, "pw2")
	os.WriteFile(pw1, []byte("first"), 0o600)
	os.WriteFile(pw2, []byte("second"), 0o600)
	d.must("object-add", map[string]any{"qom-type": "secret", "id": "s1", "file": pw1})
	d.must("object-add", map[string]any{"qom-type": "secret", "id": "s2", "file": pw2})
	for _, f := range []struct{ id, name string }{{"c1", hdr}, {"c2", data}} {
		if e := d.runJob("blockdev-create", map[string]any{"job-id": f.id, "options": map[string]any{"driver": "file", "filename": f.name, "size": 0}}); e != "" {
			t.Fatalf("create %s: %s", f.name, e)
		}
	}
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "hdr", "filename": hdr})
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "data", "filename": data})
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c3", "options": map[string]any{
		"driver": "luks", "header": "hdr", "file": "data", "size": 8 << 20, "key-secret": "s1",
		"iter-time": 50, "luks-version": 2, "pbkdf": "pbkdf2"}}); e != "" {
		t.Fatalf("create luks: %s", e)
	}
	if e := d.runJob("blockdev-create", map[string]any{"job-id": "c4", "options": map[string]any{
		"driver": "luks", "header": "hdr", "size": 0, "key-secret": "nosuch"}}); e != "No secret with id 'nosuch'" {
		t.Fatalf("create with a missing secret: %q", e)
	}
	if st, _ := os.Stat(data); st.Size() != 8<<20 {
		t.Fatalf("data size %d", st.Size())
	}
	testutil.Run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", pw1, hdr)
	d.must("blockdev-add", map[string]any{"driver": "luks", "node-name": "disk", "file": "data", "header": "hdr", "key-secret": "s1"})

	amend := func(id string, opts map[string]any, force bool) string {
		opts["driver"] = "luks"
		a := map[string]any{"job-id": id, "node-name": "disk", "options": opts}
		if force {
			a["force"] = true
		}
		return d.runJob("x-blockdev-amend", a)
	}
	if e := amend("a1", map[string]any{"state": "active", "new-secret": "s2", "iter-time": 50}, false); e != "" {
		t.Fatalf("add keyslot: %s", e)
	}
	testutil.Run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", pw2, hdr)
	if e := amend("a2", map[string]any{"state": "active", "new-secret": "s2", "keyslot": 1}, false); e != "Refusing to overwrite active keyslot 1 - please erase it first" {
		t.Fatalf("overwrite: %q", e)
	}
	if e := amend("a3", map[string]any{"state": "inactive", "old-secret": "s1"}, false); e != "" {
		t.Fatalf("erase old: %s", e)
	}
	if _, err := testutil.RunErr("cryptsetup", "open", "--test-passphrase", "--key-file", pw1, hdr); err == nil {
		t.Fatal("the erased passphrase still opens the header")
	}
	if e := amend("a4", map[string]any{"state": "inactive", "keyslot": 1}, false); !strings.HasPrefix(e, "Attempt to erase the only active keyslot 1") {
		t.Fatalf("erase last: %q", e)
	}
	if e := amend("a5", map[string]any{"state": "inactive", "keyslot": 0}, false); e != "Given keyslot 0 is already erased (inactive) " {
		t.Fatalf("erase inactive: %q", e)
	}
	d.mustFail("x-blockdev-amend", map[string]any{"job-id": "a6", "node-name": "hdr", "options": map[string]any{"driver": "luks", "state": "active"}}, "x-blockdev-amend doesn't support changing the block driver")
	d.mustFail("x-blockdev-amend", map[string]any{"job-id": "a6", "node-name": "nosuch", "options": map[string]any{"driver": "luks", "state": "active"}}, "Cannot find device='' nor node-name='nosuch'")
}
