package qcow2_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"blockd/drivers/luks/luksfmt"
	"blockd/drivers/qcow2/qcow2fmt"
	"blockd/graph"
)

// The LUKS header of an encrypted image is read through the format package,
// whose errors are its own; the driver maps them to graph's sentinels,
// keeping luksfmt's too: a keyslot over the KDF limit is ErrNotSupported,
// a LUKS area that holds no header ErrCorrupt (also when the image is
// opened for its metadata only).
func TestEncryptionErrorsMatchGraphSentinels(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "enc.qcow2")
	blockdevCreate(t, img, `,"size":1048576,"encrypt":{"format":"luks","key-secret":"sec0","iter-time":10}`)
	broken := filepath.Join(dir, "broken.qcow2")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2fmt.Parse(f, int64(len(b)))
	f.Close()
	if err != nil || h.Crypto == nil {
		t.Fatalf("parse: %v, crypto %v", err, h.Crypto)
	}
	clear(b[h.Crypto.Offset : h.Crypto.Offset+h.Crypto.Length])
	if err := os.WriteFile(broken, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		img          string
		lim          graph.KDFLimits
		metadataOnly bool
		graph, luks  error
	}{
		{"over the KDF limit", img, graph.KDFLimits{MaxTime: time.Nanosecond}, false, graph.ErrNotSupported, luksfmt.ErrKDFLimit},
		{"no LUKS header", broken, graph.KDFLimits{}, false, graph.ErrCorrupt, luksfmt.ErrNotLUKS},
		{"no LUKS header, metadata only", broken, graph.KDFLimits{}, true, graph.ErrCorrupt, luksfmt.ErrNotLUKS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, _ := newGraph(t)
			defer g.Close()
			g.KDFLimits, g.MetadataOnly = tc.lim, tc.metadataOnly
			enc := encOpt
			if tc.metadataOnly {
				enc = `,"read-only":true`
			}
			err := addErr(t, g, fmt.Sprintf(`{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":%q}%s}`, tc.img, enc))
			if !errors.Is(err, tc.graph) || !errors.Is(err, tc.luks) {
				t.Fatalf("blockdev-add: %v, want an error matching %q and %q", err, tc.graph, tc.luks)
			}
		})
	}
	g, _ := newGraph(t)
	defer g.Close()
	openQcow2(t, g, "x", img, encOpt)
}
