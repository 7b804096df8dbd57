package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockd/internal/testutil"
	"blockd/internal/tlscreds/tlstest"
)

// TestTLSExport starts the NBD server with tls-creds-x509 from QMP and
// checks that nbdinfo gets in with the certificates and not without.
func TestTLSExport(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	d := start(t)
	certs := filepath.Join(d.dir, "pki")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := tlstest.Generate(certs, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(d.dir, "a.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	sock := filepath.Join(d.dir, "nbd.sock")
	d.must("object-add", map[string]any{"qom-type": "tls-creds-x509", "id": "tlsc", "dir": certs, "endpoint": "client"})
	d.mustFail("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}, "tls-creds": "tlsc"},
		"Expected TLS credentials for a server endpoint")
	d.must("object-del", map[string]any{"id": "tlsc"})
	d.must("object-add", map[string]any{"qom-type": "tls-creds-x509", "id": "tls0", "dir": certs, "endpoint": "server", "verify-peer": true})
	d.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}, "tls-creds": "tls0"})
	d.must("blockdev-add", map[string]any{"driver": "file", "node-name": "f0", "filename": img})
	d.must("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "f0", "name": "disk"})
	out := testutil.Run(t, "nbdinfo", "--size", "nbds+unix:///disk?socket="+sock+"&tls-certificates="+certs)
	if strings.TrimSpace(out) != "1048576" {
		t.Fatalf("nbdinfo over TLS: %q", out)
	}
	if out, err := testutil.RunErr("nbdinfo", "--size", "nbd+unix:///disk?socket="+sock); err == nil {
		t.Fatalf("plain client got in: %s", out)
	}
	d.mustFail("object-add", map[string]any{"qom-type": "tls-creds-x509", "id": "bad", "dir": filepath.Join(d.dir, "nosuch"), "endpoint": "server"}, "")
}
