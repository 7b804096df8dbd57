package luks

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"blockd/drivers/file"
	"blockd/drivers/luks/luksfmt"
	"blockd/graph"
	"blockd/secrets"
)

// luksImage makes a LUKS volume (PBKDF2, 1000 iterations) with 1 MiB of
// payload protected by pass, and returns its path and volume key.
func luksImage(t *testing.T, version int, pass string) (string, []byte) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, key, err := luksfmt.Create(f, luksfmt.CreateOptions{Version: version, Passphrase: []byte(pass),
		KDF: luksfmt.KDF{Type: luksfmt.KDFPBKDF2, Iterations: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(h.PayloadOffset() + 1<<20); err != nil {
		t.Fatal(err)
	}
	return img, key
}

// luksfmt's errors are its own; the driver maps them to graph's sentinels,
// which the edges classify errors with, keeping luksfmt's too.
func TestOpenErrorsMatchGraphSentinels(t *testing.T) {
	img, key := luksImage(t, 1, "pw")
	luksfmt.Wipe(key)
	dir := t.TempDir()
	zero := filepath.Join(dir, "zero.img")
	if err := os.WriteFile(zero, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	v3 := filepath.Join(dir, "v3.img")
	if err := os.WriteFile(v3, append([]byte("LUKS\xba\xbe\x00\x03"), make([]byte, 1<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	pass := "pw"
	st := &secrets.Store{}
	if err := st.Add(secrets.Options{ID: "s", Data: &pass}); err != nil {
		t.Fatal(err)
	}
	open := func(img string, lim graph.KDFLimits) error {
		g := graph.New(st, file.Driver(), Driver())
		defer g.Close()
		g.KDFLimits = lim
		_, err := g.Add(t.Context(), map[string]any{"driver": "luks", "node-name": "l", "key-secret": "s",
			"file": map[string]any{"driver": "file", "filename": img}}, false)
		return err
	}
	for _, tc := range []struct {
		name        string
		img         string
		lim         graph.KDFLimits
		graph, luks error
	}{
		{"over the KDF limit", img, graph.KDFLimits{MaxTime: time.Nanosecond}, graph.ErrNotSupported, luksfmt.ErrKDFLimit},
		{"not LUKS", zero, graph.KDFLimits{}, graph.ErrCorrupt, luksfmt.ErrNotLUKS},
		{"LUKS version 3", v3, graph.KDFLimits{}, graph.ErrNotSupported, luksfmt.ErrUnsupported},
	} {
		if err := open(tc.img, tc.lim); !errors.Is(err, tc.graph) || !errors.Is(err, tc.luks) {
			t.Errorf("%s: blockdev-add: %v, want an error matching %q and %q", tc.name, err, tc.graph, tc.luks)
		}
	}
	// Within the limits the volume opens: the first case fails for its
	// limit only.
	if err := open(img, graph.KDFLimits{}); err != nil {
		t.Fatal(err)
	}
}
